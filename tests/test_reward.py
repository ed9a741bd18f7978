"""Reward model: hand-computed losses and metrics, pair construction, smoke runs and the gate."""
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from chatrlhf import losses
from chatrlhf.config import ModelArgs
from chatrlhf.data.pairs import build_pairs, rating_pairs
from chatrlhf.data.records import Correction, Preference, Rating
from chatrlhf.evaluate.metrics import expected_calibration_error, pairwise_ece
from chatrlhf.reward_model import check_gate, load_reward_model, pad_right, raw_scores, reward_norm, reward_scores
from conftest import EXAMPLES, kill_at_first_checkpoint, run_cli

Q = [{"role": "user", "content": "q"}]
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_bradley_terry_hand_computed():
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    loss, m = losses.bradley_terry_loss(c, r)
    want = (-math.log(sig(1.0)) - math.log(sig(-2.0))) / 2
    assert math.isclose(float(loss), want, rel_tol=1e-6)
    assert float(m["reward/accuracy"]) == 0.5 and math.isclose(float(m["reward/margin"]), -0.5)


def test_bradley_terry_margin_and_weight():
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    loss, _ = losses.bradley_terry_loss(c, r, margin=torch.tensor([0.5, 1.0]), weight=torch.tensor([3.0, 1.0]))
    want = (3 * -math.log(sig(1.0 - 0.5)) + 1 * -math.log(sig(-2.0 - 1.0))) / 4
    assert math.isclose(float(loss), want, rel_tol=1e-6)


def test_tie_pulls_toward_equal_scores():
    d = torch.tensor([0.0, 2.0], requires_grad=True)
    loss, m = losses.bradley_terry_loss(d, torch.zeros(2), tie=torch.tensor([True, True]))
    want = (math.log(2) + -0.5 * (math.log(sig(2.0)) + math.log(sig(-2.0)))) / 2
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-6)
    loss.backward()
    assert d.grad[0] == 0 and d.grad[1] > 0      # minimal at equal scores; a gap is pushed back
    assert float(m["reward/accuracy"]) == 0       # ties are not counted as decided pairs


def test_rating_pairs_from_different_scores_of_one_prompt():
    ratings = [Rating(Q, "a", 5, weight=1.0), Rating(Q, "b", 3, weight=0.5), Rating(Q, "c", 3),
               Rating([{"role": "user", "content": "other"}], "d", 1),
               Rating(Q, "e", 1.0, scale="thumbs"), Rating(Q, "f", -1.0, scale="thumbs")]
    pairs = rating_pairs(ratings)
    got = sorted((p.chosen, p.rejected, p.weight) for p in pairs)
    # stars: a>b, a>c (b=c makes no pair), each weight divided by C(3, 2) = 3 — three rated replies, one prompt;
    # the other prompt has one rating; thumbs: e>f (C(2, 2) = 1), never mixed with stars
    assert got == [("a", "b", pytest.approx(0.75 / 3)), ("a", "c", pytest.approx(1 / 3)), ("e", "f", 1.0)]
    assert all(p.source == "rating" for p in pairs)


def test_a_prompt_with_many_ratings_counts_once():
    # K = 5 distinct stars for one prompt: C(5, 2) = 10 pairs of weight 1/10 — the prompt weighs 1, like the
    # single pair of a prompt with two ratings
    many = [Rating(Q, f"r{i}", i + 1) for i in range(5)]
    two = [Rating([{"role": "user", "content": "q2"}], "x", 5), Rating([{"role": "user", "content": "q2"}], "y", 1)]
    pairs = rating_pairs(many + two)
    by_prompt = {}
    for p in pairs:
        by_prompt[p.prompt[0]["content"]] = by_prompt.get(p.prompt[0]["content"], 0) + p.weight
    assert len(pairs) == 11 and by_prompt == {"q": pytest.approx(1.0), "q2": pytest.approx(1.0)}


def test_build_pairs_corrections_ties_both_bad_and_source_weights():
    recs = [Correction(Q, "bad", "good"), Preference(Q, "x", "y", tie=True), Preference(Q, "u", "v", both_bad=True),
            Preference(Q, "c", "r", weight=2.0)]
    pairs, counts = build_pairs(recs, {"preference": 0.5})
    corr = [p for p in pairs if p.source == "correction"][0]
    assert (corr.chosen, corr.rejected, corr.weight) == ("good", "bad", 1.0)
    assert counts["ties"] == 1 and counts["both_bad"] == 1
    both_bad = [p for p in pairs if p.chosen == "u"][0]
    assert both_bad.tie                                    # kept, trained as a tie
    assert [p.weight for p in pairs if p.chosen == "c"] == [1.0]   # 2.0 × preference weight 0.5
    dropped, counts = build_pairs(recs, ties="drop", both_bad="drop")
    assert len(dropped) == 2 and counts["dropped_ties"] == 1 and counts["dropped_both_bad"] == 1


def test_ece_tiny_case():
    # bin [0.6,0.7): p=0.6,0.6 both correct -> |1-0.6|=0.4, weight 2/4; bin [0.9,1]: p=0.9 correct, p=0.9 wrong
    # -> |0.5-0.9| = 0.4, weight 2/4. ECE = 0.4
    assert math.isclose(expected_calibration_error(np.array([0.6, 0.6, 0.9, 0.9]), np.array([1, 1, 1, 0])), 0.4)
    # a perfectly calibrated model: confidence 0.75, right 3 times out of 4
    assert math.isclose(expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0])), 0.0)
    # pairwise: margins ±ln 3 give confidence 0.75; 3 of 4 positive -> accuracy 0.75 -> calibrated
    assert math.isclose(pairwise_ece(np.array([1, 1, 1, -1]) * math.log(3)), 0.0, abs_tol=1e-9)
    # all four right at confidence 0.75: under-confident by 0.25
    assert math.isclose(pairwise_ece(np.ones(4) * math.log(3)), 0.25, abs_tol=1e-9)


def test_head_init_and_last_token_score_matches_transformers():
    model, tok = load_reward_model(ModelArgs(model="tiny-random-llama"))
    w = model.score.weight.detach()
    d = w.shape[1]
    assert abs(float(w.std()) - 1 / math.sqrt(d + 1)) < 0.05
    seqs = [tok("a short one")["input_ids"], tok("a somewhat longer reply here")["input_ids"]]
    batch = pad_right(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours = raw_scores(model, batch)
        theirs = model(**batch).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_reward_model_may_use_another_tokenizer_than_the_policy():
    # The policy (tiny llama, ChatML) writes a reply as token ids; a reward model with another vocabulary and
    # template (tiny gpt2) scores the decoded text through its own tokenizer, and the score is that of a plain
    # transformers forward pass on the RM's own tokenisation of prompt + reply.
    from chatrlhf.data.template import render

    policy_tok = load_reward_model(ModelArgs(model="tiny-random-llama"))[1]
    rm, rm_tok = load_reward_model(ModelArgs(model="tiny-random-gpt2"))
    assert rm_tok.get_vocab() != policy_tok.get_vocab() and rm_tok.chat_template != policy_tok.chat_template
    reply = "It ships today, sorry for the wait."
    policy_ids = policy_tok(reply, add_special_tokens=False)["input_ids"]
    rm_ids = rm_tok(reply, add_special_tokens=False)["input_ids"]
    assert policy_ids != rm_ids                       # the two tokenizers really do cut the text differently
    ours = reward_scores(rm, rm_tok, [Q], [policy_tok.decode(policy_ids)], normalise=False)[0]
    text = render(rm_tok, Q + [{"role": "assistant", "content": reply}])
    with torch.no_grad():
        theirs = float(rm(**rm_tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
    assert ours == pytest.approx(theirs, abs=1e-5)


def train_tiny(tmp_path, *extra):
    out = tmp_path / "rm"
    r = run_cli("reward", "train", "--model", "tiny-random-llama", "--output-dir", out, "--quiet", "--no-tensorboard",
                "--data", f"{EXAMPLES / 'preferences.jsonl'},{EXAMPLES / 'ratings.jsonl'},{EXAMPLES / 'corrections.jsonl'}",
                *extra)
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.slow
def test_reward_train_smoke_every_parameter_changes_and_norm_is_fitted(tmp_path):
    out, r = train_tiny(tmp_path, "--recipe", "full", "--max-steps", "40", "--batch-size", "4", "--lr", "1e-3")
    trained = AutoModelForSequenceClassification.from_pretrained(out)   # plain transformers loads it
    init, _ = load_reward_model(ModelArgs(model="tiny-random-llama"))
    before = dict(init.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    gain, bias = reward_norm(trained)
    assert gain > 0 and gain != 1.0
    # normalisation: the reference set — by default 256 of the training pairs, both replies — scores mean 0, std 1
    from chatrlhf.config import RewardTrainConfig
    from chatrlhf.data import split_by_prompt
    from chatrlhf.data.pairs import load_pairs
    from chatrlhf.trainers.reward import sample_pairs

    cfg = RewardTrainConfig(data=[str(EXAMPLES / f) for f in ("preferences.jsonl", "ratings.jsonl", "corrections.jsonl")])
    train_pairs, _ = split_by_prompt(load_pairs(cfg.data, cfg)[0], cfg.eval_fraction, cfg.seed)
    reference = sample_pairs(train_pairs, 256, cfg.seed)
    assert len(reference) == 256 < len(train_pairs)
    model, tok = load_reward_model(ModelArgs(model=str(out)))
    s = np.array(reward_scores(model, tok, [p.prompt for p in reference for _ in (0, 1)],
                               [x for p in reference for x in (p.chosen, p.rejected)]))
    assert abs(s.mean()) < 1e-4 and abs(s.std() - 1) < 1e-4
    report = json.loads((out / "eval.json").read_text())
    assert {"accuracy", "ece", "length_corr", "per_source", "chosen_score", "gate"} <= set(report)
    assert (out / "eval.png").stat().st_size > 1000


def test_gate_refuses_a_random_model(tmp_path):
    out, r = train_tiny(tmp_path, "--max-steps", "1", "--lr", "0", "--min-accuracy", "0.99")
    reasons = check_gate(out)
    assert reasons and "below 0.99" in reasons[0]
    assert "gate: FAILED" in r.stdout
    assert check_gate(tmp_path / "nowhere")[0].endswith("(run `chatrlhf reward eval`)")


@pytest.mark.slow
def test_reward_score_and_eval_cli(tmp_path):
    out, _ = train_tiny(tmp_path, "--max-steps", "2")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Where is my order?", "response": "It ships today."}\n'
                    '{"prompt": "Where is my order?", "response": "No idea."}\n')
    scored = tmp_path / "scored.jsonl"
    r = run_cli("reward", "score", "--model", out, "--data", rows, "--out", scored)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(got) == 2 and all(isinstance(x["score"], float) for x in got)
    r = run_cli("reward", "eval", "--model", out, "--data", EXAMPLES / "preferences.jsonl")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[1]
    assert first.startswith("chatrlhf reward: accuracy ") and "whose prompts the model was not trained on" in first
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    r = run_cli("reward", "score", "--model", out, "--data", bad, "--out", tmp_path / "x.jsonl")
    assert r.returncode == 2 and f"{bad}:1: field 'response': missing column" in r.stderr


def test_identical_pairs_are_reported_and_skipped(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "q", "chosen": "same", "rejected": "same"}\n'
                    '{"prompt": "q2", "chosen": "good", "rejected": "bad"}\n'
                    '{"prompt": "q3", "chosen": "fine", "rejected": "poor"}\n')
    r = run_cli("reward", "train", "--model", "tiny-random-gpt2", "--data", data, "--output-dir", tmp_path / "rm",
                "--quiet", "--no-tensorboard", "--eval-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert f"{data}:1: chosen and rejected are identical: skipped" in r.stdout
    assert "2 train / 0 held-out pairs" in r.stdout


def test_reward_bad_input_names_file_line_field(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "", "rejected": "b"}\n')
    r = run_cli("reward", "train", "--model", "tiny-random-gpt2", "--data", data, "--output-dir", tmp_path / "rm")
    assert r.returncode == 2 and f"{data}:2: field 'chosen': empty reply" in r.stderr
    assert not (tmp_path / "rm").exists()
    r = run_cli("reward", "train", "--model", "tiny-random-gpt2", "--data", data, "--source-weights", "votes=2")
    assert r.returncode == 2 and "--source-weights: unknown source 'votes'" in r.stderr
    r = run_cli("reward", "train", "--model", "tiny-random-gpt2", "--data", data, "--source-weights", "rating=lots")
    assert r.returncode == 2 and "--source-weights: 'rating=lots': 'lots' is not a float" in r.stderr


def test_train_top_layers_freezes_embeddings_and_lower_blocks():
    from chatrlhf.models import train_top_layers

    model, _ = load_reward_model(ModelArgs(model="tiny-random-llama"), trainable=True)
    train_top_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm", "score")) for n in trainable)
    assert any(n.startswith("score") for n in trainable)
    full, _ = load_reward_model(ModelArgs(model="tiny-random-gpt2"), trainable=True)
    train_top_layers(full, -1)
    assert all(p.requires_grad for p in full.parameters())


def test_distinct_n_bootstrap_and_win_rate_hand_computed():
    from chatrlhf.evaluate.metrics import bootstrap_ci, distinct_n, prompt_win_rates

    # "a b a b": bigrams (a b), (b a), (a b) → 2 unique of 3; unigrams 2 of 4
    assert distinct_n(["a b a b"], 2) == 2 / 3 and distinct_n(["a b", "a b"], 1) == 0.5
    assert distinct_n([""], 2) == 0.0
    assert prompt_win_rates([3, 1, 2], [1, 1, 5], 1) == [1.0, 0.5, 0.0]
    # two replies per prompt: prompt 1 (3, 1) vs (2, 1): pairs 3>2, 3>1, 1<2, 1=1 → (1 + 1 + 0 + 0.5) / 4
    assert prompt_win_rates([3, 1, 0, 0], [2, 1, 5, 5], 2) == [0.625, 0.0]
    mean, lo, hi = bootstrap_ci([1.0] * 10)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    mean, lo, hi = bootstrap_ci([0.0, 1.0] * 50, seed=1)
    assert mean == 0.5 and 0.38 < lo < 0.5 < hi < 0.62  # ± ~1.96 · 0.05


def test_ece_is_measured_on_the_raw_bradley_terry_probability():
    # A perfectly calibrated scorer: raw scores with std 3, the human picks reply a with probability σ(a − b).
    from chatrlhf.reward_model import pair_metrics

    rng = np.random.default_rng(0)
    n = 20000
    a, b = rng.normal(0, 3, n), rng.normal(0, 3, n)
    a_chosen = rng.random(n) < 1 / (1 + np.exp(-(a - b)))
    chosen, rejected = np.where(a_chosen, a, b), np.where(a_chosen, b, a)
    pairs = [Preference(Q, "c", "r")] * n
    gain = 1 / np.concatenate([a, b]).std()                      # the stored normalisation: std 1
    m = pair_metrics(chosen, rejected, pairs, [1] * (2 * n), gain=gain, bias=0.0)
    assert m["ece"] < 0.02, m["ece"]
    assert pairwise_ece(gain * (chosen - rejected)) > 0.1       # on the rescaled margins it looks miscalibrated
    assert m["chosen_score"]["std"] == pytest.approx(gain * chosen.std())   # scores are reported normalised


def test_ece_exact_ties_count_half_and_margins_shift_the_logit():
    from chatrlhf.reward_model import pair_metrics

    assert pairwise_ece(np.zeros(4)) == 0.0                      # confidence ½, counted half right: calibrated
    same = pair_metrics(np.ones(4), np.ones(4), [Preference(Q, "c", "r")] * 4, [1] * 8)
    assert same["accuracy"] == 0.5 and same["ece"] == 0.0
    # raw difference 2 ln 3 on all four pairs, all right; margin ln 3. Trained with margins, the model's probability
    # is σ(2 ln 3 − ln 3) = 0.75 → ECE |1 − 0.75| = 0.25; without, σ(2 ln 3) = 0.9 → ECE 0.1
    pairs = [Preference(Q, "c", "r", margin=math.log(3))] * 4
    d = np.full(4, 2 * math.log(3))
    assert pair_metrics(d, np.zeros(4), pairs, [1] * 8, margin_loss=True)["ece"] == pytest.approx(0.25)
    assert pair_metrics(d, np.zeros(4), pairs, [1] * 8, margin_loss=False)["ece"] == pytest.approx(0.1)


@pytest.mark.slow
def test_gate_comes_only_from_held_out_data_and_reward_eval_never_replaces_it_unasked(tmp_path):
    fn = tmp_path / "rew.py"
    fn.write_text("def f(prompts, responses):\n    return [0.0 for r in responses]\n")
    out, r = train_tiny(tmp_path, "--max-steps", "1", "--lr", "0", "--min-accuracy", "0.99")
    assert "gate: FAILED" in r.stdout
    gate_before = (out / "eval.json").read_text()
    # a user evaluates on the training file with the defaults: pairs it was trained on are dropped, the report
    # goes beside the model, and the gate RL reads is unchanged
    r = run_cli("reward", "eval", "--model", out, "--data", EXAMPLES / "preferences.jsonl", "--min-accuracy", "0")
    assert r.returncode == 0, r.stderr
    assert "have a prompt the model was trained on: not used" in r.stdout
    assert (out / "reward-eval" / "eval.json").is_file() and (out / "eval.json").read_text() == gate_before
    ppo = ["ppo", "--model", "tiny-random-llama", "--reward-model", out, "--reward-fn", f"{fn}:f", "--max-steps", "1",
           "--output-dir", tmp_path / "ppo", "--quiet"]
    r = run_cli(*ppo)
    assert r.returncode == 2 and "did not pass the reward-model gate" in r.stderr
    # with --replace-gate the held-out evaluation becomes the gate, and records the split it used
    r = run_cli("reward", "eval", "--model", out, "--data", EXAMPLES / "preferences.jsonl", "--min-accuracy", "0",
                "--max-length-corr", "1", "--replace-gate")
    assert r.returncode == 0, r.stderr
    gate = json.loads((out / "eval.json").read_text())["gate"]
    assert gate["passed"] and gate["split"].startswith("held-out: ") and "not trained on" in gate["split"]


def test_no_held_out_data_fails_the_gate_and_trained_pairs_are_refused(tmp_path):
    out, r = train_tiny(tmp_path, "--max-steps", "1", "--eval-fraction", "0", "--min-accuracy", "0")
    assert "gate: FAILED" in r.stdout and "no held-out pairs" in r.stdout
    assert check_gate(out)
    record = json.loads((out / "chatrlhf.json").read_text())["training"]
    assert set(record["files"]) == {str(EXAMPLES / f) for f in ("preferences.jsonl", "ratings.jsonl", "corrections.jsonl")}
    assert all(len(h) == 64 for h in record["files"].values()) and record["prompt_groups"]
    r = run_cli("reward", "eval", "--model", out, "--data", EXAMPLES / "preferences.jsonl")
    assert r.returncode == 2 and "every pair's prompt was in" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("reward", "eval", "--model", out)
    assert r.returncode == 2 and "reward eval needs --data" in r.stderr


def test_reward_train_eval_data_is_the_held_out_set(tmp_path, write):
    held = write("held.jsonl", '{"prompt": "A brand new question?", "chosen": "A full answer.", "rejected": "No."}\n'
                               '{"prompt": "Where is my order?", "chosen": "Let me check.", "rejected": "No idea."}\n')
    out, r = train_tiny(tmp_path, "--max-steps", "1", "--eval-data", held)
    assert "1 --eval-data pairs share a prompt with training: not used" in r.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 1 and report["split"] == f"held-out: --eval-data {held}"


@pytest.mark.slow
def test_reward_train_sigkill_then_resume_gives_identical_losses(tmp_path):
    from chatrlhf.logger import read_metrics

    args = ["reward", "train", "--model", "tiny-random-llama", "--quiet", "--no-tensorboard", "--max-steps", "8",
            "--batch-size", "4", "--grad-accum", "2", "--save-steps", "2", "--lr", "1e-3", "--seed", "5"]
    ref = tmp_path / "ref"
    r = run_cli(*args, "--output-dir", ref)
    assert r.returncode == 0, r.stderr
    want = {m["step"]: m["train/bt"] for m in read_metrics(ref) if "train/bt" in m}
    out = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint([*args, "--output-dir", out], out)
    assert killed_at < 8
    r = run_cli(*args, "--output-dir", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    got = {m["step"]: m["train/bt"] for m in read_metrics(out) if "train/bt" in m}
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert json.loads((out / "eval.json").read_text())["accuracy"] == json.loads((ref / "eval.json").read_text())["accuracy"]
    # the saved reward model is the uninterrupted run's: weights, fitted normalisation, summary
    from safetensors.torch import load_file

    want_w, got_w = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got_w) == sorted(want_w)
    for k in want_w:
        assert torch.allclose(got_w[k], want_w[k], rtol=0, atol=1e-6), k
    norm = [json.loads((d / "config.json").read_text())["chatrlhf_reward_norm"] for d in (ref, out)]
    assert norm[1]["fitted_on"] == norm[0]["fitted_on"]
    assert norm[1]["gain"] == pytest.approx(norm[0]["gain"], rel=1e-5)
    assert norm[1]["bias"] == pytest.approx(norm[0]["bias"], abs=1e-5)
    summaries = [json.loads((d / "chatrlhf.json").read_text()) for d in (ref, out)]
    for key in ("command", "steps", "pairs", "held_out_pairs", "accuracy", "split", "gate"):
        assert summaries[1][key] == summaries[0][key], key


def test_a_reply_cut_at_the_token_limit_is_scored_without_an_end_of_turn():
    from chatrlhf.reward_model import encode_reply

    _, tok = load_reward_model(ModelArgs(model="tiny-random-llama"))
    full = tok.decode(encode_reply(tok, Q, "It ships", 512)[0])
    cut = tok.decode(encode_reply(tok, Q, "It ships", 512, ended=False)[0])
    assert full.rstrip().endswith("It ships<|im_end|>") and cut.endswith("It ships") and full.startswith(cut)
    _, gpt = load_reward_model(ModelArgs(model="tiny-random-gpt2"))       # the fallback User:/Assistant: template
    assert gpt.decode(encode_reply(gpt, Q, "It ships", 512, ended=False)[0]).endswith("Assistant: It ships")
