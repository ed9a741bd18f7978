"""The one place where the feedback app reaches a model: reply writers. The app imports this module only when
it writes a reply (feedback/api/replies.py), so that the store, the exporter and a server without --model never
import torch or transformers."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict
from pathlib import Path

from chatrlhf.config import GenerateArgs, ModelArgs
from chatrlhf.data.template import render
from chatrlhf.engine import Engine
from chatrlhf.generation import generate_replies
from chatrlhf.models import load_model, resolve_model


class ReplyWriter:
    """A model that writes replies (the deployment decoding defaults of `chatrlhf chat`), with the
    provenance the store keeps: model name, checkpoint id, decoding parameters, the rendered prompt."""

    def __init__(self, model: str, max_new_tokens: int = 128):
        self.name = model
        self.decoding = GenerateArgs(max_new_tokens=max_new_tokens)
        self._loaded = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._loaded is None:
                model, tok = load_model(ModelArgs(model=self.name))
                self._loaded = (Engine(model.eval(), tok, max_batch=8), tok, checkpoint_id(resolve_model(self.name)))
        return self._loaded

    def write(self, conversations: list[list[dict]]) -> list[dict]:
        """One reply per conversation: [{"text", "model", "checkpoint", "decoding", "template"}, …]."""
        engine, tok, checkpoint = self._load()
        with self._lock:  # one generation at a time per model
            texts = generate_replies(engine, conversations, self.decoding)
        return [{"text": t, "model": self.name, "checkpoint": checkpoint, "decoding": asdict(self.decoding),
                 "template": render(tok, c, add_generation_prompt=True)} for t, c in zip(texts, conversations)]


def checkpoint_id(where) -> str:
    """A short content id of a model folder (config and weight file names, sizes and the config's bytes)."""
    path = Path(str(where))
    if not path.is_dir():
        return str(where)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return f"{path.name}@{h.hexdigest()[:12]}"
