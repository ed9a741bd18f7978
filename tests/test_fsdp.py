"""FSDP2 in the run scaffold (trainers/run.py), two processes on the CPU (gloo).

Which backends run here: data parallelism and FSDP2 (PyTorch's ``fully_shard``) both run on CPU with gloo, so both are
tested end to end — FSDP once through ``accelerate launch`` with the shipped fsdp.yaml (accelerate's own FSDP plugin
never engages on a CPU machine; chatrlhf reads the launch's FSDP_* settings and shards by itself) and once through
``--num-processes 2 --fsdp --fsdp-offload``. DeepSpeed ZeRO runs on CPU too: tests/test_deepspeed.py.

FSDP must train exactly as data parallelism (and so as one process with the global batch): the same losses and gradient norms at every step, to a float32 sum's
reordering (relative 1e-5: the reduce-scatter adds the two ranks' gradients in another order than the all-reduce), and
the same saved weights (1e-5 absolute)."""

import copy
import datetime
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from conftest import EXAMPLES, run_cli, tiny_reward_model
from chatrlhf.accelerate import config_path
from chatrlhf.config import DPOConfig, GRPOConfig, PPOConfig, SFTConfig
from chatrlhf.errors import UsageError
from chatrlhf.logger import read_metrics
from chatrlhf.fsdp import check_sharding, fsdp_settings, shard_model, unsharded
from chatrlhf.models import load_model
from chatrlhf.rewards import ModelReward
from chatrlhf.rollout import generate, policy_forward, row_seeds

UNCOMPARED = ("train/step_s", "train/tokens_per_s", "train/pad_fraction")  # the clock, how the batch is cut


def sft_argv(out, *extra) -> list:
    return ["sft", "--data", EXAMPLES / "dialogue_history.csv", "--model", "tiny-random-llama", "--output-dir", out,
            "--quiet", "--dtype", "float32", "--batch-size", "2", "--lr", "1e-3", "--max-steps", "3", "--save-steps",
            "2", "--no-tensorboard", *extra]


def assert_same_training(a, b) -> None:
    want, got = ({m["step"]: m for m in read_metrics(x)} for x in (a, b))
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step, m in want.items():
        assert got[step].keys() == m.keys(), step
        for k, v in m.items():
            if k not in UNCOMPARED:
                assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)


@pytest.mark.slow
def test_sft_under_fsdp_trains_as_data_parallel_saves_a_plain_model_and_resumes_exactly(tmp_path):
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_path("fsdp"),
                        "-m", "chatrlhf", *map(str, sft_argv(fsdp))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FSDP2 full shard over 2 processes" in r.stdout
    # one process of batch 4 trains as two data-parallel processes of 2 (tests/test_multiprocess.py): compared here
    r = run_cli(*sft_argv(ddp, "--batch-size", "4"))
    assert r.returncode == 0, r.stderr
    assert_same_training(ddp, fsdp)
    model, info = AutoModelForCausalLM.from_pretrained(fsdp, output_loading_info=True)  # a plain Hugging Face folder
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((fsdp / "chatrlhf.json").read_text())["processes"] == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, as the tiny model is

    # resume from the step-2 checkpoint, this time through --fsdp with offloading: the uninterrupted run's figures
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-3")
    (resumed / "model.safetensors").unlink()
    r = run_cli(*sft_argv(resumed, "--resume", "--num-processes", "2", "--fsdp", "--fsdp-offload"), process=True,
                timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "(step 2)" in r.stdout and "offloaded to CPU memory" in r.stdout
    assert_same_training(fsdp, resumed)



@pytest.mark.parametrize("cfg, env, world, message", [
    (SFTConfig(fsdp=True), {}, 1, "--fsdp shards the model over processes, and this run has one"),
    (SFTConfig(fsdp_offload=True), {}, 2, "--fsdp-offload without FSDP"),
    (SFTConfig(lora_r=8), {"ACCELERATE_USE_FSDP": "true"}, 2, "--lora-r 8 with FSDP: not supported"),
    (DPOConfig(fsdp=True, train_layers=2), {}, 2, "--train-layers 2 with FSDP: not supported"),
    (PPOConfig(fsdp=True, critic="shared"), {}, 2, "--critic shared with FSDP"),
    (PPOConfig(fsdp=True, rollout_engine="vllm"), {}, 2, "--rollout-engine vllm with FSDP"),
    (GRPOConfig(lora_r=8), {"ACCELERATE_USE_FSDP": "true"}, 2, "--lora-r 8 with FSDP: not supported"),
    (SFTConfig(fsdp=True), {"FSDP_VERSION": "1"}, 2, "FSDP version 1 (fsdp_version): not supported"),
    (SFTConfig(fsdp=True), {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, 2, "fsdp_auto_wrap_policy SIZE_BASED_WRAP"),
    (SFTConfig(fsdp=True, gradient_checkpointing=False), {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, 2,
     "fsdp_activation_checkpointing: true with --no-gradient-checkpointing"),
])
def test_what_fsdp_cannot_do_is_refused_before_anything_loads(monkeypatch, cfg, env, world, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError) as e:
        fsdp_settings(cfg, "sft", world)
    assert message in str(e.value)


def test_fsdp_settings_follow_the_flags_and_the_accelerate_launch(monkeypatch):
    assert fsdp_settings(SFTConfig(), "sft", 2) is None
    assert fsdp_settings(SFTConfig(fsdp=True), "sft", 2) == {"offload": False, "reshard_after_forward": True}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with fsdp.yaml sets
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp_settings(SFTConfig(), "sft", 2) == {"offload": True, "reshard_after_forward": False}
    assert fsdp_settings(GRPOConfig(), "grpo", 2) == {"offload": True, "reshard_after_forward": False}
    with pytest.raises(UsageError, match="chatrlhf bestofn does not run under FSDP yet") as e:
        fsdp_settings(object(), "bestofn", 2)
    assert "sft, reward train, dpo, kto, ppo and grpo shard with FSDP" in str(e.value)


def test_the_shipped_accelerate_configs_are_found_and_fsdp_is_version_2():
    r = subprocess.run([sys.executable, "-m", "chatrlhf.accelerate", "fsdp"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(config_path("fsdp"))
    text = config_path("fsdp").read_text()
    assert "distributed_type: FSDP" in text and "fsdp_version: 2" in text
    assert "zero_stage: 3" in config_path("deepspeed_zero3").read_text()
    with pytest.raises(ValueError, match="there are ddp, fsdp"):
        config_path("zero")


def test_a_checkpoint_is_resumed_only_with_the_sharding_that_wrote_it(tmp_path):
    """Under FSDP the optimizer state is keyed by parameter name, without it by position: a mix is refused."""
    check_sharding(tmp_path, True, True)
    check_sharding(tmp_path, False, False)
    with pytest.raises(UsageError, match="was written with FSDP, this run is without"):
        check_sharding(tmp_path, True, False)


# --------------------------------------------------------------------------- GRPO and PPO under FSDP

RL = {"grpo": ["grpo", "--data", EXAMPLES / "prompts.txt", "--reward-fn", f"{EXAMPLES / 'reward.py'}:concise_on_topic",
               "--num-generations", "2", "--minibatch-size", "4", "--num-iterations", "2", "--max-new-tokens", "12",
               "--beta", "0.04"],
      "ppo": ["ppo", "--data", EXAMPLES / "dialogue_history.csv", "--reward-fn",
              f"{EXAMPLES / 'reward.py'}:concise_on_topic", "--samples-per-prompt", "2", "--minibatch-size", "4",
              "--ppo-epochs", "2", "--max-new-tokens", "12", "--critic-lr", "1e-3", "--eval-fraction", "0.05"]}
CLOCK = ("rollout/tokens_per_s", "rollout/generate_s", "time/step_s")


def rl_argv(command: str, out, batch: int, *extra) -> list:
    return [*RL[command], "--model", "tiny-random-llama", "--output-dir", out, "--quiet", "--dtype", "float32",
            "--batch-size", batch, "--lr", "1e-3", "--max-steps", "4", "--save-steps", "2", "--no-tensorboard", *extra]


def assert_same_rl_run(a, b, weights=("model.safetensors",)) -> None:
    """The same metrics at steps 0…4 (warnings word for word, numbers to a float32 sum's reordering, the clock aside)
    and the same saved weights."""
    want, got = ({m["step"]: m for m in read_metrics(x)} for x in (a, b))
    assert sorted(got) == sorted(want) == [0, 1, 2, 3, 4]
    for step, m in want.items():
        assert got[step].keys() == m.keys(), step
        for k, v in m.items():
            if isinstance(v, str):
                assert got[step][k] == v, (step, k)
            elif k not in CLOCK:
                assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
    for name in weights:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x), name


@pytest.mark.slow
def test_grpo_under_fsdp_trains_as_one_process_of_the_global_batch_and_resumes_exactly(tmp_path):
    """Two FSDP processes × 2 prompts = one process × 4: the policy and the reference sharded, each rollout generated
    with the policy gathered once, the minibatches' uneven rows evened out by idle passes (rollout.micro_batches)."""
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    r = run_cli(*rl_argv("grpo", fsdp, 2, "--num-processes", "2", "--fsdp"), process=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FSDP2 full shard over 2 processes" in r.stdout
    r = run_cli(*rl_argv("grpo", one, 4))
    assert r.returncode == 0, r.stderr
    assert_same_rl_run(one, fsdp)
    assert json.loads((fsdp / "chatrlhf.json").read_text())["processes"] == 2
    _, info = AutoModelForCausalLM.from_pretrained(fsdp, output_loading_info=True)  # a plain Hugging Face folder
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # from the step-2 checkpoint (the full state, gathered), with the shards offloaded this time: the same run
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    (resumed / "model.safetensors").unlink()
    r = run_cli(*rl_argv("grpo", resumed, 2, "--num-processes", "2", "--fsdp", "--fsdp-offload", "--resume"),
                process=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(step 2)" in r.stdout and "offloaded to CPU memory" in r.stdout
    assert_same_rl_run(fsdp, resumed)


@pytest.mark.slow
def test_ppo_under_fsdp_trains_policy_and_critic_as_one_process_of_the_global_batch_and_resumes_exactly(tmp_path):
    """Two FSDP processes × 2 prompts = one process × 4, with the critic from the reward model (sharded as the policy
    is; put on the reward scale by scaling its head's shards) and the reward model as a source: the same metrics, and
    the same saved policy and critic (offset included: a plain parameter beside the shards, summed over processes)."""
    rm = tiny_reward_model(tmp_path / "rm")
    extra = ("--reward-model", rm, "--force", "--critic", "reward-model")
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    r = run_cli(*rl_argv("ppo", fsdp, 2, *extra, "--num-processes", "2", "--fsdp"), process=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("FSDP2 full shard over 2 processes") == 1 and "critic = separate network from" in r.stdout
    r = run_cli(*rl_argv("ppo", one, 4, *extra))
    assert r.returncode == 0, r.stderr
    assert_same_rl_run(one, fsdp, weights=("model.safetensors", "critic/model.safetensors"))
    offsets = [json.loads((x / "critic" / "config.json").read_text())["chatrlhf_value_offset"] for x in (one, fsdp)]
    assert offsets[0] != 0 and offsets[1] == pytest.approx(offsets[0], rel=1e-5)

    resumed = tmp_path / "resumed"  # from the step-2 checkpoint: the policy's part and the critic's, gathered
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    shutil.rmtree(resumed / "critic")
    (resumed / "model.safetensors").unlink()
    r = run_cli(*rl_argv("ppo", resumed, 2, *extra, "--num-processes", "2", "--fsdp", "--resume"), process=True,
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(step 2)" in r.stdout
    assert_same_rl_run(fsdp, resumed, weights=("model.safetensors", "critic/model.safetensors"))


COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
               "reduce_scatter_tensor", "all_reduce", "broadcast", "barrier")


def count_collectives(saved: dict) -> dict:
    """Wrap torch.distributed's collectives (FSDP2 calls them through the module) to count the calls; the originals go
    into ``saved`` ({name: function}) to be put back."""
    counts = {"n": 0}
    for name in COLLECTIVES:
        if hasattr(dist, name):
            fn = getattr(dist, name)
            saved[name] = fn

            def counted(*args, _fn=fn, **kwargs):
                counts["n"] += 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counted)
    return counts


def _rollout_rank(rank: int, store: str) -> None:
    """One of two gloo ranks: a sharded copy of the tiny model generates this rank's replies (4 tokens on rank 0, 24
    on rank 1, so the ranks make different numbers of forward passes) inside fsdp.unsharded, as the whole model does."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        model, tok = load_model(SimpleNamespace(model="tiny-random-llama", device="cpu"))
        sharded = shard_model(copy.deepcopy(model), {"offload": False, "reshard_after_forward": True})
        units = sum(1 for m in sharded.modules() if type(m).__name__.startswith("FSDP"))
        texts = (["Hello", "Where is my order?"], ["Hi there"])[rank]
        prompts = [[{"role": "user", "content": text}] for text in texts]
        seeds = row_seeds(0, rank, rows=range(len(prompts)))
        for dtype in ("float32", "bfloat16"):  # bf16: the engine decodes with bf16 copies of the gathered weights
            cfg = SimpleNamespace(max_prompt_length=64, max_new_tokens=4 if rank == 0 else 24, temperature=1.0,
                                  dtype=dtype)
            want, want_lp, _ = generate(model, tok, prompts, cfg, None, seeds=seeds)
            saved = {}
            counts = count_collectives(saved)
            try:
                got, got_lp, _ = generate(sharded, tok, prompts, cfg, None, seeds=seeds)
            finally:
                for name, fn in saved.items():
                    setattr(dist, name, fn)
            assert counts["n"] == units, (dtype, counts, units)  # one all-gather per unit on entry, none per token
            assert torch.equal(got.response_ids, want.response_ids), dtype
            assert torch.equal(got.response_mask, want.response_mask) and torch.allclose(got_lp, want_lp, atol=1e-6)
            assert got.texts == want.texts and want.response_ids.shape[1] == cfg.max_new_tokens
            assert all(isinstance(p, DTensor) for p in sharded.parameters())  # sharded again afterwards
        with torch.no_grad():  # and the training side's forward (models.in_forward, one pass) still reads the same
            assert torch.allclose(policy_forward(sharded, got, 1.0)[0], policy_forward(model, want, 1.0)[0], atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_sharded_policy_generates_the_whole_models_replies_with_no_collective_per_token(tmp_path):
    """fsdp.unsharded gathers the policy once for a whole generation: two ranks whose replies have different lengths
    draw exactly the replies of the unsharded model, with as many collectives as FSDP units (the gather on entry), none
    per forward pass — a collective inside the generation would leave one rank waiting for the other."""
    mp.start_processes(_rollout_rank, args=(str(tmp_path / "store"),), nprocs=2, join=True, start_method="spawn")


def _reward_rank(rank: int, store: str, rm: str) -> None:
    """One of two gloo ranks: the reward model as a reward source, sharded (Run.shard_frozen's shard_model), scores
    this rank's replies as the whole model does."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        whole = ModelReward(rm, force=True, device="cpu", dtype="float32", log=lambda *a: None)
        sharded = ModelReward(rm, force=True, device="cpu", dtype="float32", log=lambda *a: None,
                              shard=lambda m: shard_model(m, {"offload": False, "reshard_after_forward": True}))
        assert all(isinstance(p, DTensor) for p in sharded.model.parameters())
        prompts = [[{"role": "user", "content": t}] for t in (["Hello", "Where is my order?"], ["Hi", "Help me"])[rank]]
        replies = (["Hi! How can I help?", "It ships today."], ["Hello.", "Sure, with what?"])[rank]
        assert sharded(prompts, replies) == pytest.approx(whole(prompts, replies), abs=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_sharded_reward_model_scores_as_the_whole_one(tmp_path):
    """Under FSDP, PPO and GRPO shard the reward model they score with (each process keeps its shards): its scores
    are the whole model's (the head is gathered with the root: reward_model.head_scores calls it as a module)."""
    rm = str(tiny_reward_model(tmp_path / "rm"))
    mp.start_processes(_reward_rank, args=(str(tmp_path / "store"), rm), nprocs=2, join=True, start_method="spawn")
