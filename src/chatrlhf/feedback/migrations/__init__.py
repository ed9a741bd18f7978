"""Alembic migrations of the feedback store. ``upgrade(engine)`` brings any database to the head
revision; a new revision is made with ``alembic -c src/chatrlhf/feedback/migrations/alembic.ini
revision --autogenerate -m '…'`` against a database at the previous head."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def config(engine=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(config(engine), revision)


def current(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
