"""The served model as one object: its engine (model and tokenizer, so the chat template comes with it), the name
it answers to, its folder and checkpoint hash. `POST /admin/reload` (admin.py) builds a new one off the event loop
and swaps ``Server.served`` in one assignment: a request reads ``served`` once when it arrives and keeps that
object to its end, so in-flight requests finish on the engine that started them while new ones go to the new
engine; the old one is stopped once its last request has closed (:func:`retire`)."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.config import ModelArgs, ServeConfig
from chatrlhf.engine import Engine
from chatrlhf.feedback.store import weights_hash
from chatrlhf.models import load_model

RETIRE_POLL_SECONDS = 0.05


def checkpoint_hash(model: str) -> str:
    """The weights' hash (feedback.store.weights_hash), read once per load; a name that is no file (a tiny test
    model) is kept as it is."""
    return weights_hash(model) or model


@dataclass(eq=False)
class Served:
    """One loaded model being served. ``jobs``: requests in flight on it (touched on the event loop only)."""
    engine: Engine
    name: str          # what responses say in `model` and what the store records
    path: str          # the --model (or reload) value it was loaded from
    checkpoint: str    # checkpoint_hash(path)
    jobs: int = 0

    @property
    def tok(self):
        return self.engine.tok

    @property
    def max_positions(self) -> int | None:
        return getattr(self.engine.model.config, "max_position_embeddings", None)

    def close(self) -> None:
        """Stop the engine's loop and let its model go (blocking: run it off the event loop)."""
        device = self.engine.device
        self.engine.stop()
        self.engine = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def load_served(cfg: ServeConfig, model: str, name: str = "") -> Served:
    """Load ``model`` as --dtype/--device/--chat-template say and start its engine (blocking: seconds to minutes).
    Raises UsageError for a folder that is not a model."""
    args = ModelArgs(model=model, dtype=cfg.dtype, device=cfg.device)
    loaded, tok = load_model(args, chat_template=cfg.chat_template)
    checkpoint = checkpoint_hash(model)
    engine = Engine(loaded.eval(), tok, cfg.dtype, max_batch=cfg.max_batch).start()
    return Served(engine, name or model, model, checkpoint)


async def retire(old: Served) -> None:
    """Stop ``old`` once no request runs on it any more (it got none since the swap)."""
    while old.jobs:
        await asyncio.sleep(RETIRE_POLL_SECONDS)
    await asyncio.to_thread(old.close)
