"""The run scaffold: the plumbing every trainer shares, in one place (nanochat's ``compute_init`` and
``checkpoint_manager``); each trainer's loop stays in plain view in its own file.

A :class:`Run` owns the output folder, the device and autocast, the metrics logger, checkpoints that
resume exactly (named parts: trainable weights, optimizers and schedulers; named objects with
``state_dict()`` / ``load_state_dict()`` that are no such part, e.g. a replay buffer, a feature cache or
Q-heads' target copies, saved whole; the global RNG; the
trainer's own ``torch.Generator`` streams; the data position, which is the step number because every
trainer draws its data as a pure function of the step; and a JSON state such as PPO's β or the reward
normalisers' moments), Ctrl-C, the progress bar and the end-of-run :class:`Summary`. A loop reads::

    run = Run("sft", cfg, log)
    ...load data and model, build optimizer...
    state = run.begin({"model": (model, optimizer, scheduler)}, state={"tokens": 0})
    step = run.step
    with run.loop(n_steps):
        while run.running(step, n_steps):
            ...forward, backward, optimizer_step...
            step += 1
            run.log(step, metrics)
            run.end_step(step, n_steps, info=f"loss {loss:.3f}")
    if step < n_steps:
        return run.stopped()
    return run.finish({...the command's figures...})

Checkpoints live in OUTPUT_DIR/checkpoints/step-N and are written to a temporary folder first and
renamed, so a run killed at any moment leaves either a whole checkpoint or none.

Several processes: under ``accelerate launch`` (or torchrun, or ``--num-processes N``, which calls torchrun's
launcher) each process is a rank; accelerate's ``PartialState`` joins them (gloo on CPU, NCCL on
GPU). The run then does, in this one place, what data parallelism needs and nothing more:

  * the data: a step's plan is made for the global batch (``--batch-size`` × ranks, the same plan one process
    would make with that batch) and :meth:`Run.shard` gives each rank every ``world_size``-th example of each
    micro-batch (length-bucketed, so ranks get similar lengths);
  * the loss: each rank divides its loss by the step's GLOBAL count (:meth:`Run.total` sums a count over
    ranks), and :meth:`Run.optimizer_step` sums the gradients over ranks (one all-reduce of one flat buffer
    per optimizer step, after the accumulation) — so N ranks × batch B equal one process × batch N·B;
  * metrics: :meth:`Run.log` reduces over ranks (``summed`` keys are summed — a rank's share of the step's
    loss, its tokens — the rest averaged) and the main rank writes;
  * writes: logs, checkpoints, progress, the saved model and the summary on the main rank only (other ranks'
    stdout is muted by the CLI); each rank's random state goes into the checkpoint (gathered to rank 0), so a
    resumed run of the same number of ranks continues as an uninterrupted one;
  * decisions: Ctrl-C and --max-minutes stop every rank at the same step (:meth:`Run.any`).

A command runs in several processes only if its config has ``--num-processes`` (``ProcessArgs``); the others
refuse a multi-process launch with a clear error.

FSDP (``--fsdp``, or ``accelerate launch`` with the shipped fsdp.yaml): the same, with the model's weights, gradients
and optimizer state sharded over the ranks (:meth:`Run.shard_weights`; a frozen reference: :meth:`Run.shard_frozen`;
fsdp.py); gradients are summed in the backward pass, checkpoints hold the gathered full state. Every rank must then
run the same forward passes (:meth:`Run.most`). DeepSpeed ZeRO (``--deepspeed STAGE``, or ``accelerate
launch`` with a shipped deepspeed_zero*.yaml): the model and optimizer go into a DeepSpeed engine (zero.py); the
trainer's backward passes and optimizer steps go through :meth:`Run.backward` and :meth:`Run.optimizer_step`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from accelerate import PartialState
from accelerate.utils import gather_object

from chatrlhf.config import config_dict
from chatrlhf.errors import UsageError
from chatrlhf import zero
from chatrlhf.fsdp import check_sharding, fsdp_settings, full_weights, gather_part, \
    restore_part, shard_model
from chatrlhf.logger import MetricsLogger, progress_bar, read_metrics, truncate_jsonl
from chatrlhf.models import autocast, resolve_device, save_model
from chatrlhf.trainers.common import optimizer_step, seed_everything, total_steps

KEEP_CHECKPOINTS = 2  # the latest two: one may be half-way through a copy elsewhere


# --------------------------------------------------------------------------- the summary


@dataclass
class Summary:
    """How a run ended. ``interrupted``: stopped by Ctrl-C before its last step (a checkpoint was saved;
    the same command plus --resume continues). ``results``: the command's own figures, which a finished
    run writes with ``command`` and ``steps`` to OUTPUT_DIR/chatrlhf.json."""
    command: str
    steps: int
    interrupted: bool = False
    results: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        """The chatrlhf.json record: ``command``, ``steps``, then the results."""
        return {"command": self.command, "steps": self.steps, **self.results}

    def __getitem__(self, key: str):
        """A figure of the record (``summary["eval_loss_end"]``)."""
        return self.as_json()[key]

    def write(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / "chatrlhf.json"
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        return path


# --------------------------------------------------------------------------- Ctrl-C


class StopFlag:
    """First Ctrl-C asks the loop to save a checkpoint and stop after the current step; a second one
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.stop = False
        self._old = None

    def handler(self, signum=None, frame=None) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nchatrlhf: Ctrl-C — saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self.handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


# --------------------------------------------------------------------------- checkpoints


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


def save_checkpoint(out_dir: str | Path, step: int, parts: dict, state: dict, keep: int = KEEP_CHECKPOINTS,
                    generators: dict[str, torch.Generator] | None = None, objects: dict | None = None,
                    ranks: list[dict] | None = None, gathered: dict | None = None,
                    deepspeed: Path | None = None) -> Path:
    """``parts`` = {name: (module, optimizer, scheduler)}: each module's trainable weights
    (``name.safetensors``), every optimizer and scheduler, the global RNG, the trainer's own random streams
    (``generators``), the whole ``state_dict()`` of each of ``objects`` ({name: object}: a replay buffer, a
    feature cache, frozen target networks — anything a part's trainable weights leave out) and its ``state`` (JSON).
    ``ranks``: with several processes, every rank's random state (:func:`rank_random_state`), rank 0's first.
    ``gathered``: under FSDP, {name: (full trainable weights, full optimizer state)} of each part
    (:func:`gather_part`), written instead of the sharded module's and optimizer's own. ``deepspeed``: under
    DeepSpeed, the folder of its own checkpoint (zero.save_shards: the weights and every rank's partition of the
    optimizer state), moved in as ``deepspeed/`` instead of the parts' weights and optimizer states."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    if deepspeed is not None:  # the weights and optimizer states are in DeepSpeed's own checkpoint
        os.replace(deepspeed, tmp / "deepspeed")
    for name, (module, _, _) in parts.items() if deepspeed is None else ():
        save_file(gathered[name][0] if gathered else trainable_state(module), tmp / f"{name}.safetensors")
    optimizers = {} if deepspeed is not None else {n: gathered[n][1] if gathered else o.state_dict()
                                                   for n, (_, o, _) in parts.items()}
    torch.save({"optimizers": optimizers, "sharded": gathered is not None, "deepspeed": deepspeed is not None,
                "schedulers": {n: s.state_dict() for n, (_, _, s) in parts.items()}, "rng": rng_state(),
                "generators": {n: g.get_state() for n, g in (generators or {}).items()},
                "objects": {n: o.state_dict() for n, o in (objects or {}).items()}, "ranks": ranks or []},
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
    """(step, folder) of every whole checkpoint in OUTPUT_DIR/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / "trainer_state.json").is_file():
            found.append((int(p.name.split("-")[1]), p))
    return sorted(found)


def rank_random_state(generators: dict[str, torch.Generator]) -> dict:
    """This process's global RNG and the trainer's own streams: what differs between ranks."""
    return {"rng": rng_state(), "generators": {n: g.get_state() for n, g in generators.items()}}


def load_checkpoint(path: Path, parts: dict, generators: dict[str, torch.Generator] | None = None,
                    objects: dict | None = None, rank: int = 0, world_size: int = 1, sharded: bool = False,
                    engine=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the same ``parts``, ``generators`` and ``objects``;
    returns the trainer state (without the step, which the folder's name gives). With several processes each rank
    takes its own random state; the number of ranks must be the one that wrote the checkpoint. ``sharded``: the parts
    are FSDP-sharded (every rank reads the full weights and optimizer state and keeps its shards: :func:`restore_part`).
    ``engine``: the run's DeepSpeed engine, which reads its own checkpoint (weights and this rank's optimizer
    partition)."""
    from safetensors.torch import load_file

    # the run's own checkpoint, written by save_checkpoint (optimizer and RNG states need pickle)
    blob = torch.load(path / "state.pt", weights_only=False)  # nosec B614
    check_sharding(path, blob.get("sharded", False), sharded)
    if blob.get("deepspeed", False) != (engine is not None):
        zero.check_written(path, blob.get("deepspeed", False))
    for name, (module, optimizer, scheduler) in parts.items():
        if engine is not None:
            zero.load_shards(engine, path / "deepspeed")
            scheduler.load_state_dict(blob["schedulers"][name])
            continue
        if sharded:
            restore_part(module, optimizer, load_file(path / f"{name}.safetensors"), blob["optimizers"][name])
            scheduler.load_state_dict(blob["schedulers"][name])
            continue
        params = dict(module.named_parameters())
        with torch.no_grad():
            for key, value in load_file(path / f"{name}.safetensors").items():
                params[key].copy_(value)
        optimizer.load_state_dict(blob["optimizers"][name])
        scheduler.load_state_dict(blob["schedulers"][name])
    ranks = blob.get("ranks") or [{"rng": blob["rng"], "generators": blob["generators"]}]
    if len(ranks) != world_size:
        raise UsageError(f"--resume: {path} was written by {len(ranks)} process(es), this run has {world_size}",
                         f"resume with --num-processes {len(ranks)} (the data order and random streams are per rank)")
    set_rng_state(ranks[rank]["rng"])
    for name, g in (generators or {}).items():
        g.set_state(ranks[rank]["generators"][name])
    for name, obj in (objects or {}).items():
        if name not in blob.get("objects", {}):
            raise UsageError(f"--resume: the checkpoint {path} has no '{name}'", "resume with the command that wrote it")
        obj.load_state_dict(blob["objects"][name])
    state = json.loads((path / "trainer_state.json").read_text())
    state.pop("step", None)
    return state


def latest_checkpoint(out_dir: str | Path) -> tuple[int, Path]:
    """(step, folder) of the newest checkpoint, or a UsageError saying there is none to resume from."""
    found = checkpoints(out_dir)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {Path(out_dir) / 'checkpoints'}", "drop --resume to start afresh")
    return found[-1]


# --------------------------------------------------------------------------- the run


def global_batch(cfg, world_size: int) -> str:
    """What one optimizer step sees over every process, spelt out (the most common confusion of distributed RL)."""
    per_prompt = next(((flag, getattr(cfg, name)) for flag, name in (("--samples-per-prompt", "samples_per_prompt"),
                                                                      ("--num-generations", "num_generations"))
                       if hasattr(cfg, name)), None)
    if per_prompt:  # ppo, grpo
        flag, k = per_prompt
        minibatch = "the whole batch" if cfg.minibatch_size is None else f"{cfg.minibatch_size} replies"
        return (f"global batch {cfg.batch_size * world_size * k} replies per step = --batch-size {cfg.batch_size} "
                f"prompts × {world_size} process(es) × {flag} {k}; --minibatch-size: {minibatch} over all processes")
    return (f"global batch {cfg.batch_size * cfg.grad_accum * world_size} = --batch-size {cfg.batch_size} × "
            f"--grad-accum {cfg.grad_accum} × {world_size} process(es)")


def join_processes(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, number of ranks, device) of this process: one process unless a launcher (accelerate launch,
    torchrun) started several (WORLD_SIZE), which accelerate's PartialState then joins — gloo on CPU, NCCL on GPU,
    each rank on its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    state = PartialState(cpu=device.type == "cpu")
    return state.process_index, state.num_processes, state.device


class Run:
    """One training run of ``command`` (``"sft"``, ``"reward train"``, ``"ppo"``) with its config ``cfg``
    (a RunArgs + ModelArgs composition): seeds every generator and picks the device on creation."""

    def __init__(self, command: str, cfg, log=print):
        self.command, self.cfg, self.print = command, cfg, log
        self.name = command.split(" ")[0]
        self.out = Path(cfg.output_dir)
        self.rank, self.world_size, self.device = join_processes(resolve_device(cfg.device))
        if self.world_size > 1 and not hasattr(cfg, "num_processes"):
            raise UsageError(f"chatrlhf {command} runs in one process so far, and {self.world_size} were launched",
                             "run it without accelerate launch / torchrun; sft, reward train, dpo, kto, ppo and grpo "
                             "run in several")
        self.fsdp = fsdp_settings(cfg, command, self.world_size)  # None: each rank holds the whole model
        self.zero = zero.zero_settings(cfg, command, self.world_size)  # DeepSpeed ZeRO (zero.py), or None
        self._engine = None  # its engine, made by begin()
        self.step = 0                      # optimizer steps done (the data position)
        self.parts: dict = {}
        self.generators: dict[str, torch.Generator] = {}
        self.objects: dict = {}
        self.state: dict = {}
        self.logger: MetricsLogger | None = None
        self._stop: StopFlag | None = None
        self._bar = self._task = None
        self._saved_at: int | None = None  # the step of this process's latest checkpoint
        self._said_fsdp = False
        seed_everything(cfg.seed)

    @property
    def is_main(self) -> bool:
        """True on the process that logs, saves and prints (rank 0)."""
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on this run's device where --dtype and the hardware allow, else nothing."""
        return autocast(self.cfg.dtype, self.device)

    def total_steps(self, steps_per_epoch: int) -> int:
        """--max-steps, else --epochs × ``steps_per_epoch``."""
        return total_steps(self.cfg.max_steps, self.cfg.epochs, steps_per_epoch)

    # ---------------------------------------------------------------- several processes (identities in one)

    def shard(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's part of each micro-batch of a step planned for the global batch: every ``world_size``-th
        example from ``rank``. Empty parts are left out (an epoch's last micro-batch can be smaller than the ranks):
        a rank may have none, and still joins the step (:meth:`optimizer_step`)."""
        if self.world_size == 1:
            return batches
        if self.fsdp or self.zero:  # every rank's forward / backward takes part in collectives
            batches = self._whole_micro_batches(batches)
        return [part for b in batches if (part := b[self.rank::self.world_size])]

    def total(self, value: float | list[float]) -> float | list[float]:
        """``value`` (a number or a list of them) summed over ranks — a step's count of targets, pairs, weight:
        what each rank divides its loss by."""
        if self.world_size == 1:
            return value
        # on this run's device: NCCL reduces CUDA tensors only
        t = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist() if isinstance(value, list) else float(t[0])

    @property
    def summer(self):
        """What the losses take as ``total=`` to sum their counts over ranks (:meth:`total`); None in one process,
        where they take their own batch's."""
        return self.total if self.world_size > 1 else None

    def gather(self, values: list) -> list:
        """Every rank's ``values`` joined, rank 0's first (the list itself in one process)."""
        if self.world_size == 1:
            return values
        return [x for part in gather_object([values]) for x in part]

    def most(self, n: int) -> int:
        """The largest ``n`` over ranks (each rank's count in a slot of its own, summed): e.g. the forward passes that
        every rank makes under FSDP."""
        if self.world_size == 1:
            return n
        slots = [0.0] * self.world_size
        slots[self.rank] = float(n)
        return int(max(self.total(slots)))

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank: a decision (stop now) every rank then takes at the same step."""
        return self.total(float(bool(flag))) > 0

    def reduce(self, metrics: dict, summed: tuple[str, ...] = ()) -> dict:
        """Metrics over ranks: keys starting with one of ``summed`` are summed (a rank's share of the step's loss,
        its tokens), the rest averaged over the ranks that have them; keys starting with "_" (a rollout, raw values
        per row) stay this rank's. The identity in one process."""
        if self.world_size == 1:
            return metrics
        merged: dict = {}
        for part in gather_object([{k: v for k, v in metrics.items() if not k.startswith("_")}]):
            for k, v in part.items():
                merged.setdefault(k, []).append(v)
        out = {k: (sum(v) if k.startswith(summed) else v[0] if isinstance(v[0], str) else sum(v) / len(v))
               for k, v in merged.items()}
        return {**out, **{k: v for k, v in metrics.items() if k.startswith("_")}}  # "_…": this rank's own (rows)

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass of one micro-batch's ``loss`` (this rank's share of the step's global loss); under
        DeepSpeed, through its engine (which reduces the gradients as they come)."""
        if self._engine is not None:
            zero.backward(self._engine, loss, self.world_size)
        else:
            loss.backward()

    def optimizer_step(self, optimizer, scheduler, params: list, max_grad_norm: float) -> float:
        """:func:`~chatrlhf.trainers.common.optimizer_step` after summing the gradients over ranks (one all-reduce
        of one flat buffer; a rank without a gradient, e.g. an empty part, adds zeros). Every rank then clips and
        steps the same way, so the weights stay identical. Under FSDP only the parameters that FSDP does not manage
        (plain tensors beside a sharded model: a critic's offset) are summed here; FSDP summed the others' gradients in
        the backward pass (reduce-scatter). Returns the gradient norm before clipping. Under DeepSpeed, its engine's
        step (clipping to --max-grad-norm as set when the engine was made)."""
        if self._engine is not None:
            return zero.step(self._engine, scheduler)
        plain = [p for p in params if not isinstance(p, DTensor)] if self.fsdp else params
        if self.world_size > 1 and plain:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for p, g in zip(plain, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
                offset += g.numel()
        return optimizer_step(optimizer, scheduler, params, max_grad_norm)

    # ---------------------------------------------------------------- FSDP (identities without it)

    def shard_weights(self, model):
        """Under FSDP, ``model`` with its weights sharded over the ranks (:func:`shard_model`); call it after
        gradient checkpointing is set and before the optimizer is built. Without FSDP, ``model`` as it is."""
        if self.fsdp is None:
            return model
        if not self._said_fsdp:  # once, however many models the run shards
            self.print(f"chatrlhf {self.name}: FSDP2 full shard over {self.world_size} processes"
                       f"{', weights offloaded to CPU memory' if self.fsdp['offload'] else ''}")
            self._said_fsdp = True
        return shard_model(model, self.fsdp)

    def shard_frozen(self, model):
        """Under FSDP, a frozen model used for forward passes only (a reference) sharded as :meth:`shard_weights`
        shards a trained one, so that it does not sit whole on every rank; without FSDP, ``model`` as it is."""
        return model if self.fsdp is None else shard_model(model, self.fsdp)

    def save_model(self, model, tok, folder: Path | None = None) -> None:
        """The trained model as a plain Hugging Face folder in OUTPUT_DIR (or ``folder``), written by the main rank;
        under FSDP every rank first takes part in gathering its full weights."""
        state = full_weights(model) if self.fsdp else None
        if self.zero and self.zero["stage"] == 3:
            state = zero.full_state(model, 3)
        if self.is_main:
            save_model(model, tok, folder or self.out, state_dict=state)

    def _gather_parts(self) -> dict | None:
        """Under FSDP, {name: full trainable weights, full optimizer state} of every part (on rank 0), else None."""
        if self.fsdp is None:
            return None
        return {name: gather_part(module, optimizer) for name, (module, optimizer, _) in self.parts.items()}

    def _whole_micro_batches(self, batches: list[list[int]]) -> list[list[int]]:
        """Under FSDP and DeepSpeed every rank must run the same forward and backward passes (they gather weights
        and reduce gradients together): a micro-batch with fewer examples than ranks (the end of an epoch) is left
        out, and said so."""
        kept = [b for b in batches if len(b) >= self.world_size]
        if len(kept) < len(batches):
            left_out = sum(len(b) for b in batches if b not in kept)
            self.print(f"chatrlhf {self.name}: {'FSDP' if self.fsdp else 'DeepSpeed'}: {left_out} example(s) in "
                       f"micro-batches smaller than the {self.world_size} processes left out of this step")
        return kept

    def begin(self, parts: dict, generators: dict[str, torch.Generator] | None = None,
              state: dict | None = None, objects: dict | None = None) -> dict:
        """Register the named ``parts`` ({name: (module, optimizer, scheduler)}), the trainer's own random
        ``generators``, its ``state`` (defaults) and ``objects`` ({name: anything with ``state_dict()`` /
        ``load_state_dict()``, saved whole}), restore them all from the latest checkpoint with --resume,
        then open the metrics log (a resumed run's log loses what was written after its checkpoint) and write
        the run's config. Returns the state dict, which the trainer updates in place and every checkpoint saves."""
        self.parts, self.generators, self.state = parts, generators or {}, dict(state or {})
        self.objects = objects or {}
        if self.zero:
            self._engine = zero.start_engine(parts, self.zero, getattr(self.cfg, "max_grad_norm", None),
                                             self.world_size)
            self.print(f"chatrlhf {self.name}: DeepSpeed ZeRO stage {self.zero['stage']} over {self.world_size} "
                       "processes")
        if self.world_size > 1:  # the models are built (the same on every rank): from here each rank draws its own
            seed_everything(self.cfg.seed + self.rank)
        if self.cfg.resume:
            self.step, path = latest_checkpoint(self.out)
            self.state.update(load_checkpoint(path, parts, self.generators, self.objects, self.rank, self.world_size,
                                              sharded=self.fsdp is not None, engine=self._engine))
            self.print(f"chatrlhf {self.name}: resumed from {path} (step {self.step})")
        if hasattr(self.cfg, "num_processes"):
            self.print(f"chatrlhf {self.name}: {global_batch(self.cfg, self.world_size)}")
        if self.is_main:
            self.logger = MetricsLogger(self.out, self.cfg.tensorboard, resume_step=self.step if self.cfg.resume else None)
            self.logger.config(self.cfg)
        return self.state

    def log(self, step: int, metrics: dict, summed: tuple[str, ...] = ()) -> None:
        """Metrics of ``step`` to metrics.jsonl and TensorBoard (reduced over ranks — see :meth:`reduce` for
        ``summed`` — and written by the main one)."""
        metrics = self.reduce(metrics, summed)
        if self.is_main:
            self.logger.log(step, metrics)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """A table (sample replies with their rewards) in TensorBoard, from the main rank."""
        if self.is_main:
            self.logger.table(step, name, rows)

    def open_rows(self, name: str):
        """OUTPUT_DIR/``name`` (JSON lines with a ``step``) for appending: a fresh run starts it empty, a resumed
        run first drops the lines that the interrupted run wrote after its checkpoint."""
        path = self.out / name
        if not self.is_main:
            return open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 — the main rank writes
        if self.cfg.resume and path.exists():
            truncate_jsonl(path, self.step)
            return path.open("a", encoding="utf-8")
        return path.open("w", encoding="utf-8")

    @contextlib.contextmanager
    def loop(self, total: int):
        """Around the training loop: Ctrl-C handling and the progress bar (from the resumed step to ``total``)."""
        with StopFlag() as stop, progress_bar(self.cfg.quiet or not self.is_main) as bar:
            self._stop, self._bar = stop, bar
            self._task = bar.add_task(self.name, total=total, completed=self.step, info="")
            try:
                yield bar
            finally:
                self._stop = self._bar = self._task = None

    def running(self, step: int, total: int) -> bool:
        """The loop's condition: steps are left and Ctrl-C has not asked to stop."""
        self._stop.stop = self.any(self._stop.stop)  # every rank stops at the same step
        return step < total and not self._stop.stop

    def end_step(self, step: int, total: int, info: str = "") -> None:
        """After optimizer step ``step`` (1-based) of ``total``: advance the progress bar, checkpoint every
        --save-steps, at the last step and when Ctrl-C asked to stop (the loop then ends: see :meth:`running`)."""
        self.step = step
        self._bar.update(self._task, completed=step, info=info)
        if step % self.cfg.save_steps == 0 or step == total or self._stop.stop:
            self.save()

    def save(self) -> None:
        """A checkpoint of every registered part, the random streams and the state at ``self.step``."""
        ranks = gather_object([rank_random_state(self.generators)]) if self.world_size > 1 else None
        gathered, shards = self._gather_parts(), None
        if self._engine is not None:  # DeepSpeed's own checkpoint first (every rank writes its partition)
            shards = self.out / "checkpoints" / f".deepspeed-step-{self.step}"
            zero.save_shards(self._engine, shards)
            dist.barrier()
        if self.is_main:
            save_checkpoint(self.out, self.step, self.parts, self.state, generators=self.generators,
                            objects=self.objects, ranks=ranks, gathered=gathered, deepspeed=shards)
        self._saved_at = self.step

    def close(self) -> None:
        """Close the metrics log (the main rank's); with several processes, wait until every rank got here."""
        if self.logger is not None:
            self.logger.close()
        if self.world_size > 1:
            dist.barrier()
        if self._engine is not None:
            self._engine.destroy()  # DeepSpeed's hooks and buffers go before the process group does (cli)

    def last_logged(self, key: str) -> dict | None:
        """The latest metrics line that has ``key`` (e.g. the final evaluation), None if none has."""
        if self.world_size > 1:
            dist.barrier()  # the main rank has written the line every rank asks for
        found = [m for m in read_metrics(self.out) if key in m]
        return found[-1] if found else None

    def last_eval(self, key: str) -> dict | None:
        """The eval/… metrics of the latest line that has ``key`` (a run's final evaluation), None if none has."""
        final = self.last_logged(key)
        return {k: v for k, v in final.items() if k.startswith("eval/")} if final else None

    def stopped(self) -> Summary:
        """The summary of a run stopped by Ctrl-C, with a checkpoint of its last step (made by :meth:`end_step`,
        or here when Ctrl-C came after it)."""
        if self._saved_at != self.step and self.step > 0:
            self.save()
        self.close()
        self.print(f"chatrlhf {self.name}: stopped at step {self.step}; resume with the same command plus --resume")
        return Summary(self.command, self.step, interrupted=True)

    def finish(self, results: dict) -> Summary:
        """Close the log and write chatrlhf.json: command, steps, ``results``, the number of processes and the run's
        full config."""
        self.close()
        summary = Summary(self.command, self.step, results={**results, "processes": self.world_size,
                                                             "config": config_dict(self.cfg)})
        if self.is_main:
            summary.write(self.out)
        return summary
