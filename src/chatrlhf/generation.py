"""`chatrlhf chat` and `chatrlhf generate` on the engine (engine.py) with the deployment decoding defaults of
GenerateArgs (temperature 0.7, top-k 100, repetition penalty 1.2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chatrlhf.config import ChatConfig, GenerateArgs, GenerateConfig
from chatrlhf.data import load_prompts
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.errors import UsageError
from chatrlhf.logger import progress_bar
from chatrlhf.models import load_model


def sampling_params(g: GenerateArgs) -> SamplingParams:
    """The engine's parameters for the decoding flags (greedy when --no-sample or temperature 0)."""
    sample = g.sample and g.temperature > 0
    return SamplingParams(max_tokens=g.max_new_tokens, temperature=g.temperature if sample else 0.0,
                          top_k=g.top_k if sample else 0, top_p=g.top_p if sample else 1.0,
                          repetition_penalty=g.repetition_penalty)


def generate_replies(engine: Engine, conversations: list[list[dict]], g: GenerateArgs, on_reply=None) -> list[str]:
    """One reply per conversation (the system message of ``g`` put first), in order; ``on_reply(n)`` is called as
    replies finish."""
    if g.system:
        conversations = [[{"role": "system", "content": g.system}] + c for c in conversations]
    completions = engine.generate(conversations, sampling_params(g), on_finish=on_reply)
    return [c.text.strip() for c in completions]


def run_generate(cfg: GenerateConfig) -> int:
    if not cfg.prompts or not cfg.out:
        raise UsageError("generate needs --prompts FILE and --out FILE", "e.g. --prompts prompts.txt --out replies.jsonl")
    prompts = load_prompts(cfg.prompts, cfg.format)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    model.eval()
    with progress_bar(False) as bar:
        task = bar.add_task("generate", total=len(prompts), info="")
        engine = Engine(model, tok, cfg.dtype, max_batch=cfg.batch_size)
        replies = generate_replies(engine, prompts, cfg, on_reply=lambda n: bar.advance(task, n))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p, r in zip(prompts, replies):
            f.write(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"chatrlhf generate: {len(replies)} replies written to {out}")
    return 0


def run_chat(cfg: ChatConfig, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    engine = Engine(model.eval(), tok, cfg.dtype)
    history: list[dict] = []
    print(f"chatrlhf chat with {cfg.model} — /reset clears the conversation, /quit (or Ctrl-D) leaves.",
          file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            print(file=stdout)
            return 0
        text = line.strip()
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = generate_replies(engine, [history], cfg)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}", file=stdout, flush=True)
