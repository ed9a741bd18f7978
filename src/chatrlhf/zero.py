"""DeepSpeed ZeRO for the run scaffold (trainers/run.py), which calls these functions; the trainers see only
``Run.backward``, ``Run.optimizer_step`` and ``Run.save_model``.

Under DeepSpeed (``--deepspeed STAGE`` with --num-processes N, or `accelerate launch --config_file
deepspeed_zero2.yaml`: ACCELERATE_USE_DEEPSPEED=true) the trained model and its optimizer go into one DeepSpeed
engine: stage 1 partitions the optimizer state over the ranks, stage 2 the gradients too, stage 3 the weights too
(gathered by DeepSpeed's hooks while a block computes). The trainer keeps its own loop: it calls the model as before,
``Run.backward(loss)`` for each micro-batch and ``Run.optimizer_step`` once per step — DeepSpeed's *unmanaged*
gradient accumulation (the caller owns the boundary). DeepSpeed averages gradients over ranks; the scaffold's losses
are already divided by the global count, so each rank's loss is multiplied by the number of ranks first (a sum).
Clipping is DeepSpeed's (``gradient_clipping`` = --max-grad-norm). Checkpoints: DeepSpeed's own (the weights, and
each rank's partition of the optimizer state, in the checkpoint's ``deepspeed/`` folder) next to the scaffold's
(scheduler, random states, trainer state, from rank 0). DeepSpeed is an optional dependency
(``chatrlhf[deepspeed]``), imported only when a run uses it (its import takes seconds); on CPU it compiles a small C++
extension once (~30 s).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from chatrlhf.errors import UsageError
from chatrlhf.fsdp import env_flag

ZERO_HELP = "docs/distributed.md, \"DeepSpeed\""
ZERO_COMMANDS = "sft, reward train, dpo and kto"
TAG = "zero"  # DeepSpeed's checkpoint tag inside a checkpoint folder's deepspeed/


def zero_settings(cfg, command: str, world_size: int) -> dict | None:
    """How this run uses DeepSpeed ({"stage", "offload_optimizer", "offload_params"}), or None. ``--deepspeed STAGE``
    and a launch with ACCELERATE_USE_DEEPSPEED=true (stage from ACCELERATE_DEEPSPEED_ZERO_STAGE) both turn it on.
    What would not work is refused here, before any model loads."""
    stage = getattr(cfg, "deepspeed", 0) or 0
    if env_flag("ACCELERATE_USE_DEEPSPEED") and not stage:
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    if not stage:
        return None
    if not hasattr(cfg, "deepspeed"):
        raise UsageError(f"chatrlhf {command} does not run under DeepSpeed yet",
                         f"launch it without the DeepSpeed config (ddp.yaml: data parallelism); {ZERO_COMMANDS} run "
                         "under DeepSpeed")
    offload_opt = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    offload_par = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    refusals = [
        (stage not in (1, 2, 3), f"ZeRO stage {stage}", "use stage 1, 2 or 3"),
        (world_size < 2, "DeepSpeed with one process (it partitions over processes)",
         "add --num-processes N (N ≥ 2), or launch with accelerate (" + ZERO_HELP + ")"),
        (getattr(cfg, "fsdp", False) or env_flag("ACCELERATE_USE_FSDP"), "DeepSpeed together with FSDP",
         "pick one: --deepspeed STAGE or --fsdp"),
        (bool(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")),
         "a DeepSpeed JSON config file (deepspeed_config_file)",
         "chatrlhf builds DeepSpeed's config from zero_stage and the offload keys: drop deepspeed_config_file"),
        (offload_opt not in ("none", "cpu"), f"offload_optimizer_device {offload_opt}", "use none or cpu"),
        (offload_par not in ("none", "cpu"), f"offload_param_device {offload_par}", "use none or cpu"),
        (offload_par == "cpu" and stage != 3, "offload_param_device cpu below stage 3", "use zero_stage 3"),
        (getattr(cfg, "lora_r", 0) > 0, f"--lora-r {getattr(cfg, 'lora_r', 0)} with DeepSpeed",
         "train LoRA adapters with data parallelism (drop --deepspeed), or fine-tune in full under DeepSpeed"),
        (getattr(cfg, "train_layers", -1) >= 0, f"--train-layers {getattr(cfg, 'train_layers', -1)} with DeepSpeed",
         "drop --train-layers, or drop --deepspeed")]
    for refused, what, fix in refusals:
        if refused:
            raise UsageError(f"{what}: not supported", fix)
    return {"stage": stage, "offload_optimizer": offload_opt == "cpu", "offload_params": offload_par == "cpu"}


def engine_config(settings: dict, max_grad_norm: float | None, world_size: int) -> dict:
    """DeepSpeed's config: the caller owns accumulation (its batch sizes are bookkeeping only), fp32 master weights
    (bf16 is the scaffold's autocast), any torch optimizer, DeepSpeed's own logging off."""
    zero = {"stage": settings["stage"], "overlap_comm": False, "contiguous_gradients": settings["stage"] >= 2}
    if settings["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
            "managed_gradient_accumulation": False, "zero_optimization": zero,
            "gradient_clipping": float(max_grad_norm or 0.0), "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": False}, "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def start_engine(parts: dict, settings: dict, max_grad_norm: float | None, world_size: int):
    """The DeepSpeed engine of the run's one trained part ({name: (module, optimizer, scheduler)}); the module keeps
    its identity (the trainer calls it as before) and the optimizer's parameter groups keep the scheduler's rates."""
    if len(parts) != 1:
        raise UsageError(f"DeepSpeed trains one model per run, this run has {len(parts)} ({', '.join(parts)})",
                         "drop --deepspeed / the DeepSpeed launch config")
    (module, optimizer, _), = parts.values()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if next(module.parameters()).is_cuda else "cpu")  # else a warning
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        import deepspeed  # optional dependency, imported only when a run uses it (seconds to import)
    except ImportError as e:
        raise UsageError(f"DeepSpeed is not installed ({e})", "pip install 'chatrlhf[deepspeed]', or shard with "
                         "--fsdp") from e
    with contextlib.redirect_stdout(io.StringIO()):  # its start-up chatter ("... op built successfully")
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                          config=engine_config(settings, max_grad_norm, world_size))
    return engine


def backward(engine, loss: torch.Tensor, world_size: int) -> None:
    """One micro-batch's backward pass; DeepSpeed averages over ranks, the loss is a share of a global sum."""
    engine.backward(loss * world_size, scale_wrt_gas=False)


def step(engine, scheduler) -> float:
    """The optimizer step (clipping included) and the scheduler's; returns the gradient norm before clipping."""
    engine.step()
    scheduler.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


@contextlib.contextmanager
def gathered(module, stage: int):
    """Around code that reads the whole weights of ``module`` (saving it): under stage 3 they are gathered on every
    rank meanwhile; below, they are whole already."""
    if stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def full_state(module, stage: int) -> dict[str, torch.Tensor]:
    """The whole weights of ``module`` on the CPU, on every rank (the saved model); every rank must call it."""
    with gathered(module, stage):
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}


def save_shards(engine, folder: Path) -> None:
    """DeepSpeed's checkpoint (its weights and each rank's optimizer partition) into ``folder``; every rank calls it."""
    engine.save_checkpoint(str(folder), tag=TAG)


def check_written(path: Path, written: bool) -> None:
    """A checkpoint written with DeepSpeed resumes only with it, and one written without only without."""
    raise UsageError(f"--resume: {path} was written {'with' if written else 'without'} DeepSpeed, this run is "
                     f"{'without' if written else 'with'}", f"resume {'with' if written else 'without'} --deepspeed "
                     "(or the same accelerate config)")


def load_shards(engine, folder: Path) -> None:
    """Restore :func:`save_shards`' checkpoint into ``engine`` (weights and this rank's optimizer partition)."""
    engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
                           load_module_strict=False)
