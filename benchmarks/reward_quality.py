"""Reward-model quality on real human preferences: train the embedded SmolLM2-135M on HH-RLHF pairs
and report prompt-disjoint held-out accuracy (goal ≥ 63% at 135M parameters).

    .venv/bin/python benchmarks/reward_quality.py [--max-length 256] [--train-layers -1] [--eval-pairs 600]
    # the small-data recipes (docs/reward.md): frozen trunk, read-out layer and pooling, ensemble, epochs
    .venv/bin/python benchmarks/reward_quality.py --no-extra --max-train-pairs 2000 --freeze-trunk --layer 16 \
        --pooling mean --lr 1e-3 --epochs 20 --patience 3 --val-fraction 0.1 --ensemble 5 --out out/rm-frozen

Recipe (defaults): train on hh-rlhf/extra/* (helpful-online + helpful-rejection-sampled) plus the
helpful-base and harmless-base pairs whose prompts are not held out; hold out --eval-pairs pairs of
whole prompts from helpful-base + harmless-base (prompt-disjoint, seeded); pairs with chosen ==
rejected, and the few with an empty reply, are dropped; one epoch, batch 8, lr 1e-5 annealed to 0, inputs cut to the last
--max-length tokens. Writes the reward model to out/reward-hh and benchmarks/results/reward_quality.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf"
OASST = tuple(ROOT.parent / "shared" / "data" / "sft" / name
              for name in ("oasst1_en_validation_messages.jsonl.gz", "oasst_en100_rank_pairs.jsonl.gz"))


def held_out_keys(pairs: list, eval_pairs: int, seed: int = 0) -> set[str]:
    """The prompt keys (group_key) held out: whole prompts, in a seeded shuffle, until ``eval_pairs`` pairs are."""
    from chatrlhf.data.split import group_key

    per_key = Counter(group_key(r) for r in pairs)
    keys = sorted(per_key)
    random.Random(seed).shuffle(keys)
    held, n = set(), 0
    for k in keys:
        if n >= eval_pairs:
            break
        held.add(k)
        n += per_key[k]
    return held


def hh_split(eval_pairs: int, extra: bool = True, seed: int = 0):
    """(train pairs, held-out pairs, held-out prompt keys): whole prompts of helpful-base + harmless-base are
    held out until ``eval_pairs`` pairs are; training gets the rest (+ hh-rlhf/extra/*). Pairs with an empty
    reply are dropped (the trainer drops chosen == rejected itself)."""
    from chatrlhf.data import load_records
    from chatrlhf.data.split import group_key

    usable = lambda recs: [r for r in recs if r.chosen.strip() and r.rejected.strip()]  # noqa: E731
    base = usable([r for split in ("helpful-base", "harmless-base")
                   for r in load_records(HH / split / "test.jsonl.gz").records])
    held = held_out_keys(base, eval_pairs, seed)
    more = usable([r for split in ("helpful-online", "helpful-rejection-sampled")
                   for r in load_records(HH / "extra" / split / "test.jsonl.gz").records]) if extra else []
    train = [r for r in more + base if group_key(r) not in held]
    return train, [r for r in base if group_key(r) in held], held


def oasst_split(eval_pairs: int, seed: int = 0, paths: tuple = OASST):
    """(train pairs, held-out pairs, held-out prompt keys) of every OpenAssistant preference pair in ``paths`` (the
    oasst1 English validation export's ranked sibling replies, 1,021 pairs, and the en-100 rank pairs, 732):
    deduplicated by prompt and both replies (6 trees, 35 pairs, are in both files with the same texts and ranks:
    1,718 pairs remain), whole prompts held out as hh_split does (group_key: the first user turn, so a tree never
    lands on both sides)."""
    from chatrlhf.data import load_records
    from chatrlhf.data.records import prompt_key
    from chatrlhf.data.split import group_key

    seen, pairs = set(), []
    for path in paths:
        for r in load_records(path).records:
            key = (prompt_key(r.prompt), r.chosen.strip(), r.rejected.strip())
            if key not in seen:
                seen.add(key)
                pairs.append(r)
    held = held_out_keys(pairs, eval_pairs, seed)
    return [r for r in pairs if group_key(r) not in held], [r for r in pairs if group_key(r) in held], held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-layers", type=int, default=-1)
    p.add_argument("--eval-pairs", type=int, default=600)
    p.add_argument("--max-train-pairs", type=int, default=0, help="0 = all")
    p.add_argument("--no-extra", action="store_true",
                   help="train on the base splits only (in-distribution for the held-out pairs, half the time)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="out/reward-hh")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    recipe = p.add_argument_group("recipes (flags of `reward train`, docs/reward.md)")
    recipe.add_argument("--freeze-trunk", action="store_true")
    recipe.add_argument("--layer", type=int, default=-1)
    recipe.add_argument("--pooling", choices=("last", "mean", "both"), default="last")
    recipe.add_argument("--ensemble", type=int, default=1)
    recipe.add_argument("--epochs", type=float, default=1.0)
    recipe.add_argument("--patience", type=int, default=0)
    recipe.add_argument("--average-checkpoints", type=int, default=1)
    recipe.add_argument("--label-smoothing", type=float, default=0.0)
    recipe.add_argument("--head-dropout", type=float, default=0.0)
    recipe.add_argument("--weight-decay", type=float, default=0.0)
    recipe.add_argument("--val-fraction", type=float, default=0.0,
                        help="prompts of the TRAINING pairs held out for --patience and the temperature (the test "
                             "pairs never choose anything); 0 = none")
    a = p.parse_args()
    if not HH.is_dir():
        sys.exit(f"{HH} not found: this benchmark needs ../shared/data")

    from chatrlhf.config import ModelArgs, RewardTrainConfig
    from chatrlhf.evaluate.metrics import bootstrap_ci
    from chatrlhf.reward_model import evaluate_pairs
    from chatrlhf.reward_model import load_reward_model
    from chatrlhf.trainers.reward import train

    train_pairs, eval_pairs, held = hh_split(a.eval_pairs, extra=not a.no_extra)
    random.Random(0).shuffle(train_pairs)
    if a.max_train_pairs:
        train_pairs = train_pairs[:a.max_train_pairs]
    tmp = ROOT / "out" / "reward-hh-data"
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                            for r in train_pairs))
    print(f"{len(train_pairs)} train pairs, {len(eval_pairs)} held-out pairs ({len(held)} prompts)", flush=True)
    cfg = RewardTrainConfig(model="smollm2-135m", data=[str(data)], output_dir=a.out, batch_size=a.batch_size,
                            epochs=a.epochs, lr=a.lr, eval_fraction=a.val_fraction, max_length=a.max_length,
                            dtype="auto", train_layers=a.train_layers, gradient_checkpointing=a.gradient_checkpointing,
                            seed=0, quiet=not sys.stdout.isatty(), freeze_trunk=a.freeze_trunk, layer=a.layer,
                            pooling=a.pooling, ensemble=a.ensemble, patience=a.patience,
                            average_checkpoints=a.average_checkpoints, label_smoothing=a.label_smoothing,
                            head_dropout=a.head_dropout, weight_decay=a.weight_decay)
    t0 = time.perf_counter()
    train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    model, tok = load_reward_model(ModelArgs(model=a.out))
    m = evaluate_pairs(model, tok, eval_pairs, 16, a.max_length)
    right = [float(x > 0) + 0.5 * (x == 0) for x in m["_margins"]]
    _, lo, hi = bootstrap_ci(right)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a),
              "train_pairs": len(train_pairs), "held_out_pairs": len(eval_pairs), "accuracy": m["accuracy"],
              "accuracy_ci95": [lo, hi], "ece": m["ece"], "ece_uncalibrated": m["ece_uncalibrated"],
              "temperature": m["temperature"], "ensemble": m.get("ensemble"), "length_corr": m["length_corr"],
              "per_source": m["per_source"], "longer_reply_baseline_accuracy": m["longer_reply_baseline_accuracy"],
              "train_minutes": minutes}
    print(json.dumps(result, indent=2))
    print(f"held-out accuracy {m['accuracy']:.3f} (goal ≥ 0.63); the 'longer reply wins' baseline gets "
          f"{m['longer_reply_baseline_accuracy']:.3f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_quality.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
