"""jobs: queued_at, when a job last went (back) to its queue

Set when a job is created, resumed, given back by a worker that stops, or queued again after
its lease ran out. A queued job's place (`ahead`) counts what went to the queue before it: by
created_at, a resumed job counted jobs created after it but queued before it as behind it.
Jobs there already take their created_at.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET queued_at = created_at")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("queued_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queued_at")
