"""Alembic environment: runs on the engine the Store passes in (or on sqlalchemy.url from alembic.ini)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from chatrlhf.feedback.tables import Base

engine = context.config.attributes.get("engine")
if engine is None:
    engine = engine_from_config(context.config.get_section(context.config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copy
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
