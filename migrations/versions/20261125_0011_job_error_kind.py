"""jobs: error_kind, why a failed job failed, by what resuming it can do

One of service.models.FAILURE_KINDS, written with the failure: `out_of_memory`, `data`,
`hyperparameters`, `evaluation`, `diverged`, `base_model`, `server_limit`, `abandoned` or `internal`.
POST /jobs/{id}/resume refuses a job whose failure would recur (`data`, `hyperparameters`).
Jobs failed earlier keep NULL (treated as `internal`: resumable).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("error_kind", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("error_kind")
