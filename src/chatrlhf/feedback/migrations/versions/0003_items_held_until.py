"""items.held_until: leasing skips items others hold without counting their leases

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL (no hint) for every existing item: the next lease counts them as before
    op.add_column("items", sa.Column("held_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("held_until")
