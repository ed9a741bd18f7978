"""items.filled: an item with its k answers is never scanned again when leasing

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN and CREATE INDEX: SQLite does both in place (no table copy, foreign keys untouched)
    op.add_column("items", sa.Column("filled", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_items_open", "items", ["filled", "id"])
    # items that already have k answers (every answer marked its lease done)
    op.execute("UPDATE items SET filled = (SELECT count(*) FROM assignments a WHERE a.item_id = items.id "
               "AND a.done) >= items.k")


def downgrade() -> None:
    op.drop_index("ix_items_open", "items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("filled")
