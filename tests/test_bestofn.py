"""`chatrlhf bestofn`: the selection on hand-made scores (best, threshold, min-gap, ties, pairs, empty replies), the
raw weighted score, the SFT config it builds; on the tiny model with reward −len(reply): every kept reply is its
prompt's best sample, best.jsonl loads in `chatrlhf sft`'s reader and pairs.jsonl in `chatrlhf dpo`'s, --sft
--rounds 2 leaves a model plain transformers loads; bad flags get clear errors; SIGKILL + --resume writes the same
files byte for byte."""

import json

import pytest

from chatrlhf.config import BestOfNConfig, DPOConfig
from chatrlhf.trainers.bestofn import choose, raw_weighted, sft_config
from conftest import kill_at_first_checkpoint, run_cli

SHORT = "def short(prompts, responses):\n    return [-float(len(r)) for r in responses]\n"
PROMPTS = ["Where is my order?", "Do you ship to Canada?", "How do I reset my password?", "Can I pay by card?"]


# --------------------------------------------------------------------------- selection (pure)


def test_best_is_the_highest_total_and_the_pair_is_best_vs_worst():
    c = choose([0.5, 2.0, -1.0, 1.0], [5, 20, -10, 10], ["a", "b", "c", "d"])
    assert c.kept == [1] and c.pair == (1, 2) and c.gap == 30


def test_ties_take_the_first_sample_and_a_tied_prompt_gives_no_pair():
    c = choose([1.0, 3.0, 3.0, 1.0], [1, 3, 3, 1], ["a", "b", "c", "d"])
    assert c.kept == [1] and c.pair == (1, 0)                       # first of the tied best, first of the tied worst
    c = choose([2.0, 2.0, 2.0], [2, 2, 2], ["a", "b", "c"])
    assert c.kept == [0] and c.pair is None and c.gap == 0          # kept for SFT, no preference in a tie
    c = choose([2.0, 1.0], [2, 1], ["same", " same "])
    assert c.kept == [0] and c.pair is None                          # the same text twice is no pair


def test_threshold_keeps_every_reply_at_or_above_it_on_the_raw_score():
    # the totals rank 2 > 0 > 1 > 3; the raw scores decide the threshold (3 is kept, 0 is not)
    c = choose([1.0, 0.0, 2.0, -1.0], [0.4, 0.5, 0.9, 0.5], ["a", "b", "c", "d"], keep="threshold", threshold=0.5)
    assert c.kept == [1, 2, 3] and c.pair == (2, 3) and c.gap == pytest.approx(0.4)
    c = choose([1.0, 0.0], [0.4, 0.3], ["a", "b"], keep="threshold", threshold=0.5)
    assert c.kept == [] and c.pair == (0, 1)                        # nothing above it, the pair still stands


def test_min_gap_drops_the_prompt_its_replies_and_its_pair():
    scores, raw, texts = [1.0, 0.0], [1.5, 1.0], ["a", "b"]
    assert choose(scores, raw, texts, min_gap=0.6).kept == [] and choose(scores, raw, texts, min_gap=0.6).pair is None
    assert choose(scores, raw, texts, min_gap=0.5).kept == [0]      # the gap is 0.5: at least 0.5 passes
    assert choose(scores, raw, texts, keep="threshold", threshold=0, min_gap=0.6).kept == []


def test_empty_replies_are_never_chosen():
    c = choose([9.0, 1.0, 0.0, 9.0], [9, 1, 0, 9], ["", "a", "b", "  "])
    assert c.kept == [1] and c.pair == (1, 2)
    assert choose([1.0, 2.0], [1, 2], ["", " "]) .kept == [] and choose([1.0], [1], [""]).pair is None


def test_raw_weighted_score_sums_weighted_sources_minus_the_eos_penalty():
    raw = {"fn": [1.0, 2.0, 3.0], "human": [0.5, None, -1.0]}
    got = raw_weighted(raw, {"fn": 2.0, "human": 4.0}, [True, True, False], penalty=1.0)
    assert got == [2 * 1 + 4 * 0.5, 2 * 2, 2 * 3 + 4 * -1 - 1]     # None: no opinion, adds 0


def test_the_sft_config_takes_the_fine_tuning_flags_and_the_round_model(tmp_path):
    cfg = BestOfNConfig(model="base", output_dir=str(tmp_path), lr=1e-4, epochs=2.0, sft_batch_size=3, max_length=99,
                        lora_r=4, lora_alpha=8, chat_template=False, seed=5, sft=True, rounds=2)
    one, two = sft_config(cfg, 1, resume=False), sft_config(cfg, 2, resume=True)
    assert one.model == "base" and two.model == str(tmp_path / "round-1" / "model")
    assert two.data == [str(tmp_path / "round-2" / "best.jsonl")] and two.output_dir == str(tmp_path / "round-2" / "model")
    assert (one.lr, one.epochs, one.batch_size, one.max_length, one.lora_r, one.lora_alpha, one.chat_template,
            one.seed, one.eval_fraction, one.resume, two.resume) == (1e-4, 2.0, 3, 99, 4, 8, False, 5, 0.0, False, True)


# --------------------------------------------------------------------------- on the tiny model


@pytest.fixture
def fn(write):
    return f"{write('rew.py', SHORT)}:short"


@pytest.fixture
def prompts(write):
    """TRL's prompt-only rows (what GRPO users have), one a conversation."""
    rows = [{"prompt": p} for p in PROMPTS[:3]] + [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                    "content": "Hello!"}, {"role": "user", "content": PROMPTS[3]}]}]
    return write("prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def bestofn_args(out, fn, prompts, *extra):
    return ["bestofn", "--model", "tiny-random-llama", "--data", prompts, "--reward-fn", fn, "--output-dir", out,
            "--quiet", "--no-tensorboard", "--num-samples", "4", "--batch-size", "2", "--max-new-tokens", "6",
            "--missing-eos-penalty", "0", *extra]


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_kept_replies_are_each_prompts_best_and_load_in_sft_and_dpo(tmp_path, fn, prompts):
    from chatrlhf.data.pairs import load_pairs
    from chatrlhf.trainers.sft import load_conversations

    out = tmp_path / "b"
    r = run_cli(*bestofn_args(out, fn, prompts))
    assert r.returncode == 0, r.stderr
    samples, best = rows(out / "round-1" / "samples.jsonl"), rows(out / "round-1" / "best.jsonl")
    assert len(samples) == 4 * 4 and len(best) <= 4
    for row in best:                                    # reward −len: the shortest non-empty reply of its prompt
        prompt = row["messages"][:-1]
        mine = [s for s in samples if s["prompt"] == prompt and s["reply"].strip()]
        assert row["provenance"]["raw_score"] == max(s["provenance"]["raw_score"] for s in mine)
        assert row["provenance"]["scores"]["fn"] == -len(row["messages"][-1]["content"])
        assert {"model", "round", "sample", "samples", "seed", "score"} <= set(row["provenance"])
    all_mean = sum(s["provenance"]["scores"]["fn"] for s in samples) / len(samples)
    kept_mean = sum(b["provenance"]["scores"]["fn"] for b in best) / len(best)
    assert kept_mean >= all_mean
    summary = json.loads((out / "chatrlhf.json").read_text())["rounds"][0]
    assert summary["by_source"]["fn"]["kept"] == pytest.approx(kept_mean)
    assert summary["by_source"]["fn"]["all"] == pytest.approx(all_mean) and summary["kept"] == len(best)
    assert f"kept {len(best)} replies of 4 prompts × 4 samples" in r.stdout and "fn " in r.stdout
    convs, fmt = load_conversations([str(out / "round-1" / "best.jsonl")], "auto")     # `chatrlhf sft --data`
    assert fmt == "conversation" and [c.messages for c in convs] == [b["messages"] for b in best]
    pairs, _ = load_pairs([str(out / "round-1" / "pairs.jsonl")], DPOConfig(), command="dpo")   # `chatrlhf dpo --data`
    written = rows(out / "round-1" / "pairs.jsonl")
    assert [(p.chosen, p.rejected) for p in pairs] == [(w["chosen"], w["rejected"]) for w in written] and written
    assert all(w["chosen_score"] > w["rejected_score"] and not p.tie for p, w in zip(pairs, written))
    config = json.loads((out / "run_config.json").read_text())
    assert config["num_samples"] == 4 and config["keep"] == "best" and config["rounds"] == 1


def test_sft_rounds_2_leaves_a_model_plain_transformers_loads(tmp_path, fn, prompts):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "r2"
    r = run_cli(*bestofn_args(out, fn, prompts, "--sft", "--rounds", "2", "--sft-batch-size", "4", "--lr", "1e-3"))
    assert r.returncode == 0, r.stderr
    assert "fine-tuned model saved to" in r.stdout
    second = rows(out / "round-2" / "best.jsonl")
    assert second and all(b["provenance"]["model"] == str(out / "round-1" / "model") for b in second)
    assert all(b["provenance"]["round"] == 2 for b in second)
    for folder in (out / "round-1" / "model", out / "round-2" / "model", out):
        assert AutoModelForCausalLM.from_pretrained(folder) is not None


def test_bad_flags_get_clear_errors(tmp_path, fn, prompts):
    cases = [(["--rounds", "2"], "--rounds 2 without --sft"),
             (["--num-samples", "1"], "--num-samples 1: must be at least 2"),
             (["--keep", "threshold"], "--keep threshold needs --threshold"),
             (["--threshold", "0.5"], "--threshold acts only with --keep threshold"),
             (["--lora-r", "4"], "--lora-r acts only with --sft"),
             (["--temperature", "0"], "must be > 0"),
             (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
             (["--min-gap", "-1"], "--min-gap -1.0: must be ≥ 0")]
    for flags, message in cases:
        r = run_cli(*bestofn_args(tmp_path / "x", fn, prompts, *flags))
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)
        assert "Traceback" not in r.stderr
    r = run_cli("bestofn", "--model", "tiny-random-llama", "--data", prompts, "--output-dir", tmp_path / "y")
    assert r.returncode == 2 and "bestofn needs at least one reward source" in r.stderr


@pytest.mark.slow
def test_sigkill_then_resume_writes_the_same_files(tmp_path, fn, prompts):
    """Killed at its first checkpoint (batch 1 of round 1), resumed: round 1's rest, its SFT and round 2 come out
    byte for byte as the uninterrupted run's."""
    args = ["--sft", "--rounds", "2", "--seed", "3", "--dtype", "float32", "--sft-batch-size", "4", "--lr", "1e-3"]
    ref = tmp_path / "ref"
    r = run_cli(*bestofn_args(ref, fn, prompts, *args))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(bestofn_args(out, fn, prompts, *args), out)
    assert killed_at < 4
    r = run_cli(*bestofn_args(out, fn, prompts, *args, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    for k in (1, 2):
        for name in ("best", "pairs", "samples"):
            want = (ref / f"round-{k}" / f"{name}.jsonl").read_text().replace(str(ref), str(out))
            assert (out / f"round-{k}" / f"{name}.jsonl").read_text() == want, (k, name)
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_top_p_reaches_the_engine(tmp_path, fn, prompts):
    """A nucleus of the top token only is greedy decoding: a prompt's N replies are the same text, so the first is
    kept and there is no pair (a tie)."""
    out = tmp_path / "greedy"
    r = run_cli(*bestofn_args(out, fn, prompts, "--top-p", "0.0001"))
    assert r.returncode == 0, r.stderr
    samples = rows(out / "round-1" / "samples.jsonl")
    for j in range(4):
        assert len({s["reply"] for s in samples[4 * j:4 * j + 4]}) == 1
    assert rows(out / "round-1" / "pairs.jsonl") == [] and ", 0 pairs" in r.stdout
    assert all(b["provenance"]["sample"] == 0 for b in rows(out / "round-1" / "best.jsonl"))
