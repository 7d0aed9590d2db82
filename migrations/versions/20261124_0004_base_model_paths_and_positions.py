"""base models: module paths inside a decoder layer and the number of positions

`module_paths` lets a job's dotted target names ("self_attn.q_proj") be checked exactly, and
`max_positions` bounds a job's cutoff_len. Both are filled in by the next `mola models sync`
(`mola serve` and docker-compose's migrate service run it at start-up); until then they are null.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("module_paths", sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql"), nullable=True))
        batch.add_column(sa.Column("max_positions", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("max_positions")
        batch.drop_column("module_paths")
