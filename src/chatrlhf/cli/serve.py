"""`chatrlhf serve`: load the model, start the engine's background loop, serve the app with uvicorn."""

from __future__ import annotations

import os
import sys

import uvicorn

from chatrlhf.config import ServeConfig
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.errors import UsageError
from chatrlhf.models import load_model
from chatrlhf.serve.app import create_app
from chatrlhf.serve.feedback import FeedbackLog, checkpoint_hash
from chatrlhf.serve.limits import load_keys


def run(_name: str, cfg: ServeConfig) -> int:
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
    log = FeedbackLog(cfg.feedback_db, cfg.model_name or cfg.model, checkpoint_hash(cfg.model), cfg.redact) \
        if cfg.feedback_db else None
    digests = load_keys(cfg.api_key or os.environ.get("CHATRLHF_API_KEY", ""), cfg.api_keys)
    model, tok = load_model(cfg, chat_template=cfg.chat_template)
    engine = Engine(model.eval(), tok, cfg.dtype, max_batch=cfg.max_batch).start()
    app = create_app(engine, cfg, digests, log)
    if not digests and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chatrlhf serve: warning: no API keys and listening on {cfg.host}: anyone who reaches it may use it "
              "(--api-key / --api-keys)", file=sys.stderr, flush=True)
    print(f"chatrlhf serve: {cfg.model_name or cfg.model} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.stop()
    return 0
