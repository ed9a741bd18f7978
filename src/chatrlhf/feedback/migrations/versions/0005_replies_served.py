"""replies: what `chatrlhf serve` knows of a served completion (its id and choice, finish reason, token counts);
prompts.source indexed (served conversations are found by their digest)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("replies") as batch:
        batch.add_column(sa.Column("completion_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("choice_index", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("finish_reason", sa.String(16), nullable=True))
        batch.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("completion_tokens", sa.Integer(), nullable=True))
    op.create_index("ix_replies_completion", "replies", ["completion_id", "choice_index"], unique=True)
    op.create_index("ix_prompts_source", "prompts", ["source"])


def downgrade() -> None:
    op.drop_index("ix_prompts_source", "prompts")
    op.drop_index("ix_replies_completion", "replies")
    with op.batch_alter_table("replies") as batch:
        for column in ("completion_tokens", "prompt_tokens", "finish_reason", "choice_index", "completion_id"):
            batch.drop_column(column)
