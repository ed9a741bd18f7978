"""Supervised fine-tuning: next-token loss on assistant tokens only.

Departures from a textbook SFT loop, and why:
  * length-bucketed batches: examples of similar length share a batch, so little compute goes to
    padding (the share of padding is logged as ``train/pad_fraction``);
  * the LM head runs only at positions that predict a reply token — on a 49k vocabulary that is a
    fifth of the model's FLOPs and most of its activation memory, spent on prompt tokens for nothing;
  * the loss is divided by the reply tokens of the whole optimizer step (over every rank), so
    micro-batch × accumulation × processes equals one big batch exactly;
  * bf16 autocast with fp32 master weights where the CPU/GPU supports it.
"""

from __future__ import annotations

import time

import torch

from chatrlhf import losses
from chatrlhf.config import SFTConfig
from chatrlhf.data import as_conversations, load_records, split_by_prompt
from chatrlhf.data.template import IGNORE, Tokenized, prompt_format, tokenize_conversation
from chatrlhf.errors import UsageError
from chatrlhf.models import autocast, count_parameters, enable_checkpointing, in_forward, load_model, unwrap
from chatrlhf.trainers.common import StepPlan, file_hashes, make_optimizer, plan_batches
from chatrlhf.trainers.run import Run, Summary


# --------------------------------------------------------------------------- data


def tokenize_all(tok, conversations, cfg: SFTConfig, log=print) -> list[Tokenized]:
    out, problems = [], []
    for conv in conversations:
        try:
            item, problem = tokenize_conversation(tok, conv.messages, cfg.max_length, cfg.overlong, conv.last_only)
        except ValueError as e:
            raise UsageError(f"--model {cfg.model}: {e}", "pass --no-chat-template for plain text") from None
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
    return in_forward(model, _trunk_then_head, model, batch, n_step_targets)


def _trunk_then_head(model, batch: dict, n_step_targets: int):
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

# metrics summed over ranks: each rank's share of the step's loss (divided by the global count), its tokens
SUMMED = ("train/loss", "train/tokens", "train/padded")


def pad_fraction(metrics: dict) -> dict:
    """The step's padding share and throughput from the (rank-summed) token counts."""
    tokens, padded = metrics.pop("train/tokens"), metrics.pop("train/padded")
    return {**metrics, "train/tokens": tokens, "train/pad_fraction": 1 - tokens / max(padded, 1),
            "train/tokens_per_s": tokens / metrics["train/step_s"]}


def load_conversations(paths: list[str], fmt: str) -> tuple[list, str]:
    """Conversations from every file, and the formats found."""
    if not paths:
        raise UsageError("--data is empty", "give one or more data files, comma-separated")
    loaded = [load_records(p, fmt) for p in paths]
    return [c for x in loaded for c in as_conversations(x)], ",".join(sorted({x.format for x in loaded}))


def train(cfg: SFTConfig, log=print) -> Summary:
    run = Run("sft", cfg, log)
    conversations, formats = load_conversations(cfg.data, cfg.format)
    if cfg.eval_data:
        train_convs, eval_convs = conversations, load_conversations(cfg.eval_data, cfg.format)[0]
    else:
        train_convs, eval_convs = split_by_prompt(conversations, cfg.eval_fraction, cfg.seed)

    model, tok = load_model(cfg, trainable=True, chat_template=cfg.chat_template, lora=cfg)
    device = run.device
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    train_items = tokenize_all(tok, train_convs, cfg, log)
    eval_items = tokenize_all(tok, eval_convs, cfg, log)
    if not train_items:
        raise UsageError(f"--data {','.join(cfg.data)}: no usable training examples", "see the problems listed above")
    # the plan of the global batch (--batch-size × processes); each rank trains on its shard of every micro-batch
    plan = StepPlan([len(x.input_ids) for x in train_items], cfg.batch_size * run.world_size, cfg.grad_accum, cfg.seed)
    n_steps = run.total_steps(plan.steps_per_epoch)
    total_params, trainable_params = count_parameters(model)
    log(f"chatrlhf sft: {formats} data, {len(train_items)} train / {len(eval_items)} eval examples, "
        f"{n_steps} steps, {trainable_params:,} of {total_params:,} parameters trainable, device {device}")

    model = run.shard_weights(model)  # FSDP: before the optimizer, which then holds this rank's shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, schedule="cosine",
                                          warmup_steps=int(cfg.warmup_ratio * n_steps), total_steps=n_steps)
    state = run.begin({"model": (model, optimizer, scheduler)}, state={"tokens": 0, "first_eval_loss": None})
    step = run.step
    if step == 0:
        state["first_eval_loss"] = evaluate(model, eval_items, cfg, tok.pad_token_id, device)
        run.log(0, {"eval/loss": state["first_eval_loss"]})
    with run.loop(n_steps):
        while run.running(step, n_steps):
            t0 = time.perf_counter()
            batches = [collate([train_items[i] for i in b], tok.pad_token_id, device) for b in run.shard(plan[step])]
            step_targets = run.total(sum(n_targets(b) for b in batches))
            loss_sum, tokens, padded = 0.0, 0, 0
            for batch in batches:
                with run.autocast():
                    loss, _ = sft_forward(model, batch, step_targets)
                run.backward(loss)
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            grad_norm = run.optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm)
            step += 1
            metrics = pad_fraction(run.reduce({"train/loss": loss_sum, "train/grad_norm": grad_norm, "train/lr": lr,
                                               "train/tokens": tokens, "train/padded": padded,
                                               "train/step_s": time.perf_counter() - t0,
                                               "train/epoch": step / plan.steps_per_epoch}, SUMMED))
            state["tokens"] += int(metrics["train/tokens"])
            if step % cfg.eval_steps == 0 or step == n_steps:
                metrics["eval/loss"] = evaluate(model, eval_items, cfg, tok.pad_token_id, device)
            if step % cfg.log_steps == 0 or "eval/loss" in metrics:
                run.log(step, metrics)
            run.end_step(step, n_steps, info=f"loss {metrics['train/loss']:.3f}  "
                         f"{metrics['train/tokens_per_s']:,.0f} tok/s")
    if step < n_steps:
        return run.stopped()
    run.save_model(model, tok)
    final = run.last_logged("eval/loss")
    return run.finish({"tokens": state["tokens"], "eval_loss_start": state.get("first_eval_loss"),
                       "eval_loss_end": final["eval/loss"] if final else None, "data": file_hashes(cfg.data),
                       "chat_template": cfg.chat_template, "prompt_format": prompt_format(tok)})
