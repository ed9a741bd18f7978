"""RL quality, measured outside the trainers: chatrlhf PPO against TRL's GRPOTrainer on one continuation task,
same model, batch, tokens, temperature and wall-clock budget; both saved models scored by the independent
evaluator (`chatrlhf eval`: plain transformers generation in a fresh process) on held-out prompts.

    .venv/bin/pip install -e '.[bench]'        # TRL 1.16
    .venv/bin/python benchmarks/rl_quality.py [--minutes 25] [--held-out 64] [--trl-lr 1e-5] [--reuse-ours]

Task: continue the first 12 words of a user turn from HH-RLHF helpful-base (the distinct openings of the split in
../shared/data; the last --held-out of them held out, the rest trained on) as plain text; reward = VADER compound
sentiment of the continuation (vaderSentiment, from PyPI), in [-1, 1]. Both sides: SmolLM2-135M-Instruct, 16
prompts × 4 samples a step, 32 new tokens, temperature 1, bf16 autocast where the CPU has it, the same wall budget
(each trainer stops after the step that passes it).
TRL: GRPOTrainer with its defaults (lr 1e-6 unless --trl-lr, β 0, `dapo` loss) — batch 16 × accumulation 4. chatrlhf: `chatrlhf
ppo --no-chat-template` (missing-EOS penalty off for continuations), full fine-tuning at lr 1e-5 with the value
head on the policy trunk, one PPO epoch over minibatches of 16 (4 epochs took 100 s a step: 15 steps in 25
minutes), KL penalty β 0.05 against the start model. Evaluation: 4 replies per held-out prompt, T = 1, 32 tokens,
against the start model: the reward gain and KL (95% bootstrap CIs over prompts). Goal: our held-out gain ≥ 1.5 ×
TRL's at equal or lower KL. Writes benchmarks/results/rl_quality.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base"
WORK = ROOT / "out" / "bench-rl-quality"
N_PROMPTS, N_SAMPLES, NEW_TOKENS, WORDS = 16, 4, 32, 12


def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    global _ANALYSER
    if "_ANALYSER" not in globals():
        _ANALYSER = SentimentIntensityAnalyzer()
    return _ANALYSER


def ours_reward(prompts, responses) -> list[float]:
    """chatrlhf's --reward-fn signature: VADER compound score of each reply."""
    return [_vader().polarity_scores(r)["compound"] for r in responses]


def trl_reward(completions, **_) -> list[float]:
    """TRL's reward-function signature, the same score."""
    return ours_reward(None, completions)


def openings() -> list[str]:
    """The distinct first 12 words of the first user turn of HH-RLHF helpful-base records (turns of ≥ 12 words)."""
    out, seen = [], set()
    with gzip.open(HH / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0]
            words = text.split()
            if len(words) >= WORDS and (o := " ".join(words[:WORDS])) not in seen:
                seen.add(o)
                out.append(o)
    return out


def run_ours(a) -> dict:
    out = WORK / "chatrlhf-ppo"
    cmd = ["ppo", "--model", "smollm2-135m", "--data", WORK / "train.txt", "--eval-fraction", "0", "--no-chat-template",
           "--reward-fn", f"{__file__}:ours_reward", "--output-dir", out, "--batch-size", N_PROMPTS,
           "--samples-per-prompt", N_SAMPLES, "--minibatch-size", 16, "--ppo-epochs", 1, "--max-new-tokens", NEW_TOKENS,
           "--temperature", "1.0", "--lr", "1e-5", "--critic", "shared", "--max-steps", 1000, "--max-minutes", a.minutes,
           "--save-steps", 10**6, "--quiet", "--no-tensorboard", "--seed", "0"]
    t0 = time.perf_counter()
    cli(cmd)
    summary = json.loads((out / "chatrlhf.json").read_text())
    return {"model": str(out), "steps": summary["steps"], "train_s": time.perf_counter() - t0}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from chatrlhf.models import resolve_model, use_bf16

    torch.manual_seed(0)
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = (WORK / "train.txt").read_text().splitlines()
    out = WORK / "trl-grpo"
    args = GRPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=16, gradient_accumulation_steps=4,
                      num_generations=N_SAMPLES, max_completion_length=NEW_TOKENS, max_steps=1000, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, seed=0, temperature=1.0,
                      **({"learning_rate": a.trl_lr} if a.trl_lr else {}),
                      bf16=use_bf16("auto", torch.device("cpu")))
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok)
    deadline = time.perf_counter() + 60 * a.minutes

    class Budget(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            control.should_training_stop = time.perf_counter() > deadline

    trainer.add_callback(Budget())
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    return {"model": str(out), "steps": trainer.state.global_step, "train_s": time.perf_counter() - t0,
            "lr": args.learning_rate, "beta": args.beta, "loss_type": args.loss_type}


def cli(args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "chatrlhf.cli", *map(str, args)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        sys.exit(f"chatrlhf {args[0]} failed:\n{r.stderr[-4000:]}")
    return r


def evaluate(model: str, name: str) -> dict:
    """The independent evaluator on the held-out openings, against the start model."""
    out = WORK / f"eval-{name}"
    cli(["eval", "--model", model, "--baseline", "smollm2-135m", "--data", WORK / "held_out.txt", "--no-chat-template",
         "--reward-fn", f"{__file__}:ours_reward", "--samples-per-prompt", N_SAMPLES, "--max-new-tokens", NEW_TOKENS,
         "--temperature", "1.0", "--max-prompts", 10**6, "--output-dir", out, "--seed", "1"])
    rep = json.loads((out / "eval.json").read_text())
    fn = rep["rewards"]["fn"]
    return {"base_reward": fn["baseline"], "reward": fn["model"], "gain": fn["gain"], "win_rate": fn["win_rate"],
            "kl": rep["kl_to_baseline"], "eos_rate": rep["metrics"]["model"]["eos_rate"],
            "length": rep["metrics"]["model"]["length_tokens"], "report": str(out / "report.html")}


def child(side: str, a) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--minutes", str(a.minutes), "--held-out", str(a.held_out),
           *(["--trl-lr", str(a.trl_lr)] if a.trl_lr else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        sys.exit(f"{side} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=25, help="wall-clock training budget per side")
    p.add_argument("--held-out", type=int, default=64, help="held-out openings evaluated (4 replies each)")
    p.add_argument("--trl-lr", type=float, default=None, help="TRL's learning rate (default: GRPOConfig's, 1e-6)")
    p.add_argument("--reuse-ours", action="store_true",
                   help="keep the chatrlhf run already in out/bench-rl-quality (same prompts) and rerun only TRL")
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if not HH.is_dir():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    if a.side:
        print(json.dumps({"ours": run_ours, "trl": run_trl}[a.side](a)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    texts = openings()
    (WORK / "train.txt").write_text("\n".join(texts[:-a.held_out]) + "\n")
    (WORK / "held_out.txt").write_text("\n".join(texts[-a.held_out:]) + "\n")
    previous = ROOT / "benchmarks" / "results" / "rl_quality.json"
    if a.reuse_ours and not previous.is_file():
        sys.exit(f"--reuse-ours: no earlier run in {previous}")
    sides = {"chatrlhf_ppo": json.loads(previous.read_text())["chatrlhf_ppo"] if a.reuse_ours else child("ours", a),
             "trl_grpo": child("trl", a)}
    for name, s in sides.items():
        if not (a.reuse_ours and name == "chatrlhf_ppo"):
            s.update(evaluate(s["model"], name))
    ours, trl = sides["chatrlhf_ppo"], sides["trl_grpo"]
    ratio = ours["gain"]["mean"] / trl["gain"]["mean"] if trl["gain"]["mean"] > 0 else float("inf")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a), **sides,
              "gain_ratio": ratio, "kl_ratio": ours["kl"]["mean"] / max(trl["kl"]["mean"], 1e-9),
              "goal_met": ratio >= 1.5 and ours["kl"]["mean"] <= trl["kl"]["mean"]}
    print(f"held-out VADER reward, {a.held_out} openings × {N_SAMPLES} replies (start model "
          f"{ours['base_reward']['mean']:+.3f}); {a.minutes:g} minutes of training each")
    print(f"{'':14}{'steps':>6}{'reward':>9}{'gain (95% CI)':>26}{'KL nats (95% CI)':>24}")
    for name, s in (("chatrlhf PPO", ours), ("TRL GRPO", trl)):
        g, k = s["gain"], s["kl"]
        print(f"{name:14}{s['steps']:>6}{s['reward']['mean']:>+9.3f}{g['mean']:>+10.3f} ({g['ci95'][0]:+.3f} to "
              f"{g['ci95'][1]:+.3f}){k['mean']:>10.2f} ({k['ci95'][0]:.2f}–{k['ci95'][1]:.2f})")
    print(f"ratio: our held-out gain is {ratio:.2f}× TRL GRPO's at {result['kl_ratio']:.2f}× its KL — goal ≥ 1.5× at "
          f"≤ 1× KL: {'met' if result['goal_met'] else 'not met'}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_quality.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
