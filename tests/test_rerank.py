"""rerank.py and `generate|chat --rerank`: the pick is the argmax of scores computed independently (Q heads saved with
save_qheads, a reward model folder from `chatrlhf reward train`), a hand-made head Q = φ_j picks the reply with the
largest φ_j (and ranks by Q_1, not the min over heads), one candidate = plain generation with the same seed, and the
CLI end to end: bad specs and folders of the wrong kind are refused by name, --candidates needs --rerank, the output
records the score."""

import json
import shutil

import pytest
import torch

from chatrlhf.config import ModelArgs
from chatrlhf.data.template import render
from chatrlhf.errors import UsageError
from chatrlhf.models import load_model, save_model
from chatrlhf.qfeatures import TEXT_FEATURES, words as text_words
from chatrlhf.qnet import TEXT_SCALE, QHeads, make_heads, save_qheads
from chatrlhf.rerank import QReranker, Reranker, RMReranker, load_reranker
from chatrlhf.reward_model import load_reward_model, reward_scores
from conftest import EXAMPLES, run_cli, tiny_reward_model

MODEL = "tiny-random-llama"
H1 = [{"role": "user", "content": "my order never arrived"}]
H2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
      {"role": "user", "content": "what is the refund policy for damaged goods?"}]
CANDIDATES = ["sorry, what is the order number?", "ok", "Refunds take 5 days.", "Please send a photo of the damage.",
              "thanks"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(ModelArgs(model=MODEL, dtype="float32"))


@pytest.fixture(scope="module")
def qdir(tmp_path_factory, tiny):
    """A qlearn-style folder: two random heads (seeded) over the tiny model's last-token φ."""
    model, _ = tiny
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("q")
    save_qheads(QHeads(model.config.hidden_size, 2, 16), out, MODEL, "last")
    return out


@pytest.fixture(scope="module")
def rmdir(tmp_path_factory):
    """A tiny reward model folder made by `chatrlhf reward train` (as tests/test_reward.py makes one), on 16 pairs."""
    where = tmp_path_factory.mktemp("rm")
    lines = (EXAMPLES / "preferences.jsonl").read_text().splitlines()
    (where / "pairs.jsonl").write_text("\n".join(lines[::len(lines) // 16][:16]) + "\n")
    return tiny_reward_model(where / "rm", "--data", where / "pairs.jsonl", "--eval-fraction", "0.25")


def phi_by_hand(model, tok, history, reply):
    """The trunk state at the reply's EOS after one plain forward pass of history + reply + EOS."""
    prompt = tok(render(tok, history, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ids = prompt + tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        return model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]


class Fixed(Reranker):
    def __init__(self, table):
        self.table = table

    def scores(self, histories, replies):
        return [self.table[y] for y in replies]


def test_pick_each_groups_flat_scores_back_and_ties_go_to_the_first():
    r = Fixed({"a": 1.0, "b": 3.0, "c": 3.0, "d": -2.0})
    assert r.pick(H1, ["a", "b", "c"]) == (1, [1.0, 3.0, 3.0])
    assert r.pick_each([H1, H2, H1], [["d"], ["c", "a"], ["a", "d", "b"]]) == \
        [(0, [-2.0]), (0, [3.0, 1.0]), (2, [1.0, -2.0, 3.0])]
    with pytest.raises(ValueError):
        r.pick(H1, [])


def test_q_pick_is_the_argmax_of_q1_computed_by_hand(tiny, qdir):
    model, tok = tiny
    r = load_reranker(f"q:{qdir}", model, tok, policy_name=MODEL)
    assert isinstance(r, QReranker) and r.trunk is model  # the served policy is the trunk: reused, not reloaded
    assert "reused" in r.describe and "Q_1" in r.describe
    head = r.heads.online[0]
    with torch.no_grad():
        by_hand = [float(head[2](torch.relu(head[0](phi_by_hand(model, tok, H2, y))))) for y in CANDIDATES]
    index, scores = r.pick(H2, CANDIDATES)
    assert scores == pytest.approx(by_hand, abs=1e-4)
    assert index == max(range(len(by_hand)), key=by_hand.__getitem__)
    assert len(set(round(s, 6) for s in scores)) == len(CANDIDATES)  # the candidates really are told apart


def linear_heads(d: int, j: int, sign2: float) -> QHeads:
    """Q_1 = φ_j exactly and Q_2 = sign2·φ_j: hidden units relu(φ_j) and relu(−φ_j), out = u₁ − u₂ (ReLU MLP)."""
    heads = QHeads(d, 2, 2)
    with torch.no_grad():
        for i, h in enumerate(heads.online):
            h[0].weight.zero_()
            h[0].weight[0, j], h[0].weight[1, j] = 1.0, -1.0
            h[0].bias.zero_()
            s = 1.0 if i == 0 else sign2
            h[2].weight.copy_(torch.tensor([[s, -s]]))
            h[2].bias.fill_(0.25)
    heads.hard_update()
    return heads


def test_a_head_linear_in_phi_picks_the_reply_with_the_largest_coordinate(tiny, tmp_path):
    model, tok = tiny
    j = 3
    save_qheads(linear_heads(model.config.hidden_size, j, -1.0), tmp_path, MODEL, "last")
    r = load_reranker(f"q:{tmp_path}", model, tok, policy_name=MODEL)
    coord = [float(phi_by_hand(model, tok, H1, y)[j]) for y in CANDIDATES]
    index, scores = r.pick(H1, CANDIDATES)
    assert scores == pytest.approx([c + 0.25 for c in coord], abs=1e-4)  # Q_1 = φ_j + 0.25
    assert index == max(range(len(coord)), key=coord.__getitem__)
    # Q_2 = −φ_j: the min over heads, 0.25 − |φ_j|, would pick the smallest |φ_j| instead; we rank by Q_1
    by_min = max(range(len(coord)), key=lambda i: -abs(coord[i]))
    assert by_min != index


def test_heads_on_phi_and_text_features_score_phi_j_plus_the_length_column(tiny, tmp_path):
    """--features both: the heads read [φ, ψ] with ψ scaled by TEXT_SCALE; a linear Q_1 = φ_j + length/32 (its ψ weight
    1/TEXT_SCALE) scores each candidate by hand, the candidates of one history forming its set."""
    model, tok = tiny
    d, j = model.config.hidden_size, 3
    heads = make_heads("both", d, 2, hidden=0)
    with torch.no_grad():
        for h in heads.online:
            h[0].weight.zero_()
            h[0].bias.zero_()
            h[0].weight[0, j] = 1.0
            h[0].weight[0, d + TEXT_FEATURES.index("length")] = 1.0 / TEXT_SCALE
    save_qheads(heads, tmp_path, MODEL, "last", "both")
    r = load_reranker(f"q:{tmp_path}", model, tok, policy_name=MODEL)
    assert r.trunk is model and "text features" in r.describe
    by_hand = [float(phi_by_hand(model, tok, H2, y)[j]) + len(text_words(y)) / 32 for y in CANDIDATES]
    index, scores = r.pick(H2, CANDIDATES)
    assert scores == pytest.approx(by_hand, abs=1e-4) and index == max(range(5), key=by_hand.__getitem__)
    meta = json.loads((tmp_path / "qlearn.json").read_text())
    (tmp_path / "qlearn.json").write_text(json.dumps({**meta, "features": "words"}))
    with pytest.raises(UsageError, match="features 'words'"):
        load_reranker(f"q:{tmp_path}", model, tok, policy_name=MODEL)


def test_q_trunk_not_the_served_model_is_loaded_and_scores_the_same(tiny, qdir):
    model, tok = tiny
    alone = load_reranker(f"q:{qdir}", device="cpu")  # no policy given: the trunk of qlearn.json is loaded
    assert alone.trunk is not model and "loaded" in alone.describe
    shared = load_reranker(f"q:{qdir}", model, tok, policy_name="some-other-name")
    assert shared.trunk is not model
    served = load_reranker(f"q:{qdir}", model, tok, policy_name=MODEL)
    histories = [H1] * 3 + [H2] * 2
    assert alone.scores(histories, CANDIDATES) == pytest.approx(served.scores(histories, CANDIDATES), abs=1e-4)


def test_q_trunk_rendered_otherwise_than_served_is_loaded_as_qlearn_rendered_it(tiny, qdir, tmp_path):
    """qlearn's recorded config (chatrlhf.json) says how φ was computed: a policy served with another chat template
    is not reused as the trunk, and the recorded max_prompt_length is kept."""
    model, tok = tiny
    shutil.copytree(qdir, tmp_path / "q")
    (tmp_path / "q" / "chatrlhf.json").write_text(json.dumps(
        {"command": "qlearn", "config": {"chat_template": False, "max_prompt_length": 77, "max_new_tokens": 300}}))
    r = load_reranker(f"q:{tmp_path / 'q'}", model, tok, policy_name=MODEL, chat_template=True)
    assert r.trunk is not model and r.max_prompt_length == 77 and r.max_reply_length == 301
    same = load_reranker(f"q:{tmp_path / 'q'}", model, tok, policy_name=MODEL, chat_template=False)
    assert same.trunk is model


def test_rm_pick_is_the_argmax_of_reward_model_scores(rmdir):
    # fp32 on both sides: bf16 (auto, where the CPU has it) rounds a padded batch otherwise than one reply alone
    r = load_reranker(f"rm:{rmdir}", dtype="float32", log=lambda m: None)
    assert isinstance(r, RMReranker) and "best-of-N" in r.describe
    model, tok = load_reward_model(ModelArgs(model=str(rmdir), dtype="float32"))
    independent = [reward_scores(model, tok, [H2], [y])[0] for y in CANDIDATES]  # one at a time, no batching
    index, scores = r.pick(H2, CANDIDATES)
    assert scores == pytest.approx(independent, abs=1e-4)
    assert index == max(range(len(independent)), key=independent.__getitem__)


def test_bad_specs_and_folders_of_the_wrong_kind_are_named(tiny, qdir, rmdir, tmp_path):
    model, tok = tiny
    cases = [("x:foo", "unknown reranker"), ("q", "unknown reranker"), ("q:", "unknown reranker"),
             (f"q:{tmp_path / 'nope'}", "not found"),
             (f"q:{rmdir}", "qlearn.json not found"), (f"rm:{qdir}", "config.json not found")]
    for spec, words in cases:
        with pytest.raises(UsageError, match=words):
            load_reranker(spec, model, tok, policy_name=MODEL)
    with pytest.raises(UsageError, match="use rm:DIR") as e:
        load_reranker(f"q:{rmdir}", model, tok, policy_name=MODEL)
    assert "chatrlhf qlearn --output-dir" in str(e.value)
    with pytest.raises(UsageError, match="use q:DIR") as e:
        load_reranker(f"rm:{qdir}", model, tok, policy_name=MODEL)
    assert "chatrlhf reward train --output-dir" in str(e.value)
    save_model(model, tok, tmp_path / "lm")  # a causal LM folder is no reward model
    with pytest.raises(UsageError, match="not a reward model"):
        load_reranker(f"rm:{tmp_path / 'lm'}")
    save_qheads(QHeads(32, 2, 4), tmp_path / "q32", MODEL, "last")  # heads for a 32-d trunk; tiny llama's is 64-d
    with pytest.raises(UsageError, match="hidden size 64"):
        load_reranker(f"q:{tmp_path / 'q32'}", model, tok, policy_name=MODEL)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "qlearn.json").write_text("{}")  # a run that never finished: no heads
    with pytest.raises(UsageError, match="qheads.safetensors not found"):
        load_reranker(f"q:{tmp_path / 'half'}", model, tok, policy_name=MODEL)


# --------------------------------------------------------------------------- the CLI end to end


def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("Where is my order?\nDo you ship to Canada?\nHow do I reset my password?\n")
    return p


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


GEN = ["generate", "--model", MODEL, "--max-new-tokens", "6", "--seed", "3"]


def test_one_candidate_is_plain_generation_with_the_same_seed(tmp_path, qdir):
    p = prompts_file(tmp_path)
    plain = run_cli(*GEN, "--prompts", p, "--out", tmp_path / "a.jsonl")
    one = run_cli(*GEN, "--prompts", p, "--out", tmp_path / "b.jsonl", "--rerank", f"q:{qdir}", "--candidates", "1")
    assert plain.returncode == 0 and one.returncode == 0, (plain.stderr, one.stderr)
    a, b = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert set(a[0]) == {"prompt", "response"}  # without --rerank nothing changes
    assert all(r["candidates"] == 1 and isinstance(r["score"], float) for r in b)
    say = "bye\n/quit\n"
    chat_plain = run_cli("chat", "--model", MODEL, "--max-new-tokens", "5", input="hello\n" + say)
    chat_one = run_cli("chat", "--model", MODEL, "--max-new-tokens", "5", "--rerank", f"q:{qdir}", "--candidates",
                       "1", input="hello\n" + say)
    replies = [[line.split("  [score")[0] for line in r.stdout.splitlines() if "bot> " in line]
               for r in (chat_plain, chat_one)]
    assert len(replies[0]) == 2 and replies[0] == replies[1]


def test_generate_with_rm_records_the_best_score_of_n(tmp_path, rmdir):
    p = prompts_file(tmp_path)
    out = tmp_path / "g.jsonl"
    r = run_cli(*GEN, "--prompts", p, "--out", out, "--rerank", f"rm:{rmdir}", "--candidates", "4", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert f"reranking 4 candidates per reply by rm:{rmdir}" in r.stdout and "best of 4" in r.stdout
    got = rows(out)
    assert len(got) == 3 and all(x["candidates"] == 4 for x in got)
    model, tok = load_reward_model(ModelArgs(model=str(rmdir), dtype="float32"))
    again = reward_scores(model, tok, [x["prompt"] for x in got], [x["response"] for x in got])
    assert [x["score"] for x in got] == pytest.approx(again, abs=1e-3)  # the recorded score is the kept reply's


def test_chat_reranks_every_turn(qdir):
    r = run_cli("chat", "--model", MODEL, "--max-new-tokens", "4", "--rerank", f"q:{qdir}", "--candidates", "3",
                input="Hello\nWhere is my order?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "reranking 3 candidates per reply by q:" in r.stdout and "reused" in r.stdout
    assert r.stdout.count("bot> ") == 2 and r.stdout.count("best of 3]") == 2


def test_cli_refuses_bad_rerank_settings(tmp_path, rmdir):
    p = prompts_file(tmp_path)
    base = [*GEN, "--prompts", p, "--out", tmp_path / "x.jsonl"]
    r = run_cli(*base, "--candidates", "4")
    assert r.returncode == 2 and "--candidates 4 without --rerank does nothing" in r.stderr
    r = run_cli("chat", "--model", MODEL, "--candidates", "2", input="/quit\n")
    assert r.returncode == 2 and "without --rerank" in r.stderr
    r = run_cli(*base, "--rerank", f"rm:{rmdir}", "--candidates", "0")
    assert r.returncode == 2 and "--candidates 0: must be ≥ 1" in r.stderr
    r = run_cli(*base, "--rerank", f"best:{rmdir}")
    assert r.returncode == 2 and "unknown reranker" in r.stderr and "q:DIR" in r.stderr
    r = run_cli(*base, "--rerank", f"q:{rmdir}")
    assert r.returncode == 2 and "qlearn.json not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.jsonl").exists()
