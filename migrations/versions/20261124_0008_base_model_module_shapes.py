"""base_models: module_shapes, the (in, out) features of every adaptable module per layer

What `mola.sizing` counts a job's adapter from when the job is requested, so that an adapter
over MOLA_MAX_ADAPTER_PARAMS is a 422 at POST /jobs rather than a failure when it starts. Rows
synced earlier keep NULL until the next `mola models sync` (start-up of `mola serve` runs it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("module_shapes", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("module_shapes")
