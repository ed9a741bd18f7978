"""`chatrlhf serve`: load the model (and the reranker of --rerank), start the engine's background loop, serve the app
with uvicorn."""

from __future__ import annotations

import os
import sys

import uvicorn

from chatrlhf.config import ServeConfig
from chatrlhf.engine import SamplingParams
from chatrlhf.errors import UsageError
from chatrlhf.generation import candidate_count
from chatrlhf.rerank import load_reranker
from chatrlhf.serve.app import create_app
from chatrlhf.serve.completions import Server
from chatrlhf.serve.feedback import FeedbackLog
from chatrlhf.serve.limits import digest, load_keys
from chatrlhf.serve.served import load_served

ADMIN_KEY_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def check_flags(cfg: ServeConfig) -> None:
    """Every flag that can be checked before the model loads."""
    for flag, value in (("--max-batch", cfg.max_batch), ("--max-concurrent", cfg.max_concurrent),
                        ("--max-prompt-tokens", cfg.max_prompt_tokens), ("--max-tokens-limit", cfg.max_tokens_limit),
                        ("--max-n", cfg.max_n), ("--max-body-bytes", cfg.max_body_bytes)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if cfg.max_queue < 0:
        raise UsageError(f"--max-queue {cfg.max_queue}: must be 0 or more")
    try:  # the defaults of a request that sets nothing, checked before the model loads
        SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                       repetition_penalty=cfg.repetition_penalty)
    except ValueError as e:
        raise UsageError(f"a decoding flag is out of range: {e}", "see chatrlhf serve --help") from None
    if cfg.redact and not cfg.feedback_db:
        raise UsageError("--redact: only with --feedback-db (without it nothing is stored)")


def admin_digest(cfg: ServeConfig, digests: list[str]) -> str | None:
    """The digest of --admin-key (or CHATRLHF_ADMIN_KEY); None = hot swap disabled."""
    key = cfg.admin_key or os.environ.get("CHATRLHF_ADMIN_KEY", "")
    if not key:
        return None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise UsageError("--admin-key: must be at least 16 characters with no spaces", ADMIN_KEY_HINT)
    if digest(key) in digests:
        raise UsageError("--admin-key: is also an API key; the admin key must be a key of its own", ADMIN_KEY_HINT)
    return digest(key)


def run(_name: str, cfg: ServeConfig) -> int:
    check_flags(cfg)
    candidates = candidate_count(cfg)
    if candidates > cfg.max_batch + cfg.max_queue:
        raise UsageError(f"--candidates {candidates}: over --max-batch + --max-queue ({cfg.max_batch + cfg.max_queue})"
                         ": every request would be refused", "raise --max-queue or lower --candidates")
    digests = load_keys(cfg.api_key or os.environ.get("CHATRLHF_API_KEY", ""), cfg.api_keys)
    admin = admin_digest(cfg, digests)
    log = FeedbackLog(cfg.feedback_db, cfg.redact) if cfg.feedback_db else None
    # the reranker's own trunk, never the served policy's: that one goes away at a hot swap, the reranker stays
    reranker = load_reranker(cfg.rerank, device=cfg.device, dtype=cfg.dtype,
                             max_reply_length=cfg.max_tokens_limit + 1) if cfg.rerank else None
    s = Server(load_served(cfg, cfg.model, cfg.model_name), cfg, digests, log, admin, reranker, candidates)
    app = create_app(s)
    if not digests and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chatrlhf serve: warning: no API keys and listening on {cfg.host}: anyone who reaches it may use it "
              "(--api-key / --api-keys)", file=sys.stderr, flush=True)
    if reranker is not None:
        print(f"chatrlhf serve: each reply the best of {candidates} by {reranker.describe}", flush=True)
    print(f"chatrlhf serve: {s.served.name} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        for engine in s.engines():
            engine.stop()
    return 0
