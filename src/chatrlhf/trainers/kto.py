"""Kahneman–Tversky optimisation (Ethayarajh et al. 2024) on unpaired feedback, on the run scaffold: single replies
marked desirable or undesirable — thumbs and star ratings (4–5 desirable, 1–2 undesirable, 3 dropped), corrections,
either side of a preference (data/pairs.py, ``unpaired_feedback``) — each with its weight (annotator reliability).
The loss is the pure ``losses.kto_loss``; the reference point z₀ is ``losses.kto_reference_point``.

Departures from the paper's recipe and TRL's, and why:
  * the reference is the policy before training, its log-probs — of the replies and of the KL sequences — computed
    ONCE and cached in the run folder (preference.py): no second model in memory (LoRA: the adapters-off base);
  * the KL sequences that estimate z₀ pair each example's prompt with a fixed other example's reply (a random
    derangement of the data, seeded): TRL rotates replies within a batch of a fixed sequential order, which is the
    same kind of fixed mismatched pair; ours need no sequential sampling and exist for a batch of one;
  * z₀ is estimated over the whole optimizer step's KL sequences before its micro-batches run, so micro-batch ×
    accumulation equals one big batch;
  * λ_D, λ_U default to the paper's class balance (λ_D·n_D / λ_U·n_U = 1), not 1 and 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from chatrlhf import losses
from chatrlhf.config import KTOConfig
from chatrlhf.data.pairs import load_feedback, split_held_out, unpaired_feedback
from chatrlhf.data.template import Tokenized, prompt_format
from chatrlhf.errors import UsageError
from chatrlhf.models import count_parameters, enable_checkpointing, load_model, train_top_layers
from chatrlhf.preference import all_logps, collate, encode_reply, reference_logps, sequence_logps
from chatrlhf.rollout import deadline_of, out_of_time
from chatrlhf.trainers.common import StepPlan, file_hashes, make_optimizer
from chatrlhf.trainers.run import Run, Summary

# --------------------------------------------------------------------------- data


@dataclass
class Examples:
    """One split, encoded: N replies with their KL sequences (the prompt with another example's reply)."""
    rows: list              # N Rating records (score +1 desirable, −1 undesirable)
    items: list[Tokenized]  # prompt + its own reply
    kl_items: list[Tokenized]  # prompt + the reply of example kl_partners(N)[i]
    desirable: torch.Tensor    # (N,) bool
    weight: torch.Tensor       # (N,)

    def __len__(self) -> int:
        return len(self.rows)


def check(cfg: KTOConfig) -> None:
    if cfg.beta <= 0:
        raise UsageError(f"--beta {cfg.beta}: must be > 0", "KTO's usual value is 0.1")
    for name in ("desirable_weight", "undesirable_weight"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0", "or auto (leave it out)")


def load_examples(cfg: KTOConfig, log=print):
    """(train, held-out Rating lists, counts, how the held-out ones were chosen)."""
    def load(paths):
        rows, counts = unpaired_feedback(load_feedback(paths, cfg.format, log, "kto"))
        if not rows:
            raise UsageError(f"--data {','.join(paths)}: no desirable or undesirable reply",
                             "give ratings, thumbs, corrections or preferences")
        return rows, counts
    return split_held_out(cfg, load, "replies", "kto", log)


def kl_partners(n: int, seed: int) -> list[int]:
    """partner[i] ≠ i for n ≥ 2: each example's place in a seeded random cycle through all of them."""
    order = np.random.default_rng(seed).permutation(n)
    partner = [0] * n
    for k in range(n):
        partner[int(order[k])] = int(order[(k + 1) % n])
    return partner


def encode_examples(tok, rows: list, max_length: int, seed: int, log=print) -> Examples:
    kept, items, dropped = [], [], []
    for r in rows:
        item, why = encode_reply(tok, r.prompt, r.response, max_length)
        if item is None:
            dropped.append(f"{r.where}: {why}")
            continue
        kept.append(r)
        items.append(item)
    if dropped:
        log(f"chatrlhf kto: {len(dropped)} repl(ies) dropped, no token left under --max-length {max_length}:")
        for d in dropped[:5]:
            log(f"  {d}")
    partner = kl_partners(len(kept), seed)
    kl_items = [encode_reply(tok, r.prompt, kept[j].response, max_length)[0] for r, j in zip(kept, partner)]
    return Examples(kept, items, kl_items, torch.tensor([r.score > 0 for r in kept], dtype=torch.bool),
                    torch.tensor([float(r.weight) for r in kept]))


def class_weights(cfg: KTOConfig, data: Examples, log=print) -> tuple[float, float]:
    """(λ_D, λ_U): the flags, else the paper's balance; a warning when given ones leave its range [1, 4/3]."""
    n_d, n_u = int(data.desirable.sum()), int((~data.desirable).sum())
    auto_d, auto_u = losses.kto_class_weights(n_d, n_u)
    lam_d = cfg.desirable_weight if cfg.desirable_weight is not None else auto_d
    lam_u = cfg.undesirable_weight if cfg.undesirable_weight is not None else auto_u
    ratio = lam_d * n_d / max(lam_u * n_u, 1e-9)
    if n_d and n_u and not 1.0 <= ratio <= 4 / 3 + 1e-9:
        log(f"chatrlhf kto: warning: λ_D·n_D / λ_U·n_U = {ratio:.2f} with {n_d} desirable and {n_u} undesirable "
            f"replies; the paper recommends [1, 4/3] (leave --desirable-weight / --undesirable-weight out for that)")
    return lam_d, lam_u


# --------------------------------------------------------------------------- the step and the evaluation


def train_step(model, run: Run, pad_id: int, chunks: list[list[int]], data: Examples, ref: dict, lam) -> dict:
    """z₀ from the whole step's KL sequences (no gradient; one pass per micro-batch, so that every process makes as
    many as the others — under FSDP or DeepSpeed each pass gathers weights from all), then forward and backward of
    each micro-batch — this process's part of the step (``chunks``), its loss divided by the step's weight over every
    process; the metrics are shares of the step (summed over processes)."""
    cfg, idx = run.cfg, [i for c in chunks for i in c]
    kl = torch.cat([all_logps(model, [data.kl_items[i] for i in c], len(c), pad_id, run.device, cfg.dtype)
                    for c in chunks]) if chunks else torch.zeros(0)
    z0 = losses.kto_reference_point(kl, ref["kl"][idx], run.summer).to(run.device)
    total = run.total(float(data.weight[idx].sum()))
    n_d = int(data.desirable[idx].sum()) if idx else 0
    counts = run.total([float(n_d), float(len(idx) - n_d)])  # each class's replies in the step, over every process
    stats: dict[str, float] = {}
    for chunk in chunks:
        batch = collate([data.items[i] for i in chunk], pad_id, run.device)
        with run.autocast():
            logps, _ = sequence_logps(model, batch)
        loss, m = losses.kto_loss(logps, ref["main"][chunk].to(run.device), data.desirable[chunk].to(run.device), z0,
                                  cfg.beta, *lam, weight=data.weight[chunk].to(run.device), total_weight=total,
                                  class_counts=counts)
        run.backward(loss)
        share = float(data.weight[chunk].sum()) / total  # z₀ is the step's: its shares add up to it
        for k, v in m.items():
            stats[k] = stats.get(k, 0.0) + float(v) * (share if k == "kto/kl" else 1.0)
    return stats


def pairwise_auc(rewards: torch.Tensor, desirable: torch.Tensor) -> float:
    """P(reward of a desirable reply > reward of an undesirable one) over all such pairs, ties half (the ROC AUC)."""
    d, u = rewards[desirable], rewards[~desirable]
    if not len(d) or not len(u):
        return float("nan")
    diff = d[:, None] - u[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@torch.no_grad()
def evaluate(model, run: Run, pad_id: int, data: Examples, ref: dict, lam) -> dict:
    """Held-out loss, z₀, mean implicit rewards β·(log π − log π_ref) of each class and their AUC."""
    if not len(data):
        return {}
    cfg = run.cfg
    logps = all_logps(model, data.items, cfg.batch_size * 2, pad_id, run.device, cfg.dtype)
    kl = all_logps(model, data.kl_items, cfg.batch_size * 2, pad_id, run.device, cfg.dtype)
    z0 = losses.kto_reference_point(kl, ref["kl"])
    loss, m = losses.kto_loss(logps, ref["main"], data.desirable, z0, cfg.beta, *lam, weight=data.weight)
    out = {"eval/loss": float(loss), "eval/kl": float(z0), "eval/rewards_desirable": float(m["rewards/desirable"]),
           "eval/rewards_undesirable": float(m["rewards/undesirable"])}
    if data.desirable.any() and not data.desirable.all():  # the AUC and the margin need both classes
        out["eval/auc"] = pairwise_auc(cfg.beta * (logps - ref["main"]), data.desirable)
        out["eval/margin"] = out["eval/rewards_desirable"] - out["eval/rewards_undesirable"]
    return out


# --------------------------------------------------------------------------- the loop


def prepare(cfg: KTOConfig, run: Run, log=print):
    """The policy, the encoded train and held-out examples, their reference log-probs, λ_D and λ_U."""
    check(cfg)
    train_rows, eval_rows, counts, split = load_examples(cfg, log)
    model, tok = load_model(cfg, trainable=True, chat_template=cfg.chat_template, lora=cfg)
    train = encode_examples(tok, train_rows, cfg.max_length, cfg.seed, log)
    held = encode_examples(tok, eval_rows, cfg.max_length, cfg.seed + 1, log)
    if len(train) < 2:
        raise UsageError(f"--data {','.join(cfg.data)}: {len(train)} usable replies",
                         "KTO's reference point needs at least two (one reply's prompt with another's reply)")
    t0 = time.perf_counter()
    flat = reference_logps(model, {"train": train.items, "train_kl": train.kl_items, "eval": held.items,
                                   "eval_kl": held.kl_items}, run.out, cfg.model, cfg.dtype, cfg.batch_size * 2,
                           tok.pad_token_id, run.device, log, reuse=cfg.resume, write=run.is_main)
    ref = {name: {"main": flat[name], "kl": flat[f"{name}_kl"]} for name in ("train", "eval")}
    lam = class_weights(cfg, train, log)
    train_top_layers(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    log(f"chatrlhf kto: {len(train)} train ({int(train.desirable.sum())} desirable) / {len(held)} held-out replies "
        f"({dict(counts)}), λ_D {lam[0]:.3g}, λ_U {lam[1]:.3g}, reference log-probs ready in "
        f"{time.perf_counter() - t0:.1f} s, {count_parameters(model)[1]:,} trainable parameters, device {run.device}")
    return model, tok, train, held, ref, lam, counts, split


def train(cfg: KTOConfig, log=print) -> Summary:
    run = Run("kto", cfg, log)
    model, tok, data, held, ref, lam, counts, split = prepare(cfg, run, log)
    plan = StepPlan([len(x.input_ids) for x in data.items], cfg.batch_size * run.world_size, cfg.grad_accum,
                    cfg.seed)  # the global batch; each process trains on its shard (run.shard)
    n_steps = run.total_steps(plan.steps_per_epoch)
    model = run.shard_weights(model)  # FSDP: after the reference pass, before the optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * n_steps),
                                          total_steps=n_steps)
    state = run.begin({"model": (model, optimizer, scheduler)}, state={"eval_start": None})
    step = run.step
    if step == 0:
        state["eval_start"] = evaluate(model, run, tok.pad_token_id, held, ref["eval"], lam)
        run.log(0, state["eval_start"])
    deadline = deadline_of(cfg)
    with run.loop(n_steps):
        while run.running(step, n_steps):
            t0 = time.perf_counter()
            chunks = run.shard(plan[step])
            stats = train_step(model, run, tok.pad_token_id, chunks, data, ref["train"], lam)
            stats = run.reduce(stats, tuple(stats))  # shares of the step: summed over processes
            stats["train/lr"] = scheduler.get_last_lr()[0]
            stats["train/grad_norm"] = run.optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm)
            step += 1
            stats["train/replies_per_s"] = sum(len(c) for c in plan[step - 1]) / (time.perf_counter() - t0)
            stats["train/epoch"] = step / plan.steps_per_epoch
            n_steps = out_of_time("kto", run, step, n_steps, deadline, log)
            if step % cfg.eval_steps == 0 or step == n_steps:
                stats.update(evaluate(model, run, tok.pad_token_id, held, ref["eval"], lam))
            run.log(step, stats)
            run.end_step(step, n_steps, info=f"loss {stats['loss/kto']:.3f}  KL {stats['kto/kl']:.3f}  "
                         f"{stats['train/replies_per_s']:.2f} replies/s")
    if step < n_steps:
        return run.stopped()
    run.save_model(model, tok)
    return run.finish({"replies": dict(counts), "train_replies": len(data), "held_out_replies": len(held),
                       "desirable_weight": lam[0], "undesirable_weight": lam[1], "split": split,
                       "eval_start": state["eval_start"] or None,
                       "eval_end": run.last_eval("eval/loss"),
                       "stopped_by_time": state.get("stopped_at") == run.step,
                       "data": file_hashes(cfg.data), "chat_template": cfg.chat_template,
                       "prompt_format": prompt_format(tok)})
