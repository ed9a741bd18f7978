"""Deployment-style generation for `chatrlhf chat` and `chatrlhf generate` (batched, KV cache, left
padding). Training rollouts have their own sampler in rollout.py (top_k 0, top_p 1, see RL_DETAILS)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chatrlhf.config import ChatConfig, GenerateArgs, GenerateConfig
from chatrlhf.data import load_prompts
from chatrlhf.data.template import render
from chatrlhf.errors import UsageError
from chatrlhf.models import autocast, load_model


def decoding_kwargs(g: GenerateArgs, tok) -> dict:
    sample = g.sample and g.temperature > 0
    kw = dict(max_new_tokens=g.max_new_tokens, do_sample=sample, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, repetition_penalty=g.repetition_penalty)
    if sample:
        kw.update(temperature=g.temperature, top_k=g.top_k or None, top_p=g.top_p)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


@torch.no_grad()
def generate_replies(model, tok, conversations: list[list[dict]], g: GenerateArgs, dtype: str = "auto",
                     batch_size: int = 8, on_batch=None) -> list[str]:
    device = next(model.parameters()).device
    tok.padding_side = "left"
    replies: list[str] = []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i:i + batch_size]
        if g.system:
            chunk = [[{"role": "system", "content": g.system}] + c for c in chunk]
        texts = [render(tok, c, add_generation_prompt=True) for c in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with autocast(dtype, device):
            out = model.generate(**enc, **decoding_kwargs(g, tok))
        for row in out[:, enc["input_ids"].shape[1]:]:
            replies.append(tok.decode(row, skip_special_tokens=True).strip())
        if on_batch:
            on_batch(len(chunk))
    return replies


def run_generate(cfg: GenerateConfig) -> int:
    if not cfg.prompts or not cfg.out:
        raise UsageError("generate needs --prompts FILE and --out FILE", "e.g. --prompts prompts.txt --out replies.jsonl")
    prompts = load_prompts(cfg.prompts, cfg.format)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    model.eval()
    from chatrlhf.trainers.common import progress_bar

    with progress_bar(False) as bar:
        task = bar.add_task("generate", total=len(prompts), info="")
        replies = generate_replies(model, tok, prompts, cfg, cfg.dtype, cfg.batch_size,
                                   on_batch=lambda n: bar.advance(task, n))
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
    model.eval()
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
        reply = generate_replies(model, tok, [history], cfg, cfg.dtype, 1)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}", file=stdout, flush=True)
