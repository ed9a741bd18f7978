"""`chatrlhf chat` and `chatrlhf generate` on the engine (engine.py) with the deployment decoding defaults of
GenerateArgs (temperature 0.7, top-k 100, repetition penalty 1.2). With ``--rerank q:DIR|rm:DIR`` each reply is
the best of ``--candidates`` samples (one shared prefill, SamplingParams.n) by a Q-network or a reward model
(rerank.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from chatrlhf.config import ChatConfig, GenerateArgs, GenerateConfig, RerankArgs
from chatrlhf.data import load_prompts
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.errors import UsageError
from chatrlhf.logger import progress_bar
from chatrlhf.models import load_model
from chatrlhf.rerank import Reranker, load_reranker

DEFAULT_CANDIDATES = 8  # issue 19: "N = 8" candidates per prompt


def sampling_params(g: GenerateArgs) -> SamplingParams:
    """The engine's parameters for the decoding flags (greedy when --no-sample or temperature 0)."""
    sample = g.sample and g.temperature > 0
    return SamplingParams(max_tokens=g.max_new_tokens, temperature=g.temperature if sample else 0.0,
                          top_k=g.top_k if sample else 0, top_p=g.top_p if sample else 1.0,
                          repetition_penalty=g.repetition_penalty)


def with_system(conversations: list[list[dict]], g: GenerateArgs) -> list[list[dict]]:
    """The conversations with the system message of ``g`` put first (unchanged without one)."""
    return [[{"role": "system", "content": g.system}] + c for c in conversations] if g.system else conversations


def generate_replies(engine: Engine, conversations: list[list[dict]], g: GenerateArgs, on_reply=None) -> list[str]:
    """One reply per conversation (the system message of ``g`` put first), in order; ``on_reply(n)`` is called as
    replies finish."""
    completions = engine.generate(with_system(conversations, g), sampling_params(g), on_finish=on_reply)
    return [c.text.strip() for c in completions]


def generate_reranked(engine: Engine, conversations: list[list[dict]], g: GenerateArgs, reranker: Reranker, n: int,
                      on_reply=None) -> list[tuple[str, float]]:
    """(reply, score) per conversation: ``n`` samples of each through the engine (n rows sharing one prefill),
    the one ``reranker`` scores highest kept. ``on_reply(k)`` counts finished samples (n per conversation)."""
    conversations = with_system(conversations, g)
    completions = engine.generate(conversations, dataclasses.replace(sampling_params(g), n=n), on_finish=on_reply)
    texts = [c.text.strip() for c in completions]
    groups = [texts[i * n:(i + 1) * n] for i in range(len(conversations))]
    picks = reranker.pick_each(conversations, groups)
    return [(group[k], scores[k]) for group, (k, scores) in zip(groups, picks)]


def candidate_count(cfg: RerankArgs) -> int:
    """Replies sampled per prompt: --candidates (auto = 8) with --rerank, 1 without. Refuses --candidates without
    --rerank (it would do nothing) and fewer than one candidate; checked before any model is loaded."""
    if not cfg.rerank:
        if cfg.candidates is not None:
            raise UsageError(f"--candidates {cfg.candidates} without --rerank does nothing",
                             "add --rerank q:DIR or rm:DIR, or drop --candidates")
        return 1
    n = DEFAULT_CANDIDATES if cfg.candidates is None else cfg.candidates
    if n < 1:
        raise UsageError(f"--candidates {n}: must be ≥ 1", f"e.g. --candidates {DEFAULT_CANDIDATES}")
    return n


def reranking(cfg: RerankArgs, model, tok, n: int, log=print) -> Reranker | None:
    """The reranker of --rerank (None without), the served ``model`` reused as its φ trunk where it is that trunk."""
    if not cfg.rerank:
        return None
    with torch.random.fork_rng(devices=[]):  # loading draws no numbers from the sampling stream: N = 1 = plain
        reranker = load_reranker(cfg.rerank, model, tok, policy_name=cfg.model, chat_template=cfg.chat_template,
                                 device=cfg.device, dtype=cfg.dtype, max_reply_length=cfg.max_new_tokens + 1, log=log)
    log(f"chatrlhf: reranking {n} candidates per reply by {reranker.describe}")
    return reranker


def run_generate(cfg: GenerateConfig) -> int:
    if not cfg.prompts or not cfg.out:
        raise UsageError("generate needs --prompts FILE and --out FILE", "e.g. --prompts prompts.txt --out replies.jsonl")
    n = candidate_count(cfg)
    prompts = load_prompts(cfg.prompts, cfg.format)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    model.eval()
    reranker = reranking(cfg, model, tok, n)
    with progress_bar(False) as bar:
        task = bar.add_task("generate", total=len(prompts) * n, info="")
        engine = Engine(model, tok, cfg.dtype, max_batch=cfg.batch_size * n)
        advance = lambda k: bar.advance(task, k)  # noqa: E731
        if reranker is None:
            rows = [{"response": r} for r in generate_replies(engine, prompts, cfg, on_reply=advance)]
        else:
            rows = [{"response": r, "score": s, "candidates": n}
                    for r, s in generate_reranked(engine, prompts, cfg, reranker, n, on_reply=advance)]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p, row in zip(prompts, rows):
            f.write(json.dumps({"prompt": p, **row}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    how = f", each the best of {n} by {cfg.rerank}" if reranker else ""
    print(f"chatrlhf generate: {len(rows)} replies written to {out}{how}")
    return 0


def run_chat(cfg: ChatConfig, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    n = candidate_count(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    engine = Engine(model.eval(), tok, cfg.dtype)
    reranker = reranking(cfg, model, tok, n, log=lambda m: print(m, file=stdout, flush=True))
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
        if reranker is None:
            reply, note = generate_replies(engine, [history], cfg)[0], ""
        else:
            reply, score = generate_reranked(engine, [history], cfg, reranker, n)[0]
            note = f"  [score {score:+.3f}, best of {n}]"
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}{note}", file=stdout, flush=True)
