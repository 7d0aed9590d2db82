"""Plain factory functions for rows the tests need without going through the API. They flush;
the caller commits."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.models import Dataset, Job, Tenant, new_id


def tenant_row(session: Session, name: str | None = None) -> Tenant:
    tenant = Tenant(name=name or new_id("tenant"))
    session.add(tenant)
    session.flush()
    return tenant


def dataset_row(session: Session, tenant: Tenant | None = None, **fields: Any) -> Dataset:
    tenant = tenant or tenant_row(session)
    values = {"filename": "train.jsonl", "format": "alpaca", "rows": 1, "size_bytes": 10, "sha256": "0" * 64, "storage_key": "datasets/x.jsonl"}
    dataset = Dataset(tenant_id=tenant.id, **{**values, **fields})
    session.add(dataset)
    session.flush()
    return dataset


def job_row(session: Session, dataset: Dataset | None = None, **fields: Any) -> Job:
    dataset = dataset or dataset_row(session)
    values = {"base_model": "tiny-llama", "method": "mola", "spec": {}}
    job = Job(tenant_id=dataset.tenant_id, dataset_id=dataset.id, **{**values, **fields})
    session.add(job)
    session.flush()
    return job
