"""Pieces every trainer uses: seeding, checkpoints that resume exactly, the progress bar, Ctrl-C.

Checkpoints live in OUTPUT_DIR/checkpoints/step-N and are written to a temporary folder first and
renamed, so a run killed at any moment leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from chatrlhf.errors import UsageError
from chatrlhf.logger import progress_bar  # noqa: F401 - moved to logger.py (evaluate/ uses it too); trainers import it here


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params: list, lr: float, weight_decay: float, eps: float = 1e-8, schedule: str = "linear",
                   warmup_steps: int = 0, total_steps: int = 1):
    """(AdamW, LR scheduler) for the trainable parameters. The fused AdamW kernel (one pass over each tensor)
    is 4.5× faster than the default on CPU: 0.04 s against 0.19 s per step for 135M parameters here."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: str | Path, step: int, parts: dict, state: dict, keep: int = 2,
                    generators: dict[str, torch.Generator] | None = None) -> Path:
    """``parts`` = {name: (module, optimizer, scheduler)}: each module's trainable weights
    (``name.safetensors``), every optimizer and scheduler, the global RNG, the trainer's own random streams
    (``generators``) and its ``state``."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    for name, (module, _, _) in parts.items():
        save_file(trainable_state(module), tmp / f"{name}.safetensors")
    torch.save({"optimizers": {n: o.state_dict() for n, (_, o, _) in parts.items()},
                "schedulers": {n: s.state_dict() for n, (_, _, s) in parts.items()}, "rng": rng_state(),
                "generators": {n: g.get_state() for n, g in (generators or {}).items()}},
               tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(checkpoints(out_dir))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(out_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / "trainer_state.json").is_file():
            found.append((int(p.name.split("-")[1]), p))
    return sorted(found)


def load_checkpoint(path: Path, parts: dict, generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the same ``parts`` and ``generators``; returns the
    trainer state (without the step, which the folder's name gives)."""
    from safetensors.torch import load_file

    # the run's own checkpoint, written by save_checkpoint (optimizer and RNG states need pickle)
    blob = torch.load(path / "state.pt", weights_only=False)  # nosec B614
    for name, (module, optimizer, scheduler) in parts.items():
        params = dict(module.named_parameters())
        with torch.no_grad():
            for key, value in load_file(path / f"{name}.safetensors").items():
                params[key].copy_(value)
        optimizer.load_state_dict(blob["optimizers"][name])
        scheduler.load_state_dict(blob["schedulers"][name])
    set_rng_state(blob["rng"])
    for name, g in (generators or {}).items():
        g.set_state(blob["generators"][name])
    state = json.loads((path / "trainer_state.json").read_text())
    state.pop("step", None)
    return state


def start_or_resume(out_dir: str | Path, parts: dict, resume: bool, generators: dict | None = None,
                    name: str = "", log=print) -> tuple[int, dict]:
    """(step, trainer state) of the latest checkpoint with ``resume``, else (0, {}) for a fresh run."""
    if not resume:
        return 0, {}
    found = checkpoints(out_dir)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {Path(out_dir) / 'checkpoints'}", "drop --resume to start afresh")
    step, path = found[-1]
    state = load_checkpoint(path, parts, generators)
    log(f"chatrlhf {name}: resumed from {path} (step {step})")
    return step, state


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    """Every trainer counts its optimizer steps this way: --max-steps, else --epochs × steps per epoch."""
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))


def file_hashes(paths) -> dict[str, str | None]:
    """{path: SHA-256 of the file's bytes} (None for a folder, such as a datasets directory)."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).is_file() else None for p in paths}


class StopFlag:
    """First Ctrl-C asks the loop to save a checkpoint and stop after the current step; a second one
    interrupts at once."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            print("\nchatrlhf: Ctrl-C — saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

        self._old = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


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
