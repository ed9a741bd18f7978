"""`chatrlhf chat` and `chatrlhf generate`: the deployment decoding of a saved model (generation.py)."""

from __future__ import annotations

from chatrlhf.generation import run_chat, run_generate


def run(name: str, cfg) -> int:
    return run_generate(cfg) if name == "generate" else run_chat(cfg)
