"""dataset token counts: per-model token statistics of an upload, filled in by the quick task

`mola.count_tokens` tokenizes an uploaded dataset with each catalogue model's tokenizer and stores
the counts with their status (pending, ready, failed). Rows uploaded earlier keep NULLs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("token_counts", JSON, nullable=True))
        batch.add_column(sa.Column("token_counts_status", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("token_counts_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("token_counts_error")
        batch.drop_column("token_counts_status")
        batch.drop_column("token_counts")
