"""PPO on tiny models: every trainable parameter moves, LoRA reference, the reward-model gate,
SIGKILL + --resume reproduces the uninterrupted run, bad flags get clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf.logger import read_metrics
from chatrlhf.trainers.run import checkpoints
from chatrlhf.trainers.ppo import prompt_indices
from conftest import EXAMPLES, kill_at_first_checkpoint, run_cli, tiny_reward_model

REWARD_FN = "def polite(prompts, responses):\n    return [float(sum(w in r.lower() for w in ('thank', 'please', 'sorry', 'a'))) for r in responses]\n"


def ppo_args(out, fn, *extra):
    return ["ppo", "--model", "tiny-random-llama", "--data", EXAMPLES / "dialogue_history.csv", "--reward-fn", f"{fn}:polite",
            "--output-dir", out, "--quiet", "--no-tensorboard", "--batch-size", "4", "--samples-per-prompt", "2",
            "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "12", "--lr", "1e-3", "--critic-lr", "1e-3",
            *extra]


@pytest.fixture
def fn(write):
    return write("rew.py", REWARD_FN)


def test_prompt_plan_covers_every_prompt_each_epoch():
    seen = [i for s in range(5) for i in prompt_indices(10, 2, 3, s)]
    assert sorted(seen) == list(range(10))
    assert prompt_indices(10, 2, 3, 7) == prompt_indices(10, 2, 3, 7)


@pytest.mark.parametrize("critic", ["policy", "shared"])
def test_smoke_every_trainable_parameter_changes(tmp_path, fn, critic):
    from chatrlhf.config import ModelArgs
    from chatrlhf.models import load_model

    out = tmp_path / "ppo"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "3", "--critic", critic, "--save-steps", "3"))
    assert r.returncode == 0, r.stderr
    assert "held-out reward by source: fn " in r.stdout
    metrics = [m for m in read_metrics(out) if "loss/policy" in m]
    assert len(metrics) == 3
    for m in metrics:
        for k in ("loss/policy", "loss/value", "objective/kl", "policy/entropy", "ppo/clipfrac", "ppo/ratio_mean",
                  "ppo/explained_variance", "reward/fn_mean", "rollout/length", "reward/eos_rate"):
            assert isinstance(m[k], float) and m[k] == m[k], k
    start, _ = load_model(ModelArgs(model="tiny-random-llama"))
    trained = load_file(checkpoints(out)[-1][1] / "policy.safetensors")
    before = dict(start.named_parameters())
    for name, value in trained.items():
        if name.startswith("policy."):
            assert not torch.equal(value, before[name.removeprefix("policy.")].detach()), f"{name} did not change"
    if critic == "shared":
        assert trained["value_head.weight"].abs().sum() > 0  # the zero-initialised head learned
    else:
        critic_w = load_file(checkpoints(out)[-1][1] / "critic.safetensors")
        assert critic_w["model.score.weight"].abs().sum() > 0
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "reply", "reward", "reward_fn"} <= set(samples[0])


def test_lora_reference_is_the_base_and_kl_starts_at_zero(tmp_path, fn):
    out = tmp_path / "lora"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "2", "--lora-r", "4", "--critic", "shared", "--dtype", "float32"))
    assert r.returncode == 0, r.stderr
    m = read_metrics(out)
    first = next(x for x in m if "objective/kl" in x)
    assert abs(first["objective/kl"]) < 1e-4  # LoRA B starts at 0: adapters on == adapters off
    assert (out / "adapter").is_dir()


@pytest.mark.slow
def test_reward_model_gate_is_enforced_unless_forced(tmp_path, fn):
    rm = tiny_reward_model(tmp_path / "rm")
    gate = json.loads((rm / "eval.json").read_text())["gate"]
    if gate["passed"]:  # the random model must not pass; make sure the test can tell
        pytest.fail("a random reward model passed the gate")
    r = run_cli(*ppo_args(tmp_path / "p", fn, "--max-steps", "1", "--reward-model", rm))
    assert r.returncode == 2 and "did not pass the reward-model gate" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(*ppo_args(tmp_path / "p", fn, "--max-steps", "1", "--reward-model", rm, "--force",
                          "--reward-weights", "rm=0.5,fn=1"))
    assert r.returncode == 0, r.stderr
    assert "despite its gate" in r.stdout
    assert f"critic = separate network from {rm}" in r.stdout  # auto: the critic starts from the reward model
    m = next(x for x in read_metrics(tmp_path / "p") if "reward/rm_mean" in x)
    assert m["reward/rm_weight"] == 0.5 and m["reward/fn_weight"] == 1.0


def test_bad_flags_get_clear_errors(tmp_path, fn):
    r = run_cli(*ppo_args(tmp_path / "x", fn, "--reward-weights", "rm=1"))
    assert r.returncode == 2 and "not configured" in r.stderr
    r = run_cli("ppo", "--model", "tiny-random-llama", "--output-dir", tmp_path / "y", "--quiet")
    assert r.returncode == 2 and "at least one reward source" in r.stderr
    r = run_cli(*ppo_args(tmp_path / "z", fn, "--reward-weights", "fn=cosine:1"))
    assert r.returncode == 2 and "--reward-weights" in r.stderr
    assert "Traceback" not in r.stderr


def rewards_by_step(out):
    return {m["step"]: (m["reward/total_mean"], m["loss/policy"], m["objective/kl"]) for m in read_metrics(out)
            if "loss/policy" in m}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path, fn):
    args = ["--max-steps", "8", "--save-steps", "2", "--eval-steps", "4", "--seed", "3", "--adaptive-kl",
            "--dtype", "float32"]
    ref = tmp_path / "ref"
    r = run_cli(*ppo_args(ref, fn, *args))
    assert r.returncode == 0, r.stderr
    want = rewards_by_step(ref)
    assert sorted(want) == list(range(1, 9))

    out = tmp_path / "killed"
    killed_at = kill_at_first_checkpoint(ppo_args(out, fn, *args), out)
    assert killed_at < 8
    r = run_cli(*ppo_args(out, fn, *args, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    got = rewards_by_step(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert len([m for m in read_metrics(out) if "eval/reward" in m]) == 3  # steps 0, 4, 8 once each
    for n, path in checkpoints(out):  # a resumed run's checkpoints record their own step, not the resumed one
        assert json.loads((path / "trainer_state.json").read_text())["step"] == n
    steps = [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == 8 * 4  # 4 sample rows per step, none twice


def test_minibatches_shuffle_whole_prompt_groups():
    from chatrlhf.rollout import minibatches

    torch.manual_seed(0)
    mbs = minibatches(16, 4, 8)
    rows = torch.cat(mbs)
    assert sorted(rows.tolist()) == list(range(16)) and rows.tolist() != list(range(16))
    for mb in mbs:
        groups = (mb // 4).tolist()
        assert len(mb) == 8 and len(set(groups)) == 2 and all(groups.count(g) == 4 for g in groups)
    assert len(set((torch.cat(minibatches(12, 4, 6)) // 4).tolist())) == 3  # 6 % 4 ≠ 0: rows shuffled one by one


@pytest.mark.slow
def test_critic_from_the_reward_model_starts_on_the_reward_scale(tmp_path, fn):
    rm = tiny_reward_model(tmp_path / "rm")
    config = json.loads((rm / "config.json").read_text())
    config["chatrlhf_reward_norm"].update(gain=3.0, bias=10.0)   # scores ≈ 10, far from the raw head's scale
    (rm / "config.json").write_text(json.dumps(config))
    out = tmp_path / "ppo"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "2", "--reward-model", rm, "--force", "--reward-weights", "fn=0",
                          "--no-reward-norm", "--missing-eos-penalty", "0", "--dtype", "float32"))
    assert r.returncode == 0, r.stderr
    assert f"critic = separate network from {rm}" in r.stdout
    first = next(m for m in read_metrics(out) if "ppo/value_mean" in m)
    assert first["ppo/return_mean"] > 5
    assert abs(first["ppo/value_mean"] - first["ppo/return_mean"]) < 0.05 * first["ppo/return_mean"], first


def small_cfg(fn, **kw):
    from chatrlhf.config import PPOConfig

    return PPOConfig(model="tiny-random-llama", data=[str(EXAMPLES / "dialogue_history.csv")], reward_fn=f"{fn}:polite",
                     max_new_tokens=6, batch_size=3, samples_per_prompt=2, dtype="float32", quiet=True, **kw)


def test_evaluation_runs_in_batches_on_its_own_random_stream(monkeypatch, fn):
    from chatrlhf import rollout
    from chatrlhf.trainers import ppo

    cfg = small_cfg(fn)
    mix = ppo.build_rewards(cfg)
    policy, tok, ref_ctx, *_ = ppo.load_networks(cfg, log=lambda *a: None)
    prompts = ppo.split_prompts(cfg)[1][:7]
    rows, seeds = [], []
    generate = rollout.generate  # the evaluation PPO runs (rollout.evaluate) samples through rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda pol, t, p, c, g, seeds: rows.append(len(p)) or generate(pol, t, p, c, g,
                                                                                                      seeds=seeds))
    monkeypatch.setattr(torch, "manual_seed", lambda *a: seeds.append(a))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda *a: seeds.append(a))   # what CUDA would re-seed
    before = torch.get_rng_state()
    first = ppo.evaluate(policy, ref_ctx, tok, prompts, cfg, mix, {}, 10)
    assert seeds == [] and torch.equal(torch.get_rng_state(), before)   # the global streams are never touched
    assert rows == [6, 6, 2]                                             # 7 prompts × 2 replies, 3 prompts at a time
    assert ppo.evaluate(policy, ref_ctx, tok, prompts, cfg, mix, {}, 10) == first   # the same seed each time
    cfg.batch_size = 7  # a stream per reply: other chunks, the same replies
    assert ppo.evaluate(policy, ref_ctx, tok, prompts, cfg, mix, {}, 10) == pytest.approx(first, rel=1e-5)


@pytest.mark.slow
def test_training_is_the_same_with_or_without_evaluations_in_between(tmp_path, fn):
    runs = {}
    for every in (1, 100):
        out = tmp_path / f"e{every}"
        r = run_cli(*ppo_args(out, fn, "--max-steps", "2", "--eval-steps", every, "--dtype", "float32"))
        assert r.returncode == 0, r.stderr
        runs[every] = rewards_by_step(out)
    assert runs[1] == runs[100]


def test_eval_reward_is_on_one_scale_from_step_0(tmp_path, fn):
    out = tmp_path / "same"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "4", "--eval-steps", "2", "--lr", "0", "--critic-lr", "0",
                          "--missing-eos-penalty", "0.5", "--dtype", "float32"))
    assert r.returncode == 0, r.stderr
    evals = [m for m in read_metrics(out) if "eval/reward" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    # the policy cannot move (learning rate 0): every evaluation must say the same, on the same scale
    for m in evals[1:]:
        assert m["eval/reward"] == pytest.approx(evals[0]["eval/reward"], abs=1e-6)
        assert m["eval/fn_mean"] == pytest.approx(evals[0]["eval/fn_mean"], abs=1e-6)
    assert evals[0]["eval/reward"] == pytest.approx(-0.5 * (1 - evals[0]["eval/eos_rate"]), abs=1e-6)
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["eval_start"]["eval/reward"] == pytest.approx(summary["eval_end"]["eval/reward"], abs=1e-6)


def test_critic_warmup_does_not_advance_the_policy_schedule(tmp_path, fn):
    out = tmp_path / "warm"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "4", "--critic-warmup-steps", "2", "--critic", "policy"))
    assert r.returncode == 0, r.stderr
    lrs = [m["train/lr"] for m in read_metrics(out) if "train/lr" in m]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])   # the policy's linear decay spans the last two steps


def test_sampling_temperature_must_be_positive(tmp_path, fn):
    r = run_cli(*ppo_args(tmp_path / "t", fn, "--temperature", "0"))
    assert r.returncode == 2 and "--temperature 0.0: PPO samples its replies, so it must be > 0" in r.stderr
    r = run_cli("eval", "--model", "tiny-random-llama", "--temperature", "-1", "--output-dir", tmp_path / "e")
    assert r.returncode == 2 and "must be > 0" in r.stderr


def test_no_chat_template_trains_on_plain_prompts_and_is_saved(tmp_path, fn):
    from chatrlhf.config import ModelArgs
    from chatrlhf.data.template import PLAIN_TEMPLATE
    from chatrlhf.models import load_model

    out = tmp_path / "plain"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "1", "--no-chat-template", "--data", EXAMPLES / "prompts.txt"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["chat_template"] is False and summary["config"]["chat_template"] is False
    _, tok = load_model(ModelArgs(model=str(out)))     # later commands take the saved template, no flag needed
    assert tok.chat_template == PLAIN_TEMPLATE


def test_missing_eos_penalty_defaults_to_0_for_plain_continuations_and_1_for_chat(tmp_path, fn):
    got = {}
    for name, flags in (("chat", []), ("plain", ["--no-chat-template"]), ("given", ["--no-chat-template",
                                                                                    "--missing-eos-penalty", "0.5"])):
        r = run_cli(*ppo_args(tmp_path / name, fn, "--max-steps", "1", "--data", EXAMPLES / "prompts.txt", *flags))
        assert r.returncode == 0, r.stderr
        got[name] = json.loads((tmp_path / name / "chatrlhf.json").read_text())["missing_eos_penalty"]
    assert got == {"chat": 1.0, "plain": 0.0, "given": 0.5}
    recorded = json.loads((tmp_path / "plain" / "run_config.json").read_text())
    assert recorded["missing_eos_penalty"] is None and recorded["chat_template"] is False


def test_max_minutes_ends_the_run_evaluated_and_saved(tmp_path, fn):
    out = tmp_path / "budget"
    r = run_cli(*ppo_args(out, fn, "--max-steps", "50", "--max-minutes", "0.0001", "--eval-steps", "100"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["steps"] == 1 and summary["stopped_by_time"] is True and summary["eval_end"]
    assert (out / "model.safetensors").is_file() and "--max-minutes 0.0001 reached at step 1 of 50" in r.stdout
