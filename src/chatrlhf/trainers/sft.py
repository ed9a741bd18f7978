"""Supervised fine-tuning: next-token loss on assistant tokens only.

Departures from a textbook SFT loop, and why:
  * length-bucketed batches: examples of similar length share a batch, so little compute goes to
    padding (the share of padding is logged as ``train/pad_fraction``);
  * the LM head runs only at positions that predict a reply token — on a 49k vocabulary that is a
    fifth of the model's FLOPs and most of its activation memory, spent on prompt tokens for nothing;
  * the loss is divided by the reply tokens of the whole optimizer step, so micro-batch ×
    accumulation equals one big batch exactly;
  * bf16 autocast with fp32 master weights where the CPU/GPU supports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from chatrlhf import losses
from chatrlhf.config import SFTConfig
from chatrlhf.data import as_conversations, load_records, split_by_prompt
from chatrlhf.data.template import IGNORE, Tokenized, tokenize_conversation
from chatrlhf.errors import UsageError
from chatrlhf.logger import MetricsLogger, read_metrics
from chatrlhf.models import autocast, count_parameters, enable_checkpointing, load_model, save_model, unwrap
from chatrlhf.trainers.common import EpochBatches, StopFlag, checkpoints, load_checkpoint, make_optimizer, \
    plan_batches, progress_bar, save_checkpoint, seed_everything


# --------------------------------------------------------------------------- data


def tokenize_all(tok, conversations, cfg: SFTConfig, log=print) -> list[Tokenized]:
    out, problems = [], []
    for conv in conversations:
        try:
            item, problem = tokenize_conversation(tok, conv.messages, cfg.max_length, cfg.overlong, conv.last_only)
        except ValueError as e:
            raise UsageError(f"--model {cfg.model}: {e}", "pass --no-chat-template") from None
        if problem:
            problems.append(f"{conv.where}: {problem}")
        if item is not None:
            out.append(item)
    if problems:
        log(f"chatrlhf: {len(problems)} over-long or empty record(s):")
        for p in problems[:10]:
            log(f"  {p}")
        if len(problems) > 10:
            log(f"  … and {len(problems) - 10} more")
    return out


def collate(items: list[Tokenized], pad_id: int, device) -> dict:
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def n_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# --------------------------------------------------------------------------- model step


def sft_forward(model, batch: dict, n_step_targets: int):
    """Loss of one micro-batch; the LM head runs only where a reply token is predicted."""
    base = unwrap(model)
    hidden = base.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state  # a KV cache would pin every layer's K/V
    select = batch["labels"][:, 1:] != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][select])
    return losses.sft_loss(logits, batch["labels"][:, 1:][select], n_step_targets)


@torch.no_grad()
def evaluate(model, items: list[Tokenized], cfg: SFTConfig, pad_id: int, device) -> float:
    if not items:
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    for b in plan_batches([len(x.input_ids) for x in items], cfg.batch_size, seed=0):
        batch = collate([items[i] for i in b], pad_id, device)
        with autocast(cfg.dtype, device):
            _, m = sft_forward(model, batch, 1)
        total += float(m["loss/nll_sum"])
        count += int(m["loss/tokens"])
    model.train()
    return total / max(count, 1)


# --------------------------------------------------------------------------- the loop


def train(cfg: SFTConfig, log=print) -> dict:
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed)
    loaded = load_records(cfg.data, cfg.format)
    conversations = as_conversations(loaded)
    if cfg.eval_data:
        train_convs, eval_convs = conversations, as_conversations(load_records(cfg.eval_data, cfg.format))
    else:
        train_convs, eval_convs = split_by_prompt(conversations, cfg.eval_fraction, cfg.seed)

    model, tok = load_model(cfg, trainable=True, plain_template=cfg.no_chat_template)
    device = next(model.parameters()).device
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    train_items = tokenize_all(tok, train_convs, cfg, log)
    eval_items = tokenize_all(tok, eval_convs, cfg, log)
    if not train_items:
        raise UsageError(f"--data {cfg.data}: no usable training examples", "see the problems listed above")
    lengths = [len(x.input_ids) for x in train_items]
    n_batches = math.ceil(len(train_items) / cfg.batch_size)
    steps_per_epoch = max(1, n_batches // cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    total_params, trainable_params = count_parameters(model)
    log(f"chatrlhf sft: {loaded.format} data, {len(train_items)} train / {len(eval_items)} eval examples, "
        f"{total_steps} steps, {trainable_params:,} of {total_params:,} parameters trainable, device {device}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, schedule="cosine",
                                          warmup_steps=int(cfg.warmup_ratio * total_steps), total_steps=total_steps)

    state = {"micro_batch": 0, "tokens": 0, "first_eval_loss": None}
    step = 0
    if cfg.resume:
        found = checkpoints(out)
        if not found:
            raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}", "drop --resume to start afresh")
        step, path = found[-1]
        state.update(load_checkpoint(path, {"model": (model, optimizer, scheduler)}))
        log(f"chatrlhf sft: resumed from {path} (step {step})")
    logger = MetricsLogger(out, cfg.tensorboard, resume_step=step if cfg.resume else None)
    logger.config(cfg)

    plan = EpochBatches(lengths, cfg.batch_size, cfg.seed)

    def next_batch():
        state["micro_batch"] += 1
        return collate([train_items[i] for i in plan[state["micro_batch"] - 1]], tok.pad_token_id, device)

    def checkpoint():
        save_checkpoint(out, step, {"model": (model, optimizer, scheduler)}, state)

    if step == 0:
        state["first_eval_loss"] = evaluate(model, eval_items, cfg, tok.pad_token_id, device)
        logger.log(0, {"eval/loss": state["first_eval_loss"]})
    interrupted = False
    with StopFlag() as stop, progress_bar(cfg.quiet) as bar:
        task = bar.add_task("sft", total=total_steps, completed=step, info="")
        while step < total_steps:
            t0 = time.perf_counter()
            batches = [next_batch() for _ in range(cfg.grad_accum)]
            step_targets = sum(n_targets(b) for b in batches)
            loss_sum, tokens, padded = 0.0, 0, 0
            for batch in batches:
                with autocast(cfg.dtype, device):
                    loss, _ = sft_forward(model, batch, step_targets)
                loss.backward()
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens"] += tokens
            dt = time.perf_counter() - t0
            metrics = {"train/loss": loss_sum, "train/grad_norm": float(grad_norm),
                       "train/lr": lr, "train/tokens": tokens, "train/step_s": dt,
                       "train/tokens_per_s": tokens / dt,
                       "train/pad_fraction": 1 - tokens / padded, "train/epoch": state["micro_batch"] / n_batches}
            if step % cfg.eval_steps == 0 or step == total_steps:
                metrics["eval/loss"] = evaluate(model, eval_items, cfg, tok.pad_token_id, device)
            if step % cfg.log_steps == 0 or "eval/loss" in metrics:
                logger.log(step, metrics)
            bar.update(task, completed=step, info=f"loss {loss_sum:.3f}  {tokens / dt:,.0f} tok/s")
            if step % cfg.save_steps == 0 or step == total_steps:
                checkpoint()
            if stop.stop:
                if step % cfg.save_steps and step != total_steps:
                    checkpoint()
                interrupted = True
                break
    logger.close()
    if interrupted:
        log(f"chatrlhf sft: stopped at step {step}; resume with the same command plus --resume")
        return {"interrupted": True, "step": step}
    return _finish(cfg, model, tok, out, state, step)


def _finish(cfg: SFTConfig, model, tok, out: Path, state: dict, step: int) -> dict:
    save_model(model, tok, out)
    final = [m for m in read_metrics(out) if "eval/loss" in m]
    summary = {"command": "sft", "steps": step, "tokens": state["tokens"],
               "eval_loss_start": state.get("first_eval_loss"), "eval_loss_end": final[-1]["eval/loss"] if final else None,
               "data": cfg.data, "data_sha256": hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
               if Path(cfg.data).is_file() else None, "config": asdict(cfg)}
    (out / "chatrlhf.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
