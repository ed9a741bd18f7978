"""PPO, GRPO, RLOO and DPO on best-vs-worst samples, at equal wall-clock time, on the example task (issue 20): each
method trains the embedded SmolLM2-135M-Instruct through the real CLI (`python -m chatrlhf …` in a child process)
against examples/reward.py (a concise reply that takes up the customer's words), then ONE evaluator scores every
saved model and the start model on held-out prompts.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/methods.py [--minutes 4] [--only ppo,grpo,rloo,dpo] [--eval-samples 2]
    .venv/bin/python benchmarks/methods.py --start tiny-random-llama --minutes 0.02   # smoke run of the script

Task: examples/prompts.txt (120 customer messages written for this project); every 5th prompt (24) is held out, the
other 96 are trained on — a fixed, prompt-disjoint split. Reward: examples/reward.py:concise_on_topic, in [0, 1].
Each method gets the same --minutes of wall-clock training (`--max-minutes`; a run ends after the step that passes
it); the DPO method's budget includes its sampling. Replies: at most 48 new tokens, chat template, bf16 autocast
where the CPU has it (--dtype auto). Settings — chosen for ~5 steps in 4 minutes on a quiet 2-core CPU (a step of 16
replies took 480 s under load 9–10 here, so they could not be tuned with short runs in the session that wrote this;
see docs/example-task.md):

  ppo   LoRA r 16 (lr 3e-4), the value head on the policy trunk (--critic shared), 8 prompts × 2 samples a step, one
        PPO epoch over minibatches of 8, temperature 1, KL penalty β 0.05;
  grpo  LoRA r 16 (lr 3e-4), 4 prompts × 4 replies a step, `dapo` loss, k3 KL term β 0.04, temperature 1;
  rloo  as grpo with --advantage rloo (leave-one-out baseline, not std-scaled) and the KL in the reward (β 0.05);
  dpo   `chatrlhf bestofn`: 4 replies to each of the first --dpo-prompts (32) train prompts from the start model
        (temperature 1; all 96 would take the whole budget), best vs worst by the reward (pairs whose scores differ
        by < 0.05 dropped); then `chatrlhf dpo` on those pairs, LoRA r 16 (lr 1e-4, no warm-up), β 0.1, batch 8, for
        what is left of the budget.

Evaluator (in a child process, the same for all): --eval-samples (2) replies per held-out prompt through our engine,
temperature 1, top-k 0, top-p 1, no repetition penalty, the same seed for every model; scored by examples/reward.py
(without the trainers' missing-EOS penalty). Per model: the
mean held-out reward with a 95% bootstrap CI over prompts, the gain over the start model (paired by prompt) with its
CI, and the KL to the start model (Σ_t log π − log π_start over each sampled reply, at T = 1: unbiased). Prints a
table and writes benchmarks/results/methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's chatrlhf, as the children use
from chatrlhf.config import ModelArgs  # noqa: E402
from chatrlhf.engine import Engine, SamplingParams  # noqa: E402
from chatrlhf.evaluate.evaluator import encode, reply_logprobs  # noqa: E402
from chatrlhf.evaluate.metrics import bootstrap_ci  # noqa: E402
from chatrlhf.models import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from reward import concise_on_topic  # noqa: E402
from sft import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "prompts.txt"
REWARD = f"{ROOT / 'examples' / 'reward.py'}:concise_on_topic"
WORK = ROOT / "out" / "bench-methods"
START = "smollm2-135m"
NEW_TOKENS, TEMPERATURE = 48, 1.0
METHODS = ("ppo", "grpo", "rloo", "dpo")


def common(start: str) -> list:
    return ["--model", start, "--data", WORK / "train.txt", "--reward-fn", REWARD, "--max-new-tokens", NEW_TOKENS,
            "--quiet", "--no-tensorboard", "--seed", "0", "--dtype", "auto"]


def on_policy(start: str) -> list:
    return [*common(start), "--eval-fraction", "0", "--max-steps", 10**4, "--save-steps", 10**6, "--eval-steps", 10**6,
            "--temperature", TEMPERATURE, "--lora-r", "16", "--lr", "3e-4"]


def split() -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: every 5th prompt of examples/prompts.txt held out."""
    prompts = [x.strip() for x in PROMPTS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [p for i, p in enumerate(prompts) if i % 5 != 4], [p for i, p in enumerate(prompts) if i % 5 == 4]


def cli(*args) -> float:
    """Run `python -m chatrlhf ARGS` in a child process; its wall time in seconds (exits with its stderr on failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chatrlhf", *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"chatrlhf {args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def steps_of(out: Path) -> int:
    return json.loads((out / "chatrlhf.json").read_text())["steps"]


def train(method: str, minutes: float, start: str, dpo_prompts: int) -> dict:
    """Train one method within ``minutes``; {"model", "steps", "train_s"} (+ the DPO method's sampling figures)."""
    out = WORK / method
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a --resume of an earlier one
    if method == "ppo":
        s = cli("ppo", *on_policy(start), "--output-dir", out, "--max-minutes", minutes, "--batch-size", 8,
                "--samples-per-prompt", 2, "--minibatch-size", 8, "--ppo-epochs", 1, "--critic", "shared",
                "--kl-coef", "0.05")
    elif method in ("grpo", "rloo"):
        extra = ["--advantage", "rloo", "--kl-in-reward", "--beta", "0.05"] if method == "rloo" else ["--beta", "0.04"]
        s = cli("grpo", *on_policy(start), "--output-dir", out, "--max-minutes", minutes, "--batch-size", 4,
                "--num-generations", 4, "--micro-batch-size", 16, *extra)
    else:
        return train_dpo(out, minutes, start, dpo_prompts)
    return {"model": str(out), "steps": steps_of(out), "train_s": s}


def train_dpo(out: Path, minutes: float, start: str, dpo_prompts: int) -> dict:
    """Best-vs-worst pairs sampled from the start model for the first ``dpo_prompts`` train prompts, then DPO on them;
    the sampling counts in the budget."""
    sampled, prompts = out / "samples", out / "prompts.txt"
    out.mkdir(parents=True)
    prompts.write_text("\n".join(split()[0][:dpo_prompts]) + "\n")
    t_sample = cli("bestofn", "--model", start, "--data", prompts, "--reward-fn", REWARD, "--num-samples",
                   4, "--batch-size", 8, "--temperature", TEMPERATURE, "--max-new-tokens", NEW_TOKENS, "--min-gap",
                   "0.05", "--output-dir", sampled, "--quiet", "--no-tensorboard", "--seed", "0")
    pairs = sampled / "round-1" / "pairs.jsonl"
    n_pairs = sum(1 for x in pairs.read_text().splitlines() if x.strip())
    left = max(minutes - t_sample / 60, 0.05)
    s = cli("dpo", "--model", start, "--data", pairs, "--output-dir", out, "--quiet", "--no-tensorboard", "--seed", "0",
            "--dtype", "auto", "--max-minutes", f"{left:.3f}", "--max-steps", 10**4, "--warmup-ratio", "0",
            "--batch-size", 8, "--lora-r", "16", "--lr", "1e-4", "--beta", "0.1", "--eval-fraction", "0.1",
            "--eval-steps", 10**6, "--save-steps", 10**6, "--max-length", 384)
    return {"model": str(out), "steps": steps_of(out), "train_s": t_sample + s, "sample_s": t_sample,
            "pairs": n_pairs}


# --------------------------------------------------------------------------- the evaluator (its own process)


def evaluate_all(models: dict[str, str], samples: int, start: str) -> dict:
    """{name: figures} for every model and the start model, by one evaluator (see the module docstring)."""
    _, held = split()
    chats = [[{"role": "user", "content": p}] for p in held]
    base, tok = load_model(ModelArgs(model=start, device="cpu"))
    base.eval()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=TEMPERATURE, n=samples, seed=1234)
    out, start_means = {}, None
    for name, path in {"start": start, **models}.items():
        t0 = time.perf_counter()
        model = base if name == "start" else load_model(ModelArgs(model=path, device="cpu"))[0]
        model.eval()
        done = Engine(model, tok, "auto", max_batch=32).generate(chats, params)
        texts = [c.text.strip() for c in done]
        rewards = np.array(concise_on_topic([p for p in held for _ in range(samples)], texts)).reshape(len(held), -1)
        kl = [] if name == "start" else reply_kl(model, base, tok, chats, done, samples)
        means = rewards.mean(1)
        mean, lo, hi = bootstrap_ci(means, seed=0)
        fig = {"reward": {"mean": mean, "ci95": [lo, hi]}, "eos_rate": float(np.mean([c.finish_reason == "stop"
                                                                                     for c in done])),
               "words": float(np.mean([len(t.split()) for t in texts])), "example": texts[0], "eval_s": 0.0}
        if start_means is None:
            start_means = means
        else:
            g, glo, ghi = bootstrap_ci(means - start_means, seed=0)
            k, klo, khi = bootstrap_ci(np.array(kl).reshape(len(held), -1).mean(1), seed=0)
            fig.update(gain={"mean": g, "ci95": [glo, ghi]}, kl={"mean": k, "ci95": [klo, khi]})
        fig["eval_s"] = time.perf_counter() - t0
        out[name] = fig
        del model
    return out


def reply_kl(model, base, tok, chats, done, samples) -> list[float]:
    """Σ_t log π(y_t) − log π_start(y_t) of each sampled reply (one forward pass of each model, T = 1)."""
    prompts = [c for c in chats for _ in range(samples)]
    out = []
    with torch.no_grad():
        for i in range(0, len(done), 32):
            q, qm = encode(tok, prompts[i:i + 32], 256, "cpu")
            rows = [c.token_ids for c in done[i:i + 32]]
            width = max(len(r) for r in rows)
            r = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in rows])
            rm = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
            out += (reply_logprobs(model, q, qm, r, rm, TEMPERATURE) - reply_logprobs(base, q, qm, r, rm, TEMPERATURE)
                    ).sum(1).tolist()
    return out


def child_eval(models: dict[str, str], samples: int, start: str) -> dict:
    cmd = [sys.executable, __file__, "--side", "eval", "--eval-samples", str(samples), "--start", start, "--models",
           json.dumps(models)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"the evaluator failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def table(a, runs: dict, figures: dict) -> str:
    start = figures["start"]["reward"]["mean"]
    lines = [f"held-out reward (examples/reward.py, 0–1), {len(split()[1])} prompts × {a.eval_samples} replies; "
             f"start model {start:.3f}; {a.minutes:g} minutes of training each",
             f"{'method':8}{'wall s':>8}{'steps':>7}{'reward':>8}{'gain (95% CI)':>26}{'KL nats':>9}{'words':>7}"]
    for name, run in runs.items():
        f = figures[name]
        g = f["gain"]
        lines.append(f"{name:8}{run['train_s']:>8.0f}{run['steps']:>7}{f['reward']['mean']:>8.3f}{g['mean']:>+10.3f} "
                     f"({g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}){f['kl']['mean']:>9.2f}{f['words']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4, help="wall-clock training budget per method")
    p.add_argument("--only", default=",".join(METHODS), help="methods to run, comma-separated")
    p.add_argument("--dpo-prompts", type=int, default=32, help="train prompts the DPO method samples 4 replies for "
                   "(all 96 would take its whole 4-minute budget on 2 cores)")
    p.add_argument("--eval-samples", type=int, default=2, help="replies per held-out prompt in the evaluation")
    p.add_argument("--start", default=START, help="the start model (tiny-random-llama: a smoke run of the script)")
    p.add_argument("--side", choices=("eval",), help=argparse.SUPPRESS)
    p.add_argument("--models", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(evaluate_all(json.loads(a.models), a.eval_samples, a.start)))
        return
    methods = [m.strip() for m in a.only.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"--only: unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    train_prompts, held = split()
    (WORK / "train.txt").write_text("\n".join(train_prompts) + "\n")
    t0 = time.perf_counter()
    runs = {}
    for m in methods:
        print(f"training {m} for {a.minutes:g} minutes …", flush=True)
        runs[m] = train(m, a.minutes, a.start, a.dpo_prompts)
    print("evaluating …", flush=True)
    figures = child_eval({m: r["model"] for m, r in runs.items()}, a.eval_samples, a.start)
    text = table(a, runs, figures)
    print(text)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a), "train_prompts":
              len(train_prompts), "held_out_prompts": len(held), "runs": runs, "figures": figures,
              "total_s": time.perf_counter() - t0, "table": text}
    if a.start != START:
        return  # a smoke run: no result file
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("methods.json" if set(methods) == set(METHODS) else f"methods-{'-'.join(methods)}.json")).write_text(
        json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
