"""Reward-model speed, memory and accuracy: chatrlhf vs TRL's RewardTrainer on the same pairs.

    .venv/bin/pip install -e '.[bench]'        # TRL 1.16
    .venv/bin/python benchmarks/reward.py [--train-pairs 64] [--eval-pairs 200] [--train-layers -1]

Pairs: short single-turn HH-RLHF pairs from ../shared/data/hh-rlhf/helpful-base (prompt 8–60
tokens, replies 8–60, chosen ≠ rejected, one pair per prompt): the first --train-pairs train, the next --eval-pairs
(other prompts) are held out. SmolLM2-135M with a fresh scalar head, batch 8, one epoch, lr 1e-5
annealed linearly to 0, fp32 (or, with --dtype auto, bf16 autocast on both sides where the CPU has
it). Each side runs in its own child process (one after the other, in this
one run); pairs/s is over the optimizer steps after the first; held-out accuracy is computed with the
same scoring code for both trained models. Prints the figures and the ratios; writes
benchmarks/results/reward.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo import bf16_on  # noqa: E402
from sft import machine, peak_rss_gb, step_times  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def bench_pairs(n_train: int, n_eval: int):
    from chatrlhf.data import load_records
    from chatrlhf.data.split import group_key
    from chatrlhf.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    n = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    picked, seen = [], set()
    for p in load_records(HH).records:
        if len(p.prompt) == 1 and 8 <= n(p.prompt[0]["content"]) <= 60 and all(
                8 <= n(x) <= 60 for x in (p.chosen, p.rejected)) and group_key(p) not in seen:
            seen.add(group_key(p))
            picked.append(p)
    if len(picked) < n_train + n_eval:
        sys.exit(f"only {len(picked)} short pairs found; lower --train-pairs/--eval-pairs")
    return picked[:n_train], picked[n_train:n_train + n_eval]


def accuracy(model, tok, pairs) -> float:
    from chatrlhf.reward_model import evaluate_pairs

    return evaluate_pairs(model, tok, pairs, 16, 512)["accuracy"]


def run_ours(a) -> dict:
    from chatrlhf.config import RewardTrainConfig
    from chatrlhf.logger import read_metrics
    from chatrlhf.trainers.reward import train

    train_pairs, eval_pairs = bench_pairs(a.train_pairs, a.eval_pairs)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in train_pairs))
    cfg = RewardTrainConfig(model="smollm2-135m", recipe="full", data=[str(data)], output_dir=str(tmp / "rm"),
                            batch_size=8, epochs=1,
                            lr=1e-5, eval_fraction=0.0, quiet=True, tensorboard=False, dtype=a.dtype, seed=0,
                            train_layers=a.train_layers, gradient_checkpointing=a.gradient_checkpointing)
    t0 = time.perf_counter()
    train(cfg, log=lambda *x: None)
    wall = time.perf_counter() - t0
    peak_train = peak_rss_gb()
    import gc

    gc.collect()
    steps = [m for m in read_metrics(cfg.output_dir) if "train/pairs_per_s" in m][1:]
    pairs_per_s = len(steps) * 8 / sum(8 / m["train/pairs_per_s"] for m in steps)
    from chatrlhf.config import ModelArgs
    from chatrlhf.reward_model import load_reward_model

    model, tok = load_reward_model(ModelArgs(model=cfg.output_dir))
    return {"pairs_per_s": pairs_per_s, "peak_rss_gb": peak_rss_gb(), "peak_rss_train_gb": peak_train, "wall_s": wall,
            "held_out_accuracy": accuracy(model, tok, eval_pairs)}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from chatrlhf.models import resolve_model

    train_pairs, eval_pairs = bench_pairs(a.train_pairs, a.eval_pairs)
    torch.manual_seed(0)
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train_pairs])
    args = RewardConfig(output_dir=tempfile.mkdtemp(prefix="bench-rm-trl-"), per_device_train_batch_size=8,
                        num_train_epochs=1, learning_rate=1e-5, lr_scheduler_type="linear", logging_steps=1,
                        save_strategy="no", report_to=[], use_cpu=True, seed=0, max_length=512, bf16=bf16_on(a.dtype))
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    times = step_times(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    model.eval()
    from chatrlhf.data.template import ensure_chat_template

    ensure_chat_template(tok)
    return {"pairs_per_s": 8 * len(times[1:]) / sum(times[1:]), "peak_rss_gb": peak_rss_gb(), "wall_s": wall,
            "held_out_accuracy": accuracy(model, tok, eval_pairs)}


def child(side: str, a) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--train-pairs", str(a.train_pairs), "--eval-pairs",
           str(a.eval_pairs), "--train-layers", str(a.train_layers), "--dtype", a.dtype,
           "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{side} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-pairs", type=int, default=64)
    p.add_argument("--eval-pairs", type=int, default=150)
    p.add_argument("--train-layers", type=int, default=-1, help="chatrlhf side: train only the top N blocks")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="chatrlhf side; on by default in both tools")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"),
                   help="both sides: fp32 (default), or bf16 autocast where the CPU has it (auto)")
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if not HH.is_file():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")
    if a.side:
        print(json.dumps(run_ours(a) if a.side == "ours" else run_trl(a)))
        return
    ours, trl = child("ours", a), child("trl", a)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a), "chatrlhf": ours,
              "trl": trl, "speed_ratio": ours["pairs_per_s"] / trl["pairs_per_s"],
              "memory_ratio": ours["peak_rss_gb"] / trl["peak_rss_gb"]}
    print(f"{'':10}{'pairs/s':>9}{'peak RSS GB':>13}{'held-out acc':>14}")
    for name, r in (("chatrlhf", ours), ("TRL", trl)):
        print(f"{name:10}{r['pairs_per_s']:>9.2f}{r['peak_rss_gb']:>13.2f}{r['held_out_accuracy']:>14.3f}")
    print(f"ratio: {result['speed_ratio']:.2f}× TRL's pairs/s at {result['memory_ratio']:.2f}× its peak RSS "
          f"(goal ≥ 2× at ≤ 0.5×, same accuracy)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"reward{'' if a.train_layers < 0 else f'-top{a.train_layers}'}.json").write_text(
        json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
