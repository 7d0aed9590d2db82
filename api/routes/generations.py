"""Trying a finished job's adapter on the server: POST a few prompts, poll for completions."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.deps import CurrentTenant, QueueDep, SessionDep, SettingsDep
from api.schemas import ErrorResponse, GenerationCreate, GenerationList, GenerationPublic, Text
from service import generations as generation_service
from service import workers

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs/{job_id}/generations",
    tags=["generations"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)


@router.post(
    "",
    status_code=202,
    response_model=GenerationPublic,
    summary="Generate with a finished job's adapter",
    description=(
        "Queues the completion of 1 to 16 prompts by the job's adapter on its base model; poll "
        "`GET /jobs/{job_id}/generations/{id}` until `status` is `succeeded` (then `completions`, "
        "one per prompt, in order) or `failed` (`error`). Each prompt is dressed as the job's "
        "training rows were (`template`: the one its adapter records) unless `template` says "
        "otherwise. Instead of prompts, `dataset_id` names an upload (a test set) whose first "
        "`rows` rows are completed, each dressed as training dressed it, and scored against their "
        "own completions (`scores`: exact match, answer accuracy where the references say "
        '"the answer is X", and the rows\' loss as the job\'s evaluation measures it). `step` '
        "takes a checkpoint's adapter instead of the final one. "
        "Generation runs on a training worker, between jobs: it waits for the job "
        "that worker is running (unless the server gives generations workers of their own, "
        "MOLA_GENERATION_QUEUE). Greedy unless `temperature` > 0. 409 while the job has no "
        "adapter (queued, running, or failed before saving one); 429 while the tenant has 16 "
        "generations waiting or running."
    ),
    responses={409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
def create_generation(
    job_id: Text, body: GenerationCreate, tenant: CurrentTenant, session: SessionDep, queue: QueueDep, settings: SettingsDep
) -> GenerationPublic:
    generation = generation_service.create(session, tenant.id, job_id, body.model_dump(mode="json"))
    session.commit()
    try:
        queue.enqueue_generation(generation.id)
    except Exception:  # the row is the truth; the reconciler sends queued generations again
        logger.exception("could not enqueue generation %s; it stays queued", generation.id)
    return GenerationPublic.of(generation, workers.place_in_queue(session, settings, generation))


@router.get("", response_model=GenerationList, summary="The job's generations, newest first")
def list_generations(
    job_id: Text,
    tenant: CurrentTenant,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[Text | None, Query(description="the last id of the previous page")] = None,
) -> GenerationList:
    rows, has_more = generation_service.list_for_job(session, tenant.id, job_id, limit, after or None)
    return GenerationList(data=[GenerationPublic.of(g) for g in rows], has_more=has_more, last_id=rows[-1].id if rows else None)


@router.get("/{generation_id}", response_model=GenerationPublic, summary="One generation: its status and completions")
def get_generation(job_id: Text, generation_id: Text, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> GenerationPublic:
    generation = generation_service.get(session, tenant.id, job_id, generation_id)
    return GenerationPublic.of(generation, workers.place_in_queue(session, settings, generation))


@router.delete(
    "/{generation_id}",
    status_code=204,
    summary="Delete a generation (cancel it while it waits)",
    description=(
        "Deletes the generation in any state. A queued one is never run and no longer counts "
        "among the tenant's 16 waiting; a running one finishes on the worker (seconds to minutes) "
        "but its completions are dropped; a finished one's completions are gone."
    ),
)
def delete_generation(job_id: Text, generation_id: Text, tenant: CurrentTenant, session: SessionDep) -> Response:
    generation_service.forget(session, tenant.id, job_id, generation_id)
    session.commit()
    return Response(status_code=204)
