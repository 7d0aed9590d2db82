"""generations: dataset_id, the upload whose rows a generation completes

A column (it was only in the request) so that deleting a dataset can be refused while a
generation waits for its rows or runs on them. Filled in from the requests already there.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENERATIONS = sa.table(
    "generations",
    sa.column("id", sa.String),
    sa.column("request", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
    sa.column("dataset_id", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("dataset_id", sa.String(length=40), nullable=True))
        batch.create_foreign_key(op.f("fk_generations_dataset_id_datasets"), "datasets", ["dataset_id"], ["id"])
        batch.create_index(op.f("ix_generations_dataset_id_status"), ["dataset_id", "status"])
    bind = op.get_bind()
    for generation_id, request in bind.execute(sa.select(GENERATIONS.c.id, GENERATIONS.c.request)).all():
        dataset_id = (request or {}).get("dataset_id")
        if dataset_id is not None:
            bind.execute(sa.update(GENERATIONS).where(GENERATIONS.c.id == generation_id).values(dataset_id=dataset_id))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_index(op.f("ix_generations_dataset_id_status"))
        batch.drop_constraint(op.f("fk_generations_dataset_id_datasets"), type_="foreignkey")
        batch.drop_column("dataset_id")
