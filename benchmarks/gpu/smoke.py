"""Every trainer's CUDA path through the real CLI, on the tiny random model (issue 24): a few steps each.

    python benchmarks/gpu/smoke.py                 # on the GPU machine (SMOKE=240 bash run.sh: after the benchmark)
    python benchmarks/gpu/smoke.py --device cpu    # the same commands on CPU, to check them here (~1 minute)

Each command runs in its own process with `--device cuda --dtype auto` and must exit 0, record the device it was given
in its run's chatrlhf.json (or write its output file) and, for the trainers, log at least one step. `ppo
--rollout-engine vllm` must be refused with a clear message where vLLM is not installed. Writes smoke-<device>.json
(into $OUT too where set) and prints one line per command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
FN = f"{EX / 'reward.py'}:concise_on_topic"
DIALOGUES, PAIRS, RATINGS, PROMPTS = (str(EX / n) for n in ("dialogue_history.csv", "preferences.jsonl",
                                                             "ratings.jsonl", "prompts.txt"))
STEPS = ["--max-steps", "2"]
COMMANDS = {
    "sft": ["sft", "--data", DIALOGUES, *STEPS],
    "reward train": ["reward", "train", "--data", PAIRS, *STEPS],
    "dpo": ["dpo", "--data", PAIRS, "--max-length", "96", *STEPS],
    "kto": ["kto", "--data", RATINGS, "--max-length", "96", *STEPS],
    "ppo": ["ppo", "--data", DIALOGUES, "--reward-fn", FN, "--samples-per-prompt", "2", "--batch-size", "4",
            "--minibatch-size", "4", "--max-new-tokens", "12", *STEPS],
    "ppo lora": ["ppo", "--data", DIALOGUES, "--reward-fn", FN, "--samples-per-prompt", "2", "--batch-size", "4",
                 "--minibatch-size", "4", "--max-new-tokens", "12", "--lora-r", "4", "--critic", "shared", *STEPS],
    "grpo": ["grpo", "--data", PROMPTS, "--reward-fn", FN, "--num-generations", "2", "--batch-size", "4",
             "--minibatch-size", "4", "--max-new-tokens", "12", *STEPS],
    "bestofn": ["bestofn", "--data", PROMPTS, "--reward-fn", FN, "--num-samples", "2", "--max-new-tokens", "8",
                "--sft", "--max-length", "64"],
    "qlearn": ["qlearn", "--data", DIALOGUES, "--references", DIALOGUES, "--max-new-tokens", "4", "--candidates", "2",
               "--max-turns", "1", "--eval-dialogues", "1", *STEPS],
}


def run(name: str, args: list[str], device: str, out: Path, limit: float) -> dict:
    folder = out / name.replace(" ", "-")
    cmd = [sys.executable, "-m", "chatrlhf", *args, "--model", "tiny-random-llama", "--device", device, "--dtype",
           "auto", "--quiet", "--output-dir", str(folder)]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = None, f"timeout after {limit:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    row = {"status": "ok" if rc == 0 else ("timeout" if rc is None else f"exit {rc}"),
           "wall_s": round(time.time() - t0, 1)}
    summary = folder / "chatrlhf.json"
    if rc == 0:
        saved = json.loads(summary.read_text()) if summary.is_file() else {}
        row["device_recorded"] = saved.get("config", {}).get("device")
        metrics = folder / "metrics.jsonl"
        row["steps_logged"] = sum(1 for _ in metrics.open()) if metrics.is_file() else 0
        if row["device_recorded"] != device:
            row["status"] = f"ran, but chatrlhf.json records device {row['device_recorded']!r}"
    if row["status"] != "ok":
        row["tail"] = text[-1500:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                   help="default: cuda where present, else cpu")
    p.add_argument("--budget", type=float, default=240, help="seconds for every command together")
    p.add_argument("--only", default=",".join(COMMANDS), help="comma-separated commands to run")
    a = p.parse_args()
    t_end = time.time() + a.budget
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": a.device, "commands": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n.strip() for n in a.only.split(",") if n.strip()]:
            left = t_end - time.time()
            row = (run(name, COMMANDS[name], a.device, Path(tmp), min(90, left)) if left > 10
                   else {"status": "skipped: out of time"})
            report["commands"][name] = row
            print(f"{name:14s} {row['status']:10s} {row.get('wall_s', '-')} s  steps logged "
                  f"{row.get('steps_logged', '-')}" + (f"\n{row['tail']}" if "tail" in row else ""), flush=True)
        # the vLLM backend where vLLM is missing: a clear refusal, exit 2, no traceback
        r = subprocess.run([sys.executable, "-m", "chatrlhf", *COMMANDS["ppo"], "--model", "tiny-random-llama",
                            "--device", a.device, "--rollout-engine", "vllm", "--output-dir", f"{tmp}/vllm"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        report["vllm_refusal"] = {"rc": r.returncode, "stderr": r.stderr[-600:],
                                  "traceback": "Traceback" in r.stderr}
        print(f"ppo --rollout-engine vllm: exit {r.returncode}: {r.stderr.strip()[-300:]}")
    name = f"smoke-{a.device}.json"
    for d in [Path(__file__).parent] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (d / name).write_text(json.dumps(report, indent=2) + "\n")
    bad = [n for n, r in report["commands"].items() if r["status"] != "ok"]
    print(f"{len(report['commands']) - len(bad)}/{len(report['commands'])} commands ok" +
          (f"; not ok: {', '.join(bad)}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
