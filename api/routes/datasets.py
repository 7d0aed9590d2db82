from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, QueueDep, SessionDep, SettingsDep, StorageDep
from api.middleware import too_large_detail
from api.schemas import DatasetList, DatasetPublic, Deleted, ErrorResponse, Text
from service import datasets as dataset_service
from service.errors import InvalidRequest, PayloadTooLarge
from service.models import Dataset

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/datasets", tags=["datasets"], responses={401: {"model": ErrorResponse}})

CHUNK = 1 << 20


def _public(dataset: Dataset) -> DatasetPublic:
    """The dataset as the API shows it; a report stored with the empty token fields of older
    uploads is shown as a new one is stored (`dataset_service.upload_report`)."""
    public = DatasetPublic.of(dataset)
    return public.model_copy(update={"report": dataset_service.upload_report(public.report)})


def _clean_filename(name: str | None) -> str:
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base)[:200]
    return base or "dataset.jsonl"


async def one_file(request: Request) -> None:
    """Exactly one `file` part. A form keeps the last of several parts with one name, so a
    second `file` would be dropped without a word: refused instead. A body that is not a
    multipart form, or a form without a `file` part, is refused saying what an upload is,
    rather than with a bare "Field required". (The form is parsed already, for `file`.)"""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise InvalidRequest(
            ("body", "file"),
            f"an upload is a multipart/form-data body with the JSONL file in a part named 'file' "
            f"(curl -F file=@train.jsonl), not {content_type or 'a body without a Content-Type'}",
        )
    form = await request.form()
    count = len(form.getlist("file"))
    if count == 0:
        others = ", ".join(sorted({repr(name) for name in form.keys()})[:5]) or "none"
        raise InvalidRequest(("body", "file"), f"no part named 'file' in the form (its parts: {others}): send the JSONL file as -F file=@train.jsonl")
    if count > 1:
        raise InvalidRequest(("body", "file"), f"one file per upload, got {count}: send each dataset in its own request")


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    summary="Upload a JSONL dataset",
    description=(
        "Multipart upload (field `file`) of a JSONL file in a format mola reads: alpaca "
        "{instruction, input?, output}, chat {messages}, completion {prompt, completion} or "
        "text {text}. It is validated before it is stored: a file with errors gets a 422 whose "
        "`report` lists the first errors with their line numbers, and nothing is kept. Token "
        "counts per base model follow from a quick job: `token_counts.status` is `pending` in "
        "this response; poll `GET /datasets/{id}` until it is `ready` (or `failed`)."
    ),
    responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
def upload_dataset(
    file: Annotated[UploadFile, File(description="the JSONL file")],
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    queue: QueueDep,
    _one_file: Annotated[None, Depends(one_file)],
) -> DatasetPublic:
    upload_dir = settings.data_dir / "uploads"
    upload_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=upload_dir, suffix=".jsonl")
    path = Path(name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := file.file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(too_large_detail(settings.max_upload_bytes))
                digest.update(chunk)
                out.write(chunk)
        dataset = dataset_service.create_dataset(
            session, storage, tenant.id, _clean_filename(file.filename), path, size, digest.hexdigest(),
            max_row_bytes=settings.max_row_kb * 1024,
        )
        try:
            session.commit()
        except Exception:  # no row, so no file: the stored copy would never be found again
            storage.delete(dataset.storage_key)
            raise
    finally:
        path.unlink(missing_ok=True)
    try:
        queue.enqueue_token_count(dataset.id)
    except Exception:  # the upload stands; its token counts stay pending
        logger.exception("could not enqueue the token count of dataset %s", dataset.id)
    return _public(dataset)


@router.get("", response_model=DatasetList, summary="The tenant's datasets, newest first")
def list_datasets(
    tenant: CurrentTenant,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[Text | None, Query(description="the last id of the previous page")] = None,
) -> DatasetList:
    if after:  # empty: the first page (a script's `after=$LAST` before it has one)
        _check_cursor(session, tenant.id, after)
    rows, has_more = dataset_service.list_datasets(session, tenant.id, limit, after)
    return DatasetList(data=[_public(r) for r in rows], has_more=has_more, last_id=rows[-1].id if rows else None)


def _check_cursor(session: Session, tenant_id: str, after: str) -> None:
    """``after`` must be one of the tenant's dataset ids (a deleted one too: its row stays, and a
    client may delete what it pages through). Any other string still sorts among the ids, so a
    typo would quietly give a wrong page instead of an error; another tenant's id is refused
    like an unknown one."""
    if not after.startswith("ds_"):
        raise InvalidRequest(("query", "after"), f"{after!r} is not a dataset id: pass the last_id of the previous page of datasets")
    dataset = session.get(Dataset, after)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise InvalidRequest(("query", "after"), f"no dataset {after!r} to continue after: pass the last_id of the previous page of datasets")


@router.get("/{dataset_id}", response_model=DatasetPublic, responses={404: {"model": ErrorResponse}})
def get_dataset(dataset_id: Text, tenant: CurrentTenant, session: SessionDep) -> DatasetPublic:
    return _public(dataset_service.get_dataset(session, tenant.id, dataset_id))


@router.delete(
    "/{dataset_id}",
    response_model=Deleted,
    summary="Delete a dataset",
    description="Refused (409) while a queued or running job trains or evaluates on it, or a queued or running generation completes its rows.",
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def delete_dataset(dataset_id: Text, tenant: CurrentTenant, session: SessionDep, storage: StorageDep) -> Deleted:
    # Locked first: a job or generation being created on it commits before the deletion's check
    # sees it, and one that starts later finds the dataset deleted (`dataset_service.lock_dataset`).
    # The check's 409 names the jobs to cancel or wait for, and the generations.
    dataset = dataset_service.get_dataset(session, tenant.id, dataset_id, lock="update")
    key = dataset_service.delete_dataset(session, dataset)
    session.commit()
    try:
        storage.delete(key)
    except Exception:  # the dataset is gone for the API either way; only its bytes are left over
        logger.exception("dataset %s deleted, but its file %s could not be removed from storage", dataset_id, key)
    return Deleted(id=dataset_id)
