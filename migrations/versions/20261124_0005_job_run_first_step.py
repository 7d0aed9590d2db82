"""jobs: the first step the current run recorded, and when, for the ETA

A job's ETA was measured from `started_at`, its first run's start, so right after a resume it
counted the time the job was down. It is now measured from the first progress the current run
records (`run_first_step` at `run_first_step_at`), which a claim resets. Jobs running during the
upgrade show no ETA until their next run.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run_first_step", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("run_first_step_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("run_first_step_at")
        batch.drop_column("run_first_step")
