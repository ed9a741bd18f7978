"""accelerate launch configs shipped with chatrlhf: ``ddp.yaml`` (data parallelism), ``fsdp.yaml`` (FSDP2 full shard)
and ``deepspeed_zero2.yaml`` / ``deepspeed_zero3.yaml`` (DeepSpeed ZeRO-2; ZeRO-3 with CPU offload: chatrlhf[deepspeed]).
``python -m chatrlhf.accelerate`` lists their paths, ``python -m chatrlhf.accelerate fsdp`` prints one::

    accelerate launch --config_file "$(python -m chatrlhf.accelerate fsdp)" -m chatrlhf sft --data ...

In code: ``config_path("fsdp")``. See docs/distributed.md."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIGS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def config_path(name: str) -> Path:
    """The path of the shipped accelerate config ``name`` (one of :data:`CONFIGS`)."""
    if name not in CONFIGS:
        raise ValueError(f"no accelerate config {name!r}: there are {', '.join(CONFIGS)}")
    return Path(str(files(__name__) / f"{name}.yaml"))
