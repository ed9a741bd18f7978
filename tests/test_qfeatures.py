"""qfeatures.py: the nine text features ψ(h, y, C) of a candidate set, each worked by hand on tiny sets (words of
≤ 3 letters, which ROUGE's stemmer leaves alone), the consensus pool, and the per-history grouping of reranking;
qnet's feature sets ([φ, ψ], the ψ block's scale in "both", qlearn.json)."""
import json
import math

import pytest
import torch

from chatrlhf.qfeatures import TEXT_FEATURES, content_overlap, grouped_text_features, text_features, unigram_f1
from chatrlhf.qnet import TEXT_SCALE, feature_dims, load_qheads, make_heads, q_inputs, save_qheads


def col(psi: torch.Tensor, name: str) -> list[float]:
    return psi[:, TEXT_FEATURES.index(name)].tolist()


def test_one_turn_set_by_hand():
    """h = user "red cat"; C = {red cat, red dog, sky}. ROUGE-L(red cat, red dog): LCS 1 of 2 and 2 → F 0.5, and the
    unigram F1 2·1/(2 + 2) = 0.5; sky shares nothing. The history is the user's turn, so history = user columns."""
    psi = text_features([{"role": "user", "content": "red cat"}], ["red cat", "red dog", "sky"])
    assert psi.shape == (3, 9) and psi.dtype == torch.float32
    want = {"consensus_rouge": [0.25, 0.25, 0.0], "consensus_f1": [0.25, 0.25, 0.0],
            "rouge_user": [1.0, 0.5, 0.0], "overlap_user": [1.0, 0.5, 0.0], "rouge_history": [1.0, 0.5, 0.0],
            "f1_history": [1.0, 0.5, 0.0], "length": [2 / 32, 2 / 32, 1 / 32],
            "log_length": [math.log(3), math.log(3), math.log(2)], "distinct": [1.0, 1.0, 1.0]}
    for name, values in want.items():
        assert col(psi, name) == pytest.approx(values, abs=1e-6), name


def test_multi_turn_set_with_a_candidate_outside_the_pool_by_hand():
    """h = user "the cat", assistant "a dog", user "the red hat" (content words of the last turn: red, hat; the whole
    history: the cat a dog the red hat, 7 words). C = {red red hat, red dog, hat}, the pool {0, 1} (hat is the human
    reply: compared with the pool, not in it).
      0 vs 1: LCS 1 → F = 2·(1/3)(1/2) / (1/3 + 1/2) = 0.4; F1 = 2·1/(3 + 2) = 0.4 — so 0 and 1 each have 0.4.
      2 vs 0: LCS 1 → F = 2·(1/3)·1 / (4/3) = 0.5, F1 2/(3 + 1) = 0.5; 2 vs 1: 0 → mean 0.25 for both.
      to "the red hat": 0: LCS 2 of 3, 3 → 2/3; 1: P 1/2, R 1/3 → 0.4; 2: P 1, R 1/3 → 0.5.
      to the history: 0: LCS (red hat) 2: P 2/3, R 2/7 → 0.4; 1: LCS 1: P 1/2, R 1/7 → 2/9; 2: P 1, R 1/7 → 0.25.
      F1 to the history: 0: common red, hat → 4/10; 1: red, dog → 4/9; 2: hat → 2/8."""
    history = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"},
               {"role": "user", "content": "the red hat"}]
    psi = text_features(history, ["red red hat", "red dog", "hat"], pool=[0, 1])
    want = {"consensus_rouge": [0.4, 0.4, 0.25], "consensus_f1": [0.4, 0.4, 0.25],
            "rouge_user": [2 / 3, 0.4, 0.5], "overlap_user": [1.0, 0.5, 0.5], "rouge_history": [0.4, 2 / 9, 0.25],
            "f1_history": [0.4, 4 / 9, 0.25], "length": [3 / 32, 2 / 32, 1 / 32],
            "log_length": [math.log(4), math.log(3), math.log(2)], "distinct": [2 / 3, 1.0, 1.0]}
    for name, values in want.items():
        assert col(psi, name) == pytest.approx(values, abs=1e-6), name
    everyone = text_features(history, ["red red hat", "red dog", "hat"])  # hat in the pool lifts 0's consensus
    assert col(everyone, "consensus_rouge")[0] == pytest.approx((0.4 + 0.5) / 2)


def test_edge_cases_empty_replies_no_user_turn_one_candidate_and_a_bad_pool():
    psi = text_features([], ["", "Ok ok"])
    assert col(psi, "length") == [0.0, pytest.approx(2 / 32)] and col(psi, "distinct") == [1.0, 0.5]
    assert col(psi, "rouge_user") == [0.0, 0.0] and col(psi, "consensus_rouge") == [0.0, 0.0]
    assert col(text_features([{"role": "user", "content": "hi"}], ["hi"]), "consensus_f1") == [0.0]  # nobody else
    assert text_features([], []).shape == (0, 9)
    assert unigram_f1("a b b", "b b c") == pytest.approx(2 * 2 / 6) and content_overlap("the and", "x") == 0.0
    with pytest.raises(ValueError, match="pool"):
        text_features([], ["a"], pool=[1])


def test_grouped_features_take_each_historys_candidates_as_its_pool():
    h1, h2 = [{"role": "user", "content": "red cat"}], [{"role": "user", "content": "sky"}]
    got = grouped_text_features([h1, h2, h1, h1, h2], ["red cat", "sky", "red dog", "sky", "dog"])
    one, two = text_features(h1, ["red cat", "red dog", "sky"]), text_features(h2, ["sky", "dog"])
    torch.testing.assert_close(got, torch.stack([one[0], two[0], one[1], one[2], two[1]]))


def test_feature_sets_dims_inputs_and_the_text_blocks_scale_survive_save_and_load(tmp_path):
    assert [feature_dims(f, 64) for f in ("phi", "text", "both")] == [64, 9, 73]
    with pytest.raises(ValueError, match="features"):
        feature_dims("words", 64)
    phi, psi = torch.randn(3, 4), torch.randn(3, 9)
    assert torch.equal(q_inputs(phi, psi), torch.cat([phi, psi], 1)) and torch.equal(q_inputs(None, psi), psi)
    heads = make_heads("both", 4, hidden=0, value=True)
    assert heads.feature_scale.tolist() == [1.0] * 4 + [TEXT_SCALE] * 9
    x = torch.randn(10, 13, dtype=torch.float64)
    heads.observe(x)
    z = heads.standardise(x)
    assert z[:, 4:].std(0).tolist() == pytest.approx([TEXT_SCALE] * 9) and z[:, :4].std(0).tolist() == pytest.approx([1.0] * 4)
    save_qheads(heads, tmp_path, "m", "mean", "both")
    meta = json.loads((tmp_path / "qlearn.json").read_text())
    assert meta["features"] == "both" and meta["text_features"] == list(TEXT_FEATURES) and meta["dims"] == 13
    loaded, _ = load_qheads(tmp_path)
    torch.testing.assert_close(loaded.standardise(x), z)
    save_qheads(make_heads("phi", 4), tmp_path / "p", "m", "mean")  # φ folders keep their qlearn.json as it was
    assert "features" not in json.loads((tmp_path / "p" / "qlearn.json").read_text())
