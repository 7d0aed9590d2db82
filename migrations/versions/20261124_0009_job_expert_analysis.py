"""jobs: analysis, how a finished MoLA job's adapter uses its experts

Written with the final state of a MoLA run that leaves an adapter (succeeded, or cancelled
after some training): routing and redundancy per layer and module, from
`mola.analysis.expert_report`. Served by GET /jobs/{id}/analysis. Jobs finished earlier keep NULL.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("analysis", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("analysis")
