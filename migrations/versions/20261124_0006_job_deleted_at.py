"""jobs: deleted_at, set while a job is being deleted (DELETE /jobs/{id})

A deletion hides the job at once (this column, with its metric and checkpoint rows deleted in
the same transaction), then deletes its stored files, then the row. A deletion interrupted in
between leaves the row marked, naming the files still to delete: a repeated DELETE, or the next
`mola serve`, finishes it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deleted_at")
