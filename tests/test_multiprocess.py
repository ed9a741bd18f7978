"""Several processes (run scaffold, trainers/run.py): `--num-processes 2` on the gloo backend, 2 processes × batch B
against 1 process × batch 2B on the same data order. fp32 (bf16 autocast would round differently on differently
padded batches); the tolerance is a float32 sum's reordering (relative 1e-5)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLES, ROOT, run_cli
from chatrlhf.logger import read_metrics
from chatrlhf.trainers.run import checkpoints

pytestmark = pytest.mark.slow

# what depends on the clock or on how the batch is cut, not on the training
UNCOMPARED = ("train/step_s", "train/tokens_per_s", "train/pairs_per_s", "train/replies_per_s", "train/pad_fraction",
              "time/step_s",
              "rollout/tokens_per_s", "rollout/generate_s")
COMMANDS = {
    "sft": ["sft", "--data", EXAMPLES / "dialogue_history.csv"],
    "reward": ["reward", "train", "--data", EXAMPLES / "preferences.jsonl"],
    "dpo": ["dpo", "--data", EXAMPLES / "preferences.jsonl", "--max-length", "96"],
    # each reply sampled from a stream of its own (seeded by its place in the whole batch), so two processes draw
    # the replies one process draws; a separate critic (the default) with its own optimizer
    "kto": ["kto", "--data", EXAMPLES / "ratings.jsonl", "--max-length", "96"],
    "grpo": ["grpo", "--data", EXAMPLES / "prompts.txt", "--reward-fn", f"{EXAMPLES / 'reward.py'}:concise_on_topic",
             "--num-generations", "2", "--minibatch-size", "4", "--num-iterations", "2", "--max-new-tokens", "12",
             "--beta", "0.04"],
    "ppo": ["ppo", "--data", EXAMPLES / "dialogue_history.csv", "--reward-fn", f"{EXAMPLES / 'reward.py'}:concise_on_topic",
            "--samples-per-prompt", "2", "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "12",
            "--critic-lr", "1e-3"],
}


def argv(command: str, out, batch: int, *extra) -> list:
    return [*COMMANDS[command], "--model", "tiny-random-llama", "--output-dir", out, "--quiet", "--dtype", "float32",
            "--batch-size", batch, "--lr", "1e-3", "--max-steps", "4", "--save-steps", "2", *extra]


def two_processes(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    r = run_cli(*args, "--num-processes", "2", env=env or {}, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def audited(out, audit) -> dict:
    """The environment that makes each process record its writes under ``out`` into ``audit``/rank-N.log."""
    audit.mkdir()
    return {"PYTHONPATH": str(ROOT / "tests" / "audit"), "CHATRLHF_AUDIT_OUT": str(out),
            "CHATRLHF_AUDIT_LOG": str(audit)}


def assert_only_rank_0_wrote(audit) -> None:
    """Rank 0 wrote (so the hook was watching) and rank 1 wrote nothing into the run's folder."""
    assert "metrics.jsonl" in (audit / "rank-0.log").read_text()
    assert not (audit / "rank-1.log").exists(), (audit / "rank-1.log").read_text()


def descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, its children's children included (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def assert_same_run(a, b, weights="model.safetensors") -> None:
    """The same metrics at every step (timings and padding aside) and the same saved weights."""
    want = {m["step"]: m for m in read_metrics(a)}
    got = {m["step"]: m for m in read_metrics(b)}
    assert sorted(got) == sorted(want)
    for step, m in want.items():
        assert got[step].keys() == m.keys(), step
        for k, v in m.items():
            if isinstance(v, str):  # a warning
                assert got[step][k] == v, (step, k)
            elif k not in UNCOMPARED:
                assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
    x, y = load_file(a / weights), load_file(b / weights)
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)


@pytest.mark.parametrize("command", ["reward", "dpo", "kto", "ppo", "grpo"])
def test_two_processes_of_batch_b_train_as_one_of_batch_2b_and_only_rank_0_writes(tmp_path, command):
    two_processes(argv(command, tmp_path / "two", 2, "--no-tensorboard"), env=audited(tmp_path / "two", tmp_path / "a"))
    assert_only_rank_0_wrote(tmp_path / "a")
    r = run_cli(*argv(command, tmp_path / "one", 4, "--no-tensorboard"))
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    record = json.loads((tmp_path / "two" / "chatrlhf.json").read_text())
    assert record["processes"] == 2 and record["config"]["num_processes"] == 2


def test_sft_in_two_processes_matches_one_only_rank_0_writes_and_a_killed_run_resumes_exactly(tmp_path):
    ref = tmp_path / "two"
    r = two_processes(argv("sft", ref, 2), env=audited(ref, tmp_path / "audit"))  # with TensorBoard
    assert r.stdout.count("eval loss") == 1  # the main rank speaks
    assert_only_rank_0_wrote(tmp_path / "audit")
    assert json.loads((ref / "chatrlhf.json").read_text())["processes"] == 2

    r = run_cli(*argv("sft", tmp_path / "one", 4))
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "one", ref)

    # SIGKILL every process at the first checkpoint, resume: the uninterrupted run's figures and weights
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", *map(str, argv("sft", killed, 2)),
                             "--num-processes", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
)
    t0 = time.time()
    while not checkpoints(killed):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.005)
    for pid in [*descendants(proc.pid), proc.pid]:  # the ranks run in sessions of their own (torchrun)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    at = checkpoints(killed)[-1][0]
    assert at < 4
    r = run_cli(*argv("sft", killed, 2, "--resume"))  # one process cannot take over two processes' random streams
    assert r.returncode == 2 and "written by 2 process(es), this run has 1" in r.stderr and "--num-processes 2" in r.stderr
    r = two_processes(argv("sft", killed, 2, "--resume"))
    assert f"(step {at})" in r.stdout
    assert_same_run(ref, killed)


def test_a_command_that_runs_in_one_process_refuses_several(tmp_path, monkeypatch):
    from chatrlhf.config import PPOConfig, QLearnConfig
    from chatrlhf.errors import UsageError
    from chatrlhf.trainers import ppo, run

    monkeypatch.setattr(run, "join_processes", lambda device: (0, 2, device))  # as rank 0 of 2 would see it
    with pytest.raises(UsageError, match="chatrlhf qlearn runs in one process so far, and 2 were launched"):
        run.Run("qlearn", QLearnConfig(output_dir=str(tmp_path)))
    cfg = PPOConfig(model="tiny-random-llama", data=[str(EXAMPLES / "dialogue_history.csv")], env="dialogue",
                    reward_fn=f"{EXAMPLES / 'reward.py'}:concise_on_topic", output_dir=str(tmp_path))
    with pytest.raises(UsageError, match="--env dialogue runs in one process so far"):
        ppo.train(cfg, log=lambda *a: None)
