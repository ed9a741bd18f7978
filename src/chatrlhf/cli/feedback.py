"""`chatrlhf feedback init | add-user | import | export | stats | serve`; `queue` and `simulate` run in cli/active.py,
imported only for them (queue may load a reward model, and this module must not import torch)."""

from __future__ import annotations

import getpass
import json
import os
import secrets
import sys
from pathlib import Path

import uvicorn

from chatrlhf.config import FeedbackExportConfig, FeedbackImportConfig, FeedbackServeConfig, FeedbackUserConfig
from chatrlhf.errors import UsageError
from chatrlhf.feedback.app import create_app
from chatrlhf.feedback.diversity import summary_line
from chatrlhf.feedback.export import export
from chatrlhf.feedback.imports import import_file
from chatrlhf.feedback.migrations import current
from chatrlhf.feedback.quality import agreement, reliability
from chatrlhf.feedback.store import Store


def run(sub: str, cfg) -> int:
    if sub in ("queue", "simulate"):
        from chatrlhf.cli import active

        return active.run(sub, cfg)
    store = Store(cfg.db)
    if sub == "init":
        print(f"chatrlhf feedback: {store.url} at schema revision {current(store.engine)}")
        return 0
    return {"add-user": add_user, "serve": serve, "import": import_records, "export": export_records,
            "stats": stats}[sub](store, cfg)


def add_user(store: Store, cfg: FeedbackUserConfig) -> int:
    if not cfg.name:
        raise UsageError("--name is required")
    password = os.environ.get("CHATRLHF_PASSWORD") or getpass.getpass(f"password for {cfg.name}: ")
    user = store.add_user(cfg.name, password, cfg.role)
    print(f"chatrlhf feedback: user {user.name} ({user.role}) added")
    return 0


def serve(store: Store, cfg: FeedbackServeConfig) -> int:
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


def import_records(store: Store, cfg: FeedbackImportConfig) -> int:
    counts = import_file(store, cfg.data, cfg.kind, cfg.k, cfg.round, cfg.model)
    print(f"chatrlhf feedback: imported {counts} from {cfg.data}")
    return 0


def export_records(store: Store, cfg: FeedbackExportConfig) -> int:
    m = export(store, cfg.output_dir, cfg.rule, None if cfg.round < 0 else cfg.round, cfg.eval_fraction, cfg.seed)
    print(f"chatrlhf feedback: exported {m['counts']} to {cfg.output_dir} (sha256 {m['sha256'][:12]}…)")
    d = json.loads((Path(cfg.output_dir) / "diversity.json").read_text(encoding="utf-8"))
    print(f"chatrlhf feedback: diversity ({cfg.output_dir}/diversity.json): {summary_line(d)}")
    return 0


def stats(store: Store, cfg) -> int:
    names = {u.id: u.name for u in store.users()}
    print(json.dumps({"progress": store.progress(), "agreement": agreement(store),
                      "reliability": {names[u]: round(r, 3) for u, r in reliability(store).items()}}, indent=2))
    return 0
