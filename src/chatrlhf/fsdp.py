"""FSDP2 for the run scaffold (trainers/run.py), which calls these functions; the trainers see only
``Run.shard_weights``, ``Run.shard_frozen`` and ``Run.save_model``. The RL rollout (rollout.generate) gathers a
sharded policy whole for each generation with :func:`unsharded`.

Under FSDP (--fsdp, or `accelerate launch --config_file fsdp.yaml`: ACCELERATE_USE_FSDP=true) each decoder block and
then the whole model are wrapped with PyTorch's fully_shard (FSDP2, full shard): every rank keeps 1/N of each weight,
gradient and optimizer moment, and a block's weights are all-gathered only while it computes. Gradients are
reduce-scattered as a SUM (the scaffold's contract: each rank's loss is already divided by the global count), so
Run.optimizer_step adds no all-reduce. Checkpoints hold the FULL trainable weights and optimizer state (gathered to
rank 0, keyed by parameter name), so a checkpoint reads the same whatever the sharding; the saved model is a plain
Hugging Face folder. accelerate's own FSDP plugin is not used: it never engages on CPU, and the trainers call the
trunk and the head separately, which this module handles with one registered forward method (models.in_forward).
"""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict, \
    set_model_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard, register_fsdp_forward_method

from chatrlhf.errors import UsageError
from chatrlhf.models import FORWARD_METHOD, unwrap

FSDP_HELP = "docs/distributed.md, \"FSDP\""


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def fsdp_settings(cfg, command: str, world_size: int) -> dict | None:
    """How this run shards its model ({"offload", "reshard_after_forward"}), or None without FSDP. --fsdp and a launch
    with ACCELERATE_USE_FSDP=true both turn it on; --fsdp-offload and the launch's FSDP_OFFLOAD_PARAMS=true both
    offload. What would not work is refused here, before any model loads."""
    wanted, offload = getattr(cfg, "fsdp", False), getattr(cfg, "fsdp_offload", False)  # read on every run
    if not (wanted or env_flag("ACCELERATE_USE_FSDP")):
        if offload:
            raise UsageError("--fsdp-offload without FSDP: it offloads FSDP's shards", "add --fsdp")
        return None
    if not hasattr(cfg, "fsdp"):
        raise UsageError(f"chatrlhf {command} does not run under FSDP yet",
                         "launch it without the FSDP config; sft, reward train, dpo, kto, ppo and grpo shard with FSDP")
    if world_size < 2:
        raise UsageError("--fsdp shards the model over processes, and this run has one",
                         "add --num-processes N (N ≥ 2), or launch with accelerate (" + FSDP_HELP + ")")
    refusals = [
        (os.environ.get("FSDP_VERSION", "2") != "2", f"FSDP version {os.environ.get('FSDP_VERSION')} (fsdp_version)",
         "set fsdp_version: 2 in the accelerate config (the shipped fsdp.yaml does)"),
        (os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP",
         f"fsdp_auto_wrap_policy {os.environ.get('FSDP_AUTO_WRAP_POLICY')}",
         "use TRANSFORMER_BASED_WRAP: chatrlhf shards each decoder block, then the model"),
        (env_flag("FSDP_ACTIVATION_CHECKPOINTING") and not cfg.gradient_checkpointing,
         "fsdp_activation_checkpointing: true with --no-gradient-checkpointing",
         "activation checkpointing is --gradient-checkpointing: drop one of the two"),
        (getattr(cfg, "lora_r", 0) > 0, f"--lora-r {getattr(cfg, 'lora_r', 0)} with FSDP",
         "train LoRA adapters with data parallelism (drop --fsdp), or fine-tune in full with FSDP"),
        (getattr(cfg, "train_layers", -1) >= 0, f"--train-layers {getattr(cfg, 'train_layers', -1)} with FSDP",
         "drop --train-layers (FSDP trains every block), or drop --fsdp"),
        (getattr(cfg, "critic", "auto") == "shared", "--critic shared with FSDP (its value head would sit beside the "
         "sharded policy, outside FSDP)", "use a separate critic, sharded as the policy is: --critic policy or "
         "--critic reward-model; or drop --fsdp"),
        (getattr(cfg, "rollout_engine", "local") == "vllm", "--rollout-engine vllm with FSDP (vLLM takes the policy's "
         "whole weights after every update)", "sample with --rollout-engine local, or drop --fsdp")]
    for refused, what, fix in refusals:
        if refused:
            raise UsageError(f"{what}: not supported", fix)
    return {"offload": offload or env_flag("FSDP_OFFLOAD_PARAMS"),
            "reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"}


def _inside_forward(self, fn, *args, **kwargs):
    """The registered forward method of a sharded model: ``fn`` runs with the root's weights gathered."""
    return fn(*args, **kwargs)


def shard_model(model, settings: dict):
    """fully_shard each decoder block, then the whole model (its embeddings, final norm and head: the root), sum the
    gradients over ranks instead of averaging them, and register :data:`FORWARD_METHOD` (models.in_forward)."""
    base = unwrap(model)
    blocks = getattr(base.base_model, "layers", None) or getattr(base.base_model, "h", None)
    if blocks is None:
        raise UsageError(f"FSDP: cannot find the decoder blocks of {type(base).__name__}", "drop --fsdp")
    options = {"reshard_after_forward": settings["reshard_after_forward"]}
    if settings["offload"]:  # pinned memory needs an accelerator
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(base, **options)
    for module in base.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # FSDP2 averages by default; the losses are already global means
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    setattr(base, FORWARD_METHOD, types.MethodType(_inside_forward, base))
    register_fsdp_forward_method(base, FORWARD_METHOD)
    base.chatrlhf_reshard_after_forward = settings["reshard_after_forward"]  # what unsharded() restores
    return model


def reshard(model) -> None:
    """Free every gathered copy of a sharded ``model``'s weights (kept after a forward pass when FSDP does not reshard
    after it), so that the next forward gathers the shards as they are now — after they were changed in place."""
    for unit in unwrap(model).modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextlib.contextmanager
def unsharded(model):
    """The whole of a sharded ``model`` gathered once on every rank for as many forward passes as the caller likes (a
    generation: one per token, a different number on each rank), then sharded again; a plain model as it is.

    Every FSDP unit is all-gathered on entry (the same collectives on every rank) and told not to reshard after its
    forward, so its pre-forward finds the weights already whole and its post-forward keeps them: the passes inside run
    no collective at all. On exit each unit gets back its reshard-after-forward setting and frees the gathered copy.
    No gradients may flow inside (nothing would reduce-scatter them the same way on every rank)."""
    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    reshard = getattr(unwrap(model), "chatrlhf_reshard_after_forward", True)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole on rank 0 (the others get {})


def full_weights(model) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, on rank 0 ({} elsewhere), without the second names of tied weights
    (the gathered copies no longer share memory, so save_pretrained would write both); every rank must call it."""
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in get_model_state_dict(model, options=FULL).items() if k not in tied}


def gather_part(module, optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimizer state keyed by parameter name) of a sharded part, whole on rank 0 ({} on the
    others); every rank must call it."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    weights = {k: v.contiguous() for k, v in full_weights(module).items() if k in names}
    return weights, get_optimizer_state_dict(module, optimizer, options=FULL)


def restore_part(module, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Put the full ``weights`` and ``optimizer_state`` of :func:`gather_part` into a sharded part: each rank keeps
    its shards."""
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def check_sharding(path: Path, written: bool, now: bool) -> None:
    """A checkpoint's optimizer state is keyed by parameter name under FSDP, by position without: refuse a mix."""
    if written != now:
        raise UsageError(f"--resume: {path} was written {'with' if written else 'without'} FSDP, this run is "
                         f"{'with' if now else 'without'}", f"resume {'with' if written else 'without'} --fsdp "
                         "(or the same accelerate config)")
