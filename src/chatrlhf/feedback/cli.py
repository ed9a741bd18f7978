"""`chatrlhf feedback init | add-user | import | export | stats | serve`."""

from __future__ import annotations

import getpass
import json
import os
import secrets
import sys

from chatrlhf.data.formats import load_records
from chatrlhf.data.records import Conversation, Correction, Preference, Rating
from chatrlhf.errors import UsageError


def run(sub: str, cfg) -> int:
    from chatrlhf.feedback.store import Store

    if sub == "init":
        store = Store(cfg.db)
        from chatrlhf.feedback.migrations import current

        print(f"chatrlhf feedback: {store.url} at schema revision {current(store.engine)}")
        return 0
    store = Store(cfg.db)
    if sub == "add-user":
        if not cfg.name:
            raise UsageError("--name is required")
        password = os.environ.get("CHATRLHF_PASSWORD") or getpass.getpass(f"password for {cfg.name}: ")
        user = store.add_user(cfg.name, password, cfg.role)
        print(f"chatrlhf feedback: user {user.name} ({user.role}) added")
        return 0
    if sub == "serve":
        import uvicorn

        from chatrlhf.feedback.app import create_app

        models = cfg.model
        app = create_app(store, os.environ.get("CHATRLHF_SECRET"), cfg.production, models=models,
                         max_new_tokens=cfg.max_new_tokens)  # checks the settings once
        print(f"chatrlhf feedback: serving {store.url} on http://{cfg.host}:{cfg.port}", flush=True)
        if cfg.workers > 1 and store.sqlite:
            print("chatrlhf feedback: warning: SQLite lets one process write at a time, so the workers queue for "
                  "its lock, and a worker waiting for it stalls all its requests: on SQLite more workers add "
                  "little for annotation (measure with benchmarks/feedback_load.py --workers N). PostgreSQL "
                  "(--db postgresql+psycopg://…) lets them write in parallel.", file=sys.stderr, flush=True)
        if cfg.workers > 1:  # worker processes share the session secret, so a log-in holds across them
            if not os.environ.get("CHATRLHF_SECRET"):
                os.environ["CHATRLHF_SECRET"] = secrets.token_urlsafe(32)
            os.environ.update(CHATRLHF_DB=store.url, CHATRLHF_PRODUCTION="1" if cfg.production else "0",
                              CHATRLHF_MODELS=",".join(models), CHATRLHF_MAX_NEW_TOKENS=str(cfg.max_new_tokens))
            uvicorn.run("chatrlhf.feedback.app:from_env", factory=True, host=cfg.host, port=cfg.port,
                        workers=cfg.workers, log_level="warning")
        else:
            uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
        return 0
    if sub == "import":
        counts = import_file(store, cfg)
        print(f"chatrlhf feedback: imported {counts} from {cfg.data}")
        return 0
    if sub == "export":
        from chatrlhf.feedback.export import export

        m = export(store, cfg.output_dir, cfg.rule, None if cfg.round < 0 else cfg.round, cfg.eval_fraction, cfg.seed)
        print(f"chatrlhf feedback: exported {m['counts']} to {cfg.output_dir} (sha256 {m['sha256'][:12]}…)")
        return 0
    from chatrlhf.feedback.quality import agreement, reliability

    names = {u.id: u.name for u in store.users()}
    print(json.dumps({"progress": store.progress(), "agreement": agreement(store),
                      "reliability": {names[u]: round(r, 3) for u, r in reliability(store).items()}}, indent=2))
    return 0


KINDS = ("auto", "rate", "compare", "correct")
MAX_K, MAX_ROUND = 100, 1_000_000


def import_file(store, cfg, source: str | None = None) -> dict:
    """Records of any chatrlhf format → prompts, replies (with provenance) and items, in one transaction: a file
    that fails half-way leaves nothing behind. ``source`` is recorded with each prompt (default: the path)."""
    if not cfg.data:
        raise UsageError("--data is required")
    if cfg.kind not in KINDS:
        raise UsageError(f"--kind {cfg.kind!r}: not one of {', '.join(KINDS)}")
    if not 1 <= cfg.k <= MAX_K:
        raise UsageError(f"--k {cfg.k}: must be 1–{MAX_K}")
    if not 0 <= cfg.round <= MAX_ROUND:
        raise UsageError(f"--round {cfg.round}: must be 0–{MAX_ROUND:,}")
    records = load_records(cfg.data).records  # every record parsed before anything is written
    source = source or cfg.data
    counts = {"prompts": 0, "replies": 0, "items": 0}
    prompt_ids: dict[str, int] = {}

    def prompt(messages):
        key = json.dumps(messages, sort_keys=True)
        if key not in prompt_ids:
            prompt_ids[key] = store.add_prompt(messages, source=source, round=cfg.round)
            counts["prompts"] += 1
        return prompt_ids[key]

    def reply(pid, text):
        counts["replies"] += 1
        return store.add_reply(pid, text, model=cfg.model, round=cfg.round)

    def item(kind, a, b=None):
        counts["items"] += 1
        return store.add_item(kind, a, b, k=cfg.k, round=cfg.round)

    with store.transaction():
        for rec in records:
            _import_one(rec, cfg.kind, prompt, reply, item)
    return counts


def _import_one(rec, kind: str, prompt, reply, item) -> None:
    if isinstance(rec, Preference) and kind in ("auto", "compare"):
        pid = prompt(rec.prompt)
        item("compare", reply(pid, rec.chosen), reply(pid, rec.rejected))
    elif isinstance(rec, (Preference, Rating, Correction)):
        pid = prompt(rec.prompt)
        for text in ([rec.chosen, rec.rejected] if isinstance(rec, Preference) else [rec.response]):
            item("correct" if kind == "correct" else "rate", reply(pid, text))
    elif isinstance(rec, Conversation):
        if rec.messages and rec.messages[-1]["role"] == "assistant":
            item("correct" if kind == "correct" else "rate", reply(prompt(rec.prompt), rec.messages[-1]["content"]))
        else:
            prompt(rec.messages)
