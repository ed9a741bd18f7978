"""`chatrlhf grpo` on tiny models: every trainable parameter moves and the output loads with plain transformers,
micro-batching changes memory and not the result, the reference (none at β 0, adapters off with LoRA), bad flags
get clear errors, SIGKILL + --resume reproduces the uninterrupted run, and GRPO and RLOO each raise a learnable
Python reward on held-out prompts while KL stays bounded."""

import json

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf.logger import read_metrics
from chatrlhf.trainers.run import checkpoints
from conftest import EXAMPLES, kill_at_first_checkpoint, run_cli

POLITE = "def polite(prompts, responses):\n    return [float(sum(w in r.lower() for w in ('thank', 'please', 'sorry', 'a'))) for r in responses]\n"
LETTERS = "def letters(prompts, responses):\n    return [r.lower().count('e') / 4 for r in responses]\n"


@pytest.fixture
def fn(write):
    return write("rew.py", POLITE + LETTERS)


@pytest.fixture
def held(write):
    return write("held.txt", "Where is my order?\nDo you ship to Canada?\n")


def grpo_args(out, fn, held, *extra, reward="polite"):
    return ["grpo", "--model", "tiny-random-llama", "--data", EXAMPLES / "dialogue_history.csv", "--eval-data", held,
            "--reward-fn", f"{fn}:{reward}", "--output-dir", out, "--quiet", "--no-tensorboard", "--batch-size", "2",
            "--num-generations", "4", "--max-new-tokens", "8", "--lr", "1e-3", *extra]


def test_smoke_every_trainable_parameter_changes_and_the_output_loads(tmp_path, fn, held):
    from transformers import AutoModelForCausalLM

    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model

    out = tmp_path / "grpo"
    r = run_cli(*grpo_args(out, fn, held, "--max-steps", "2", "--num-iterations", "2", "--minibatch-size", "4",
                           "--epsilon-high", "0.28", "--loss-type", "grpo", "--kl-bound", "-1"))
    assert r.returncode == 0, r.stderr
    assert "held-out reward by source: fn " in r.stdout and "4 optimizer step(s) per batch (ε 0.2/0.28)" in r.stdout
    # PPO's failure signs, read off GRPO's metrics (a bound below any KL makes one show at once, printed once)
    assert r.stdout.count("chatrlhf grpo: warning at step 1: KL to the reference per reply is 0.00, above --kl-bound") == 1
    metrics = [m for m in read_metrics(out) if "loss/policy" in m]
    assert len(metrics) == 2
    for m in metrics:
        for k in ("loss/policy", "objective/kl", "objective/kl_k3", "loss/kl_k3", "policy/entropy", "grpo/clipfrac",
                  "grpo/clip_high", "grpo/ratio_mean", "group/reward_mean", "group/reward_std", "group/zero_std_fraction",
                  "reward/fn_mean", "rollout/length", "rollout/logprob_mismatch", "reward/eos_rate"):
            assert isinstance(m[k], float) and m[k] == m[k], k
        assert m["train/optimizer_steps"] == 4 and "warning/kl_over_bound" in m
    start, _ = load_model(ModelArgs(model="tiny-random-llama"))
    before = dict(start.named_parameters())
    trained = load_file(checkpoints(out)[-1][1] / "policy.safetensors")
    assert trained.keys() == {n for n, p in before.items() if p.requires_grad}
    for name, value in trained.items():
        assert not torch.equal(value, before[name].detach()), f"{name} did not change"
    plain = AutoModelForCausalLM.from_pretrained(out)          # plain transformers, no chatrlhf code
    loaded = dict(plain.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in trained.items() if k in loaded) and len(loaded) > 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["num_generations"] == 4 and config["loss_type"] == "grpo" and config["epsilon"] is None
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 and {"step", "prompt", "reply", "reward", "reward_fn"} <= set(samples[0])


def test_micro_batches_change_memory_not_the_result(tmp_path, fn, held):
    """The loss of an optimizer step is normalised over the whole step, so 8 replies in micro-batches of 2 give the
    same step as one pass of 8 (per loss type, each with its own normaliser)."""
    for loss_type in ("grpo", "dr_grpo"):
        got = {}
        for micro in (2, 8):
            out = tmp_path / f"{loss_type}{micro}"
            r = run_cli(*grpo_args(out, fn, held, "--max-steps", "1", "--micro-batch-size", micro, "--dtype", "float32",
                                   "--loss-type", loss_type, "--eval-steps", "100"))
            assert r.returncode == 0, r.stderr
            m = next(x for x in read_metrics(out) if "loss/policy" in x)
            got[micro] = (m["loss/policy"], m["policy/grad_norm"], load_file(out / "model.safetensors"))
        assert got[2][0] == pytest.approx(got[8][0], abs=1e-6) and got[2][1] == pytest.approx(got[8][1], rel=1e-4)
        assert all(torch.allclose(got[2][2][k], got[8][2][k], atol=1e-6) for k in got[8][2])


def test_the_reference_none_at_beta_0_adapters_off_with_lora(tmp_path, fn, held):
    out = tmp_path / "b0"
    r = run_cli(*grpo_args(out, fn, held, "--max-steps", "1", "--beta", "0"))
    assert r.returncode == 0, r.stderr
    assert "KL off" in r.stdout and "KL to reference" not in r.stdout
    assert not any(k.endswith("kl") or "kl_k3" in k for m in read_metrics(out) for k in m)   # no reference, no KL
    out = tmp_path / "lora"
    r = run_cli(*grpo_args(out, fn, held, "--max-steps", "1", "--lora-r", "4", "--dtype", "float32", "--kl-in-reward",
                           "--advantage", "rloo"))
    assert r.returncode == 0, r.stderr
    first = next(x for x in read_metrics(out) if "objective/kl" in x)
    assert abs(first["objective/kl"]) < 1e-5    # LoRA B starts at 0: adapters on == adapters off
    assert first["reward/with_kl_mean"] == pytest.approx(first["reward/total_mean"], abs=1e-5)
    assert (out / "adapter").is_dir()


def test_bad_flags_get_clear_errors(tmp_path, fn, held):
    cases = [(["--num-generations", "1"], "a group needs at least 2 replies"),
             (["--epsilon-high", "0.28"], "--epsilon-high acts only when a batch takes several optimizer steps"),
             (["--kl-in-reward", "--beta", "0"], "--kl-in-reward with --beta 0 puts nothing in the reward"),
             (["--temperature", "0"], "GRPO samples its replies, so it must be > 0"),
             (["--num-iterations", "2", "--epsilon", "-1"], "--epsilon -1.0: must be in (0, 10)"),
             (["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
             (["--reward-weights", "rm=1"], "not configured")]
    for flags, message in cases:
        r = run_cli(*grpo_args(tmp_path / "x", fn, held, *flags))
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)
        assert "Traceback" not in r.stderr
    r = run_cli("grpo", "--model", "tiny-random-llama", "--output-dir", tmp_path / "y", "--quiet")
    assert r.returncode == 2 and "grpo needs at least one reward source" in r.stderr


def by_step(out):
    return {m["step"]: (m["reward/total_mean"], m["loss/policy"], m["objective/kl"], m["policy/grad_norm"])
            for m in read_metrics(out) if "loss/policy" in m}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path, fn, held):
    args = ["--max-steps", "4", "--save-steps", "1", "--eval-steps", "2", "--seed", "3", "--dtype", "float32",
            "--num-iterations", "2", "--minibatch-size", "4"]
    ref = tmp_path / "ref"
    r = run_cli(*grpo_args(ref, fn, held, *args))
    assert r.returncode == 0, r.stderr
    want = by_step(ref)
    out = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(grpo_args(out, fn, held, *args), out)
    assert killed_at < 4
    r = run_cli(*grpo_args(out, fn, held, *args, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    got = by_step(out)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert [m["step"] for m in read_metrics(out) if "eval/reward" in m] == [0, 2, 4]
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == 4 * 4


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--advantage", "grpo", "--beta", "0.2"],
                                  ["--advantage", "rloo", "--kl-in-reward", "--beta", "0.05"]], ids=["grpo", "rloo"])
def test_a_learnable_reward_rises_on_held_out_prompts_while_kl_stays_bounded(tmp_path, fn, mode):
    """The reward counts the letter e in the reply: a random tiny policy can learn to say more of it. 6 steps of
    4 prompts × 8 replies, 3 passes each; evaluated on the 11 held-out prompts of the data, 8 replies each."""
    out = tmp_path / "learn"
    r = run_cli("grpo", "--model", "tiny-random-llama", "--data", EXAMPLES / "dialogue_history.csv", "--reward-fn",
                f"{fn}:letters", "--output-dir", out, "--quiet", "--no-tensorboard", "--batch-size", "4",
                "--num-generations", "8", "--max-new-tokens", "10", "--lr", "1e-2", "--max-steps", "6", "--eval-steps",
                "100", "--no-reward-norm", "--missing-eos-penalty", "0", "--dtype", "float32", "--num-iterations", "3",
                "--kl-bound", "8", *mode)
    assert r.returncode == 0, r.stderr
    evals = [m for m in read_metrics(out) if "eval/fn_mean" in m]
    assert [m["step"] for m in evals] == [0, 6]
    assert evals[1]["eval/fn_mean"] > evals[0]["eval/fn_mean"] + 0.2, evals      # ≈ 0.43 → 0.8–0.9
    train = [m for m in read_metrics(out) if "loss/policy" in m]
    assert sum(m["reward/fn_mean"] for m in train[-2:]) > sum(m["reward/fn_mean"] for m in train[:2]) + 0.3
    # nats per reply; k1 is unbiased but a batch's mean can dip below 0 (-0.05 here), k3 never does
    assert all(m["objective/kl"] < 8 and m["objective/kl_k3"] >= 0 for m in train) and 0 <= evals[1]["eval/kl"] < 8
    assert not any(k.startswith("warning/kl_over_bound") for m in train for k in m)
