"""DeepSpeed ZeRO in the run scaffold (zero.py, trainers/run.py), two processes on the CPU (gloo).

DeepSpeed runs on CPU (its CPU accelerator; it compiles one small C++ extension on first use, ~30 s, cached), so it
is tested end to end: ZeRO-2 and ZeRO-3 (weights and optimizer state offloaded to CPU memory) through `accelerate
launch` with the shipped deepspeed_zero2.yaml and deepspeed_zero3.yaml, and through `--num-processes 2 --deepspeed N`.
Like FSDP, DeepSpeed must train exactly as one process with the global batch: the same losses and gradient norms at
every step to a float32 sum's reordering (relative 1e-5), the same saved weights."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from conftest import EXAMPLES, ROOT, run_cli
from chatrlhf.accelerate import config_path
from chatrlhf.config import DPOConfig, GRPOConfig, SFTConfig
from chatrlhf.errors import UsageError
from chatrlhf.trainers.run import load_checkpoint
from chatrlhf.zero import engine_config, zero_settings
from test_fsdp import sft_argv
from test_multiprocess import assert_same_run

pytestmark = pytest.mark.slow


def audited(out, audit) -> dict:
    audit.mkdir()
    return {"PYTHONPATH": str(ROOT / "tests" / "audit"), "CHATRLHF_AUDIT_OUT": str(out),
            "CHATRLHF_AUDIT_LOG": str(audit)}


def test_sft_under_zero2_launched_by_accelerate_trains_as_one_process_and_resumes_exactly(tmp_path):
    zero2, one = tmp_path / "zero2", tmp_path / "one"
    env = {**os.environ, **audited(zero2, tmp_path / "audit")}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        config_path("deepspeed_zero2"), "-m", "chatrlhf", *map(str, sft_argv(zero2))],
                       capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DeepSpeed ZeRO stage 2 over 2 processes" in r.stdout and "Traceback" not in r.stderr
    r = run_cli(*sft_argv(one, "--batch-size", "4"))
    assert r.returncode == 0, r.stderr
    assert_same_run(one, zero2)
    # rank 0 writes the run; rank 1 only its partition of DeepSpeed's checkpoint (its optimizer state)
    assert "metrics.jsonl" in (tmp_path / "audit" / "rank-0.log").read_text()
    for line in (tmp_path / "audit" / "rank-1.log").read_text().splitlines():
        assert all("/checkpoints/.deepspeed-step-" in p for p in line.split()[1:]), line
    assert (zero2 / "checkpoints" / "step-2" / "deepspeed").is_dir()
    assert json.loads((zero2 / "chatrlhf.json").read_text())["config"]["deepspeed"] == 0  # on by the launch

    # resume from the step-2 checkpoint through --deepspeed 2: the uninterrupted run's figures
    resumed = tmp_path / "resumed"
    shutil.copytree(zero2, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-3")
    r = run_cli(*sft_argv(resumed, "--resume", "--num-processes", "2", "--deepspeed", "2"), process=True, timeout=400)
    assert r.returncode == 0, r.stderr
    assert "(step 2)" in r.stdout
    assert_same_run(zero2, resumed)
    assert json.loads((resumed / "chatrlhf.json").read_text())["config"]["deepspeed"] == 2
    with pytest.raises(UsageError, match="was written with DeepSpeed, this run is without"):  # a plain resume
        load_checkpoint(resumed / "checkpoints" / "step-2", {}, world_size=2)


@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_zero3_with_offload_trains_as_one_process_and_saves_a_plain_model(tmp_path, command, monkeypatch):
    head = ["dpo", "--max-length", "96"] if command == "dpo" else ["reward", "train", "--recipe", "full"]
    args = [*head, "--data", EXAMPLES / "preferences.jsonl", "--model", "tiny-random-llama", "--quiet", "--dtype",
            "float32", "--lr", "1e-3", "--max-steps", "3", "--save-steps", "2", "--no-tensorboard"]
    r = run_cli(*args, "--output-dir", tmp_path / "one", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    z3 = [*args, "--output-dir", tmp_path / "z3", "--batch-size", "2"]
    if command == "dpo":  # the shipped config (ZeRO-3, weights and optimizer state offloaded) through accelerate
        r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                            config_path("deepspeed_zero3"), "-m", "chatrlhf", *map(str, z3)], capture_output=True,
                           text=True, timeout=400)
    else:  # the same through the flag, the offload asked for as that config's keys ask
        for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
            monkeypatch.setenv(key, "cpu")
        r = run_cli(*z3, "--num-processes", "2", "--deepspeed", "3", process=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DeepSpeed ZeRO stage 3 over 2 processes" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "z3")
    if command == "dpo":  # the gathered weights make a plain Hugging Face folder
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "z3", output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_kto_under_fsdp_and_under_zero3_trains_as_one_process(tmp_path):
    """KTO's step makes extra passes (the KL sequences for z₀): one per micro-batch, so every process makes as many."""
    args = ["kto", "--data", EXAMPLES / "ratings.jsonl", "--max-length", "96", "--model", "tiny-random-llama", "--quiet",
            "--dtype", "float32", "--lr", "1e-3", "--max-steps", "3", "--save-steps", "2", "--no-tensorboard"]
    r = run_cli(*args, "--output-dir", tmp_path / "one", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    for name, flags in (("fsdp", ["--fsdp"]), ("zero3", ["--deepspeed", "3"])):
        r = run_cli(*args, "--output-dir", tmp_path / name, "--batch-size", "2", "--num-processes", "2", *flags,
                    process=True, timeout=400)
        assert r.returncode == 0, r.stderr
        assert_same_run(tmp_path / "one", tmp_path / name)


@pytest.mark.parametrize("cfg, env, world, message", [
    (SFTConfig(deepspeed=2), {}, 1, "DeepSpeed with one process"),
    (SFTConfig(deepspeed=3, lora_r=8), {}, 2, "--lora-r 8 with DeepSpeed: not supported"),
    (DPOConfig(deepspeed=2, train_layers=2), {}, 2, "--train-layers 2 with DeepSpeed"),
    (SFTConfig(deepspeed=2, fsdp=True), {}, 2, "DeepSpeed together with FSDP"),
    (SFTConfig(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, 2,
     "a DeepSpeed JSON config file"),
    (SFTConfig(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"}, 2,
     "offload_optimizer_device nvme"),
    (SFTConfig(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, 2,
     "offload_param_device cpu below stage 3"),
    (GRPOConfig(), {"ACCELERATE_USE_DEEPSPEED": "true"}, 2, "chatrlhf grpo does not run under DeepSpeed yet"),
])
def test_what_deepspeed_cannot_do_is_refused_before_anything_loads(monkeypatch, cfg, env, world, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError) as e:
        zero_settings(cfg, "grpo" if isinstance(cfg, GRPOConfig) else "sft", world)
    assert message in str(e.value)


def test_deepspeed_settings_follow_the_flag_and_the_accelerate_launch(monkeypatch):
    assert zero_settings(SFTConfig(), "sft", 2) is None
    assert zero_settings(SFTConfig(deepspeed=1), "sft", 2) == {"stage": 1, "offload_optimizer": False,
                                                               "offload_params": False}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    settings = zero_settings(SFTConfig(), "sft", 2)
    assert settings == {"stage": 3, "offload_optimizer": False, "offload_params": True}
    conf = engine_config(settings, 1.5, 2)
    assert conf["managed_gradient_accumulation"] is False and conf["gradient_clipping"] == 1.5  # the caller's loop
    assert conf["zero_optimization"]["stage"] == 3 and conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in conf["zero_optimization"] and conf["bf16"] == {"enabled": False}
