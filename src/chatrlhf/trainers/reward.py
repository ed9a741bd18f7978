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

import time

import numpy as np
import torch

from chatrlhf import losses
from chatrlhf.config import RewardTrainConfig
from chatrlhf.data.formats import parse_turns
from chatrlhf.data.pairs import split_pairs
from chatrlhf.data.readers import read_rows
from chatrlhf.data.split import group_hash
from chatrlhf.data.template import prompt_format
from chatrlhf.models import count_parameters, enable_checkpointing, save_model, train_top_layers
from chatrlhf.reward_model import encode_reply, evaluate_pairs, load_reward_model, pad_right, raw_scores, \
    reward_scores, verdict, write_report
from chatrlhf.trainers.common import StepPlan, file_hashes, make_optimizer, optimizer_step
from chatrlhf.trainers.run import Run, Summary


def fit_normalisation(model, tok, cfg: RewardTrainConfig, train_pairs) -> dict:
    """gain, bias so that gain · score + bias has mean 0 and std 1 on the reference replies."""
    if cfg.norm_data:
        rows = [r for _, r in read_rows(cfg.norm_data)]
        prompts = [parse_turns(r.get("prompt") or r.get("messages"), cfg.norm_data, i, "prompt") for i, r in enumerate(rows, 1)]
        replies = [str(r["response"]) for r in rows]
    else:  # 512 replies give the mean to ±0.045 std and the std to ±3%; each costs a forward pass (~0.1 s on a CPU)
        sample = sample_pairs(train_pairs, 256, cfg.seed)
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


def train(cfg: RewardTrainConfig, log=print) -> Summary:
    run = Run("reward train", cfg, log)
    train_pairs, eval_pairs, counts, split = split_pairs(cfg, "reward", log)
    model, tok = load_reward_model(cfg, trainable=True)
    train_top_layers(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    encoded = encode_pairs(tok, train_pairs, cfg.max_length)
    plan = StepPlan([max(len(c), len(r)) for c, r in encoded], cfg.batch_size, cfg.grad_accum, cfg.seed)
    n_steps = run.total_steps(plan.steps_per_epoch)
    log(f"chatrlhf reward: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({dict(counts)}), "
        f"{n_steps} steps, {count_parameters(model)[1]:,} trainable parameters, device {run.device}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay,
                                          warmup_steps=int(cfg.warmup_ratio * n_steps), total_steps=n_steps)
    run.begin({"model": (model, optimizer, scheduler)})
    step = run.step
    with run.loop(n_steps):
        while run.running(step, n_steps):
            t0 = time.perf_counter()
            chunks = plan[step]
            stats = train_step(model, tok, run, [[encoded[i] for i in c] for c in chunks],
                               [[train_pairs[i] for i in c] for c in chunks])
            stats["train/lr"] = scheduler.get_last_lr()[0]
            stats["train/grad_norm"] = optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm)
            step += 1
            stats["train/pairs_per_s"] = sum(len(c) for c in chunks) / (time.perf_counter() - t0)
            run.log(step, stats)
            run.end_step(step, n_steps, info=f"loss {stats['train/bt']:.3f}  {stats['train/pairs_per_s']:.2f} pairs/s")
    if step < n_steps:
        return run.stopped()
    return _finish(run, model, tok, train_pairs, eval_pairs, counts, split)


def train_step(model, tok, run: Run, encoded: list[list], pairs: list[list]) -> dict:
    """Forward and backward of one optimizer step's micro-batches; each micro-batch's loss is weighted by its
    share of the step's pair weight, so micro-batch × accumulation equals one big batch."""
    total_weight = sum(p.weight for chunk in pairs for p in chunk)
    stats = {"loss/bt": 0.0, "reward/accuracy": 0.0, "reward/margin": 0.0}
    for enc, chunk in zip(encoded, pairs):
        batch = pair_batch(enc, chunk, tok.pad_token_id, run.device)
        with run.autocast():
            scores = raw_scores(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
        n = len(chunk)
        loss, m = losses.bradley_terry_loss(scores[:n], scores[n:], batch["margin"] if run.cfg.margin else None,
                                            batch["tie"], batch["weight"])
        share = float(batch["weight"].sum()) / total_weight
        (loss * share).backward()
        for k in stats:
            stats[k] += float(m[k]) * share
    return {f"train/{k.split('/')[-1]}": v for k, v in stats.items()}


def _finish(run: Run, model, tok, train_pairs, eval_pairs, counts, split: str) -> Summary:
    """Normalise, measure on the held-out pairs, decide the gate, save the model with what it was trained on."""
    cfg = run.cfg
    model.eval()
    model.config.chatrlhf_reward_norm = {**fit_normalisation(model, tok, cfg, train_pairs), "margin_loss": cfg.margin}
    if not eval_pairs:
        split = "training pairs: no held-out pairs"
    with run.autocast():
        metrics = evaluate_pairs(model, tok, eval_pairs or sample_pairs(train_pairs, 256, cfg.seed), cfg.batch_size,
                                 cfg.max_length)
    metrics["split"] = split
    gate = verdict(metrics, cfg.min_accuracy, cfg.max_length_corr)
    run.log(run.step, {"eval/accuracy": metrics["accuracy"], "eval/ece": metrics["ece"],
                       "eval/length_corr": metrics["length_corr"]})
    save_model(model, tok, run.out)
    write_report(run.out, metrics, gate)
    return run.finish({"pairs": dict(counts), "held_out_pairs": len(eval_pairs), "accuracy": metrics["accuracy"],
                       "ece": metrics["ece"], "split": split, "gate": gate,
                       "training": {"files": file_hashes(cfg.data),
                                    "prompt_groups": sorted({group_hash(p) for p in train_pairs})},
                       "prompt_format": prompt_format(tok)})
