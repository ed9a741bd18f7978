"""Kill an SFT run with SIGKILL after a checkpoint, resume it, and get the uninterrupted run's losses."""
import signal
import subprocess
import sys
import time

import pytest

from chatrlhf.logger import read_metrics
from chatrlhf.trainers.run import checkpoints
from conftest import EXAMPLES, kill_at_first_checkpoint, run_cli, tiny_sft_args

ARGS = ["--max-steps", "40", "--batch-size", "3", "--grad-accum", "2", "--save-steps", "5", "--eval-steps", "10",
        "--lr", "2e-3", "--seed", "7", "--model", "tiny-random-gpt2"]


def losses(out):
    return {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}


def start(out, *extra):
    cmd = [sys.executable, "-m", "chatrlhf.cli", *tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, *ARGS), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    ref = tmp_path / "ref"
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", ref, *ARGS))
    assert r.returncode == 0, r.stderr
    want = losses(ref)
    assert len(want) == 40

    out = tmp_path / "killed"
    step_at_kill = kill_at_first_checkpoint(tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, *ARGS), out)
    assert step_at_kill < 40, "the run finished before it was killed; the test proved nothing"
    assert not (out / "model.safetensors").exists()

    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, *ARGS, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"(step {step_at_kill})" in r.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    evals = [m["eval/loss"] for m in read_metrics(out) if "eval/loss" in m]
    assert len(evals) == 5    # 0, 10, 20, 30, 40: nothing logged twice


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "int"
    proc = start(out, "--save-steps", "1000")     # the only checkpoint will be the one Ctrl-C makes
    t0 = time.time()
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    found = checkpoints(out)
    assert len(found) == 1 and 0 < found[0][0] < 40
    r = run_cli(*tiny_sft_args(EXAMPLES / "dialogue_history.csv", out, *ARGS, "--save-steps", "1000", "--resume"))
    assert r.returncode == 0, r.stderr
    assert sorted(losses(out)) == list(range(1, 41))
