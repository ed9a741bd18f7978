"""Small pure pieces the trainers share: seeding, the optimizer and its step, step counts, data plans that
are pure functions of the step (so that resuming needs only the step number), file hashes.
The run's plumbing (checkpoints, resume, Ctrl-C, logging, summary) is in run.py."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
import torch

# at the top, not inside make_optimizer: importing it draws from Python's global RNG, which would then move
# after a checkpoint's RNG state was restored, and a resumed run would no longer repeat the uninterrupted one
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params: list, lr: float, weight_decay: float, eps: float = 1e-8, schedule: str = "linear",
                   warmup_steps: int = 0, total_steps: int = 1):
    """(AdamW, LR scheduler) for the trainable parameters. The fused AdamW kernel (one pass over each tensor)
    is 4.5× faster than the default on CPU: 0.04 s against 0.19 s per step for 135M parameters here."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused or None)
    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    return opt, make(opt, warmup_steps, total_steps)


def optimizer_step(optimizer, scheduler, params: list, max_grad_norm: float) -> float:
    """Clip (0 = no clipping, the norm still measured), step, advance the schedule (None: none), zero the
    gradients; returns the gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    """Every trainer counts its optimizer steps this way: --max-steps, else --epochs × steps per epoch."""
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))


def file_hashes(paths) -> dict[str, str | None]:
    """{path: SHA-256 of the file's bytes} (None for a folder, such as a datasets directory)."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).is_file() else None for p in paths}


def plan_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within windows of 50 batches, shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [list(map(int, chunk[i:i + batch_size])) for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class EpochBatches:
    """Micro-batch i of a length-bucketed plan reshuffled every epoch (seed + epoch). A pure function
    of i, so a resumed run needs only i; the plan is made once per epoch, not once per batch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.per_epoch = -(-len(lengths) // batch_size)
        self._epoch, self._plan = None, []

    def __getitem__(self, i: int) -> list[int]:
        epoch, idx = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, plan_batches(self.lengths, self.batch_size, self.seed + epoch)
        return self._plan[idx]


class StepPlan:
    """The micro-batches of optimizer step ``s`` (0-based), a pure function of ``s``: each epoch's length-bucketed
    plan is cut into steps of ``grad_accum`` micro-batches, and the last step of an epoch takes what is left, so
    every example is seen once per epoch (10 micro-batches, accumulation 4: steps of 4, 4 and 2)."""

    def __init__(self, lengths: list[int], batch_size: int, grad_accum: int, seed: int):
        self.batches = EpochBatches(lengths, batch_size, seed)
        self.grad_accum = grad_accum
        self.steps_per_epoch = -(-self.batches.per_epoch // grad_accum)

    def __getitem__(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        first = epoch * self.batches.per_epoch + k * self.grad_accum
        end = min(first + self.grad_accum, (epoch + 1) * self.batches.per_epoch)
        return [self.batches[i] for i in range(first, end)]
