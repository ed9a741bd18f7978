"""Reward-model training: Bradley–Terry on pairs from preferences, ratings and corrections.

Departures from a textbook loop, and why:
  * chosen and rejected replies of a batch go through one forward pass (2B sequences), and the head
    runs only at each sequence's last non-pad token;
  * one epoch with the learning rate annealed linearly to 0 by default (RL_DETAILS item 11);
  * after training, gain and bias are fitted so that scores of reference replies (SFT samples given
    with --norm-data, else the training replies) have mean 0 and std 1 (item 10);
  * training ends with the held-out evaluation and the gate verdict that RL checks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from chatrlhf import losses
from chatrlhf.config import RewardTrainConfig
from chatrlhf.data import load_records, split_by_prompt
from chatrlhf.data.formats import parse_turns
from chatrlhf.data.pairs import build_pairs
from chatrlhf.data.readers import read_rows
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.reward_eval import evaluate_pairs, verdict, write_report
from chatrlhf.logger import MetricsLogger
from chatrlhf.models import autocast, count_parameters, enable_checkpointing, load_reward_model, save_model, \
    train_top_layers
from chatrlhf.rewards import encode_reply, pad_right, raw_scores, reward_scores
from chatrlhf.trainers.common import EpochBatches, StopFlag, make_optimizer, progress_bar, seed_everything


def parse_weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, _, val = part.partition("=")
        if key not in ("preference", "rating", "correction") or not val:
            raise UsageError(f"--source-weights: bad entry '{part}'", "write e.g. preference=1,rating=0.5,correction=2")
        try:
            out[key] = float(val)
        except ValueError:
            raise UsageError(f"--source-weights: '{val}' is not a number", "") from None
    return out


def load_pairs(cfg: RewardTrainConfig, log=print):
    weights = parse_weights(cfg.source_weights)  # flags are checked before any data is read
    records = []
    for path in filter(None, (x.strip() for x in cfg.data.split(","))):
        loaded = load_records(path, cfg.format)
        records += loaded.records
        for p in loaded.problems[:10]:
            log(f"chatrlhf reward: {p.where}: {p.message}")
        if len(loaded.problems) > 10:
            log(f"chatrlhf reward: … and {len(loaded.problems) - 10} more problems in {path}")
    pairs, counts = build_pairs(records, weights, cfg.ties, cfg.both_bad)
    if not pairs:
        raise UsageError(f"--data {cfg.data}: no preference pairs", "give preferences, ratings or corrections")
    return pairs, counts


def fit_normalisation(model, tok, cfg: RewardTrainConfig, train_pairs) -> dict:
    """gain, bias so that gain · score + bias has mean 0 and std 1 on the reference replies."""
    if cfg.norm_data:
        rows = [r for _, r in read_rows(cfg.norm_data)]
        prompts = [parse_turns(r.get("prompt") or r.get("messages"), cfg.norm_data, i, "prompt") for i, r in enumerate(rows, 1)]
        replies = [str(r["response"]) for r in rows]
    else:  # 512 pairs estimate a mean and a std well enough; scoring thousands would cost minutes
        sample = sample_pairs(train_pairs, 512, cfg.seed)
        prompts = [p.prompt for p in sample for _ in (0, 1)]
        replies = [x for p in sample for x in (p.chosen, p.rejected)]
    s = np.array(reward_scores(model, tok, prompts, replies, cfg.batch_size * 2, cfg.max_length, normalise=False))
    std = float(s.std()) or 1.0
    return {"gain": 1.0 / std, "bias": -float(s.mean()) / std, "fitted_on": len(s),
            "reference": cfg.norm_data or "training replies"}


def encode_pairs(tok, pairs, max_length: int) -> list[tuple[list[int], list[int]]]:
    return [(encode_reply(tok, p.prompt, p.chosen, max_length), encode_reply(tok, p.prompt, p.rejected, max_length))
            for p in pairs]


def sample_pairs(pairs: list, n: int, seed: int) -> list:
    if len(pairs) <= n:
        return list(pairs)
    idx = np.random.default_rng(seed).choice(len(pairs), n, replace=False)
    return [pairs[i] for i in sorted(idx)]


def pair_batch(encoded, pairs, pad_id: int, device) -> dict:
    """Chosen then rejected replies as one right-padded batch of 2B sequences (one forward pass)."""
    batch = pad_right([c for c, _ in encoded] + [r for _, r in encoded], pad_id, device)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=device)
    batch["tie"] = torch.tensor([p.tie for p in pairs], dtype=torch.bool, device=device)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)
    return batch


def train(cfg: RewardTrainConfig, log=print) -> dict:
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed)
    pairs, counts = load_pairs(cfg, log)
    train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
    model, tok = load_reward_model(cfg, trainable=True)
    device = next(model.parameters()).device
    train_top_layers(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    n_batches = math.ceil(len(train_pairs) / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n_batches / cfg.grad_accum))
    log(f"chatrlhf reward: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({dict(counts)}), "
        f"{total_steps} steps, {count_parameters(model)[1]:,} trainable parameters, device {device}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay,
                                          warmup_steps=int(cfg.warmup_ratio * total_steps), total_steps=total_steps)
    logger = MetricsLogger(out, cfg.tensorboard)
    logger.config(cfg)
    encoded = encode_pairs(tok, train_pairs, cfg.max_length)
    lengths = [max(len(c), len(r)) for c, r in encoded]
    plan = EpochBatches(lengths, cfg.batch_size, cfg.seed)  # length-bucketed: little padding
    with StopFlag() as stop, progress_bar(cfg.quiet) as bar:
        task = bar.add_task("reward", total=total_steps, info="")
        for step in range(1, total_steps + 1):
            t0 = time.perf_counter()
            chunks = [plan[(step - 1) * cfg.grad_accum + k] for k in range(cfg.grad_accum)]
            total_weight = sum(train_pairs[i].weight for c in chunks for i in c)
            stats = {"loss/bt": 0.0, "reward/accuracy": 0.0, "reward/margin": 0.0}
            for chunk in chunks:
                batch = pair_batch([encoded[i] for i in chunk], [train_pairs[i] for i in chunk], tok.pad_token_id, device)
                with autocast(cfg.dtype, device):
                    scores = raw_scores(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
                n = len(chunk)
                loss, m = losses.bradley_terry_loss(scores[:n], scores[n:], batch["margin"] if cfg.margin else None,
                                                    batch["tie"], batch["weight"])
                share = float(batch["weight"].sum()) / total_weight  # micro-batch × accumulation = one batch
                (loss * share).backward()
                for k in stats:
                    stats[k] += float(m[k]) * share
            lr = scheduler.get_last_lr()[0]
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pairs_per_s = sum(len(c) for c in chunks) / (time.perf_counter() - t0)
            logger.log(step, {**{f"train/{k.split('/')[-1]}": v for k, v in stats.items()}, "train/lr": lr,
                              "train/pairs_per_s": pairs_per_s})
            bar.update(task, completed=step, info=f"loss {stats['loss/bt']:.3f}  {pairs_per_s:.2f} pairs/s")
            if stop.stop:
                log("chatrlhf reward: interrupted; saving the model trained so far")
                break
    model.eval()
    model.config.chatrlhf_reward_norm = fit_normalisation(model, tok, cfg, train_pairs)
    metrics = evaluate_pairs(model, tok, eval_pairs or sample_pairs(train_pairs, 256, cfg.seed), cfg.batch_size,
                             cfg.max_length)
    metrics["split"] = "held-out (prompt-disjoint)" if eval_pairs else "training pairs: no held-out split"
    gate = verdict(metrics, cfg.min_accuracy, cfg.max_length_corr)
    logger.log(step, {"eval/accuracy": metrics["accuracy"], "eval/ece": metrics["ece"],
                      "eval/length_corr": metrics["length_corr"]})
    logger.close()
    save_model(model, tok, out)
    write_report(out, metrics, gate)
    summary = {"command": "reward train", "steps": step, "pairs": dict(counts), "held_out_pairs": len(eval_pairs),
               "accuracy": metrics["accuracy"], "ece": metrics["ece"], "gate": gate, "config": asdict(cfg)}
    (out / "chatrlhf.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
