"""FSDP2 in the run scaffold (trainers/run.py), two processes on the CPU (gloo).

Which backends run here: data parallelism and FSDP2 (PyTorch's ``fully_shard``) both run on CPU with gloo, so both are
tested end to end — FSDP once through ``accelerate launch`` with the shipped fsdp.yaml (accelerate's own FSDP plugin
never engages on a CPU machine; chatrlhf reads the launch's FSDP_* settings and shards by itself) and once through
``--num-processes 2 --fsdp --fsdp-offload``. DeepSpeed ZeRO runs on CPU too: tests/test_deepspeed.py.

FSDP must train exactly as data parallelism (and so as one process with the global batch): the same losses and gradient norms at every step, to a float32 sum's
reordering (relative 1e-5: the reduce-scatter adds the two ranks' gradients in another order than the all-reduce), and
the same saved weights (1e-5 absolute)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import EXAMPLES, run_cli
from chatrlhf.accelerate import config_path
from chatrlhf.config import DPOConfig, SFTConfig
from chatrlhf.errors import UsageError
from chatrlhf.logger import read_metrics
from chatrlhf.fsdp import check_sharding, fsdp_settings

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
    with pytest.raises(UsageError, match="chatrlhf ppo does not run under FSDP yet"):
        fsdp_settings(object(), "ppo", 2)


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
