"""Direct preference optimisation (Rafailov et al. 2023) and its variants on preference pairs, on the run scaffold.

Pairs come from every feedback format the reward model reads (data/pairs.py): ties and both-bad pairs are kept as
ties (or dropped, --ties / --both-bad), and each pair keeps its weight (annotator reliability, rating pairs' 1/C(K, 2),
--source-weights). The losses are pure functions in losses.py ("preference optimisation").

Departures from the paper's recipe, and why:
  * the reference is the policy before training, its log-probs computed ONCE in one pass and cached in the run folder
    (preference.py): no second model in memory (with LoRA: the adapters-off base), nothing recomputed on --resume;
  * chosen and rejected replies of a micro-batch go through one forward pass (TRL's concatenated_forward), and the LM
    head runs only where a reply token is predicted;
  * a tie trains toward equal implicit rewards (the Bradley–Terry 50/50 likelihood, as the reward model), not skipped;
  * each micro-batch's loss is divided by the pair weight of the whole optimizer step (over every rank), so
    micro-batch × accumulation × processes equals one big batch.
"""

from __future__ import annotations

import time

import torch

from chatrlhf import losses
from chatrlhf.config import DPOConfig
from chatrlhf.data.pairs import split_pairs
from chatrlhf.data.template import prompt_format
from chatrlhf.errors import UsageError
from chatrlhf.models import count_parameters, enable_checkpointing, load_model, train_top_layers
from chatrlhf.preference import all_logps, collate, collate_trunk, encode_reply, frozen_depth, reference_logps, \
    sequence_logps
from chatrlhf.rollout import deadline_of, out_of_time
from chatrlhf.trainers.common import StepPlan, file_hashes, make_optimizer
from chatrlhf.trainers.run import Run, Summary


# --------------------------------------------------------------------------- data


def check(cfg: DPOConfig) -> None:
    """Flags that cannot work, refused before anything loads."""
    if cfg.beta <= 0:
        raise UsageError(f"--beta {cfg.beta}: must be > 0", "DPO's usual value is 0.1")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise UsageError(f"--label-smoothing {cfg.label_smoothing}: must be in [0, 0.5)",
                         "it is the share of flipped labels; 0.5 would mean the labels say nothing")
    if cfg.label_smoothing and cfg.loss_type not in ("sigmoid", "robust"):
        raise UsageError(f"--label-smoothing with --loss-type {cfg.loss_type}: it would do nothing",
                         "use it with --loss-type sigmoid (cDPO) or robust")
    if cfg.rpo_alpha < 0:
        raise UsageError(f"--rpo-alpha {cfg.rpo_alpha}: must be >= 0", "0 turns the NLL term off")


def encode_pairs(tok, pairs: list, max_length: int, log=print) -> tuple[list, list]:
    """(pairs, [(chosen, rejected) Tokenized]) of the pairs that keep reply tokens on both sides under --max-length."""
    kept, encoded, dropped = [], [], []
    for p in pairs:
        (c, why_c), (r, why_r) = (encode_reply(tok, p.prompt, x, max_length) for x in (p.chosen, p.rejected))
        if c is None or r is None:
            dropped.append(f"{p.where}: {why_c or why_r}")
            continue
        kept.append(p)
        encoded.append((c, r))
    if dropped:
        log(f"chatrlhf dpo: {len(dropped)} pair(s) dropped, a reply has no token left under --max-length {max_length}:")
        for d in dropped[:5]:
            log(f"  {d}")
    return kept, encoded


def sides(encoded: list) -> list:
    """Every chosen reply, then every rejected one."""
    return [c for c, _ in encoded] + [r for _, r in encoded]


def pair_tensors(pairs: list, device) -> dict:
    return {"tie": torch.tensor([p.tie for p in pairs], dtype=torch.bool, device=device),
            "weight": torch.tensor([float(p.weight) for p in pairs], dtype=torch.float32, device=device)}


# --------------------------------------------------------------------------- the step and the evaluation


def dpo_batch_loss(model, run: Run, pad_id: int, encoded: list, pairs: list, ref: torch.Tensor, total_weight: float,
                   trunk: tuple | None = None):
    """Loss and metrics of one micro-batch: chosen then rejected replies in one forward pass. ``ref`` (B, 2).
    ``trunk`` (chosen states, rejected states, depth): the frozen lower blocks' output kept from the reference pass."""
    cfg, n = run.cfg, len(pairs)
    batch = collate(sides(encoded), pad_id, run.device)
    if trunk is not None:
        batch = collate_trunk(batch, trunk[0] + trunk[1], trunk[2])
    with run.autocast():
        logps, tokens = sequence_logps(model, batch)
    ref = ref.to(run.device)
    return losses.dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing,
                           cfg.rpo_alpha, chosen_tokens=tokens[:n], rejected_tokens=tokens[n:],
                           total_weight=total_weight, **pair_tensors(pairs, run.device))


def train_step(model, run: Run, pad_id: int, chunks: list[list[int]], encoded: list, pairs: list,
               ref: torch.Tensor, frozen: dict | None = None) -> dict:
    """Forward and backward of this rank's part of one optimizer step's micro-batches; metrics weighted by each
    micro-batch's share of the step's pair weight over every rank (the loss metrics are already divided by it), so
    the step's metrics are their sum over ranks. ``frozen``: see :func:`prepare`."""
    total = run.total(sum(float(pairs[i].weight) for c in chunks for i in c))
    stats: dict[str, float] = {}
    for chunk in chunks:
        kept = None if frozen is None else ([frozen["states"][i] for i in chunk],
                                           [frozen["states"][len(pairs) + i] for i in chunk], frozen["depth"])
        loss, m = dpo_batch_loss(model, run, pad_id, [encoded[i] for i in chunk], [pairs[i] for i in chunk], ref[chunk],
                                 total, kept)
        run.backward(loss)
        share = sum(float(pairs[i].weight) for i in chunk) / total
        for k, v in m.items():
            stats[k] = stats.get(k, 0.0) + float(v) * (1.0 if k.startswith("loss/") else share)
    return stats


@torch.no_grad()
def evaluate(model, run: Run, pad_id: int, encoded: list, pairs: list, ref: torch.Tensor) -> dict:
    """Held-out loss, margin accuracy (decided pairs), implicit rewards and log-probs of all held-out pairs."""
    if not pairs:
        return {}
    cfg = run.cfg
    items = sides(encoded)
    logps = all_logps(model, items, cfg.batch_size * 2, pad_id, run.device, cfg.dtype)
    tokens = torch.tensor([float(x.n_targets) for x in items])
    n = len(pairs)
    _, m = losses.dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing,
                           cfg.rpo_alpha, chosen_tokens=tokens[:n], rejected_tokens=tokens[n:],
                           **pair_tensors(pairs, "cpu"))
    return {f"eval/{EVAL_NAMES.get(k, k.replace('/', '_'))}": float(v) for k, v in m.items()}


EVAL_NAMES = {"rewards/accuracies": "accuracy", "rewards/margins": "margin", "loss/dpo": "loss"}


# --------------------------------------------------------------------------- the loop


def prepare(cfg: DPOConfig, run: Run, log=print):
    """Pairs, the policy, the encoded pairs, the reference log-probs ({"train", "eval"}: (N, 2) each) and, with
    --train-layers, the frozen lower blocks' output of every training sequence ({"states", "depth"}, else None)."""
    check(cfg)
    train_pairs, eval_pairs, counts, split = split_pairs(cfg, "dpo", log)
    model, tok = load_model(cfg, trainable=True, chat_template=cfg.chat_template, lora=cfg)
    train_pairs, train_enc = encode_pairs(tok, train_pairs, cfg.max_length, log)
    eval_pairs, eval_enc = encode_pairs(tok, eval_pairs, cfg.max_length, log)
    if not train_pairs:
        raise UsageError(f"--data {','.join(cfg.data)}: no pair left to train on", "see the problems listed above")
    # chosen replies then rejected ones, batched as evaluate() batches them: the untrained policy's held-out margins
    # are then exactly 0
    groups = {"train": sides(train_enc), "eval": sides(eval_enc)}
    # with --train-layers the frozen lower blocks' output is kept from the reference pass: they never run again
    depth = frozen_depth(model, cfg.train_layers, groups["train"])
    frozen = {"states": [None] * len(groups["train"]), "depth": depth} if depth else None
    t0 = time.perf_counter()
    flat = reference_logps(model, groups, run.out, cfg.model, cfg.dtype, cfg.batch_size * 2, tok.pad_token_id,
                           run.device, log, reuse=cfg.resume, write=run.is_main,
                           states={"train": frozen["states"]} if frozen else None,
                           depth=depth)
    ref = {name: flat[name].view(2, -1).T for name in groups}  # (N, 2): chosen, rejected
    train_top_layers(model, cfg.train_layers)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    log(f"chatrlhf dpo: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({dict(counts)}), reference "
        f"log-probs ready in {time.perf_counter() - t0:.1f} s, {count_parameters(model)[1]:,} trainable parameters, "
        f"device {run.device}")
    return model, tok, (train_pairs, train_enc), (eval_pairs, eval_enc), ref, counts, split, frozen


def train(cfg: DPOConfig, log=print) -> Summary:
    run = Run("dpo", cfg, log)
    model, tok, (train_pairs, train_enc), (eval_pairs, eval_enc), ref, counts, split, frozen = prepare(cfg, run, log)
    plan = StepPlan([max(len(c.input_ids), len(r.input_ids)) for c, r in train_enc], cfg.batch_size * run.world_size,
                    cfg.grad_accum, cfg.seed)  # the global batch; each rank trains on its shard (run.shard)
    n_steps = run.total_steps(plan.steps_per_epoch)
    model = run.shard_weights(model)  # FSDP: after the reference pass, before the optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * n_steps),
                                          total_steps=n_steps)
    state = run.begin({"model": (model, optimizer, scheduler)}, state={"eval_start": None})
    step = run.step
    if step == 0:
        state["eval_start"] = evaluate(model, run, tok.pad_token_id, eval_enc, eval_pairs, ref["eval"])
        run.log(0, state["eval_start"])
    deadline = deadline_of(cfg)
    with run.loop(n_steps):
        while run.running(step, n_steps):
            t0 = time.perf_counter()
            chunks = run.shard(plan[step])
            stats = train_step(model, run, tok.pad_token_id, chunks, train_enc, train_pairs, ref["train"], frozen)
            stats = run.reduce(stats, tuple(stats))  # shares of the step: summed over ranks
            stats["train/lr"] = scheduler.get_last_lr()[0]
            stats["train/grad_norm"] = run.optimizer_step(optimizer, scheduler, params, cfg.max_grad_norm)
            step += 1
            stats["train/pairs_per_s"] = sum(len(c) for c in plan[step - 1]) / (time.perf_counter() - t0)
            stats["train/epoch"] = step / plan.steps_per_epoch
            n_steps = out_of_time("dpo", run, step, n_steps, deadline, log)
            if step % cfg.eval_steps == 0 or step == n_steps:
                stats.update(evaluate(model, run, tok.pad_token_id, eval_enc, eval_pairs, ref["eval"]))
            run.log(step, stats)
            run.end_step(step, n_steps, info=f"loss {stats['loss/dpo']:.3f}  acc {stats['rewards/accuracies']:.2f}  "
                         f"{stats['train/pairs_per_s']:.2f} pairs/s")
    if step < n_steps:
        return run.stopped()
    run.save_model(model, tok)
    return run.finish({"pairs": dict(counts), "train_pairs": len(train_pairs), "held_out_pairs": len(eval_pairs),
                       "split": split, "eval_start": state["eval_start"] or None,
                       "eval_end": run.last_eval("eval/accuracy"),
                       "stopped_by_time": state.get("stopped_at") == run.step,
                       "data": file_hashes(cfg.data), "chat_template": cfg.chat_template,
                       "prompt_format": prompt_format(tok)})
