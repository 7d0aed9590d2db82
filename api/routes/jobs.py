from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, QueueDep, SessionDep, SettingsDep, StorageDep
from api.schemas import (
    MAX_STEP,
    CheckpointList,
    CheckpointPublic,
    ErrorResponse,
    JobAnalysis,
    JobComparison,
    JobCreate,
    JobList,
    JobPlan,
    JobPublic,
    JobResume,
    JobStatus,
    MetricList,
    MetricPublic,
    Text,
    WebhookDeliveryList,
    WebhookDeliveryPublic,
)
from service import jobs as job_service
from service import comparison, plans, webhooks, workers
from service.errors import Conflict, InvalidRequest, NotFound
from service.models import TERMINAL_STATUSES, Job

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)

EVENTS_POLL_SECONDS = 0.5
EVENTS_KEEPALIVE_SECONDS = 15.0


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    summary="Create a fine-tuning job",
    description=(
        "Checks the request against the base model (allocation length = its layers, target "
        "modules it has, ...) and the tenant's datasets before anything is queued; a dataset "
        "whose token counts (`GET /datasets/{id}`) show that no row keeps a trainable token "
        "within the job's `cutoff_len` is a 422 on `hyperparameters.cutoff_len` (with `epochs`, a "
        "`warmup_steps` longer than the steps they make, on `hyperparameters.warmup_steps`; see "
        "`POST /jobs/plan`), and an adapter "
        "larger than the server's MOLA_MAX_ADAPTER_PARAMS a 422 on `allocation` (LoRA: "
        "`hyperparameters.rank`); the job's `adapter_parameters` says its size. With an "
        "`Idempotency-Key` header, repeating the same request returns the job it created "
        "(200, header `Idempotent-Replayed: true`); reusing a key for another request is a 409. "
        "A tenant with MOLA_MAX_ACTIVE_JOBS queued or running jobs gets a 429 for one more."
    ),
    responses={
        200: {"model": JobPublic, "description": "replayed"},
        409: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> JobPublic:
    if idempotency_key is not None:
        # HTTP servers strip a header value's surrounding whitespace, but not every proxy or
        # test client does: " k " and "k" are one key, and a blank one is no key.
        idempotency_key = idempotency_key.strip()
        if not idempotency_key:
            raise InvalidRequest(("header", "Idempotency-Key"), "must not be blank")
    request = body.model_dump(mode="json")
    try:
        job, created = job_service.create_job(
            session, tenant.id, request, idempotency_key, settings.max_adapter_params, settings.max_active_jobs, settings.webhooks_reach_private
        )
        if created:
            plans.refuse_doomed(session, job.spec)
        session.commit()
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race: answer with its job.
        session.rollback()
        job = job_service.find_by_idempotency_key(session, tenant.id, idempotency_key) if idempotency_key else None
        if job is None:
            raise
        if job.request_hash != job_service.request_hash(request):
            raise Conflict("Idempotency-Key was already used with a different request") from None
        created = False
    if created:
        try:
            queue.enqueue_training(job.id)
        except Exception:  # the row is the truth; a reconciler re-enqueues queued jobs
            logger.exception("could not enqueue job %s; it stays queued", job.id)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.of(job, workers.place_in_queue(session, settings, job))


@router.post(
    "/plan",
    response_model=JobPlan,
    summary="What a job would do, without creating it",
    description=(
        "The same body as `POST /jobs`, checked the same way (the same 422s), and nothing created "
        "or queued: the job's expanded allocation, hyperparameters with their defaults, adapter "
        "size, and the examples and steps its datasets give. With an upload's token counts for "
        "the model at the job's `cutoff_len` (`GET /datasets/{id}`) the numbers are exact; "
        "otherwise the row count stands in (`exact: false`, and a warning says why)."
    ),
    responses={422: {"model": ErrorResponse}},
)
def plan_job(body: JobCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> JobPlan:
    spec = job_service.build_spec(session, tenant.id, body.model_dump(mode="json"), settings.max_adapter_params, settings.webhooks_reach_private)
    planned = plans.plan(session, spec)
    plans.refuse_doomed(session, spec, planned)
    return JobPlan.of(spec, planned)


@router.get(
    "",
    response_model=JobList,
    summary="The tenant's jobs, newest first",
    description=(
        "`status`, `dataset_id` (the jobs training on that dataset, deleted or not: an id that is "
        "not one of yours is a 422), `base_model` and `method` narrow the list; `after` continues "
        "after the previous page's `last_id`, with the same filters."
    ),
    responses={422: {"model": ErrorResponse}},
)
def list_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[Text | None, Query(description="the last id of the previous page")] = None,
    dataset_id: Annotated[Text | None, Query(max_length=40, description="only the jobs training on this dataset")] = None,
    base_model: Annotated[Text | None, Query(max_length=200, description="only the jobs on this base model")] = None,
    method: Literal["mola", "lora"] | None = None,
) -> JobList:
    jobs, has_more = job_service.list_jobs(session, tenant.id, status, limit, after, dataset_id, base_model, method)
    return JobList(data=[JobPublic.of(j) for j in jobs], has_more=has_more, last_id=jobs[-1].id if jobs else None)


@router.get(
    "/compare",
    response_model=JobComparison,
    summary="Jobs side by side",
    description=(
        "`?ids=job_a,job_b` (2 to 20 of your jobs, any status): for each, what it trained "
        "(allocation, top-k, adapter size, hyperparameters as it ran), how far it got, its last "
        "training metrics (`lm_loss` compares across methods), its last and best evaluation, and its "
        "time; then the settings that differ between them, the job with the lowest `eval_loss`, "
        "and `warnings` where their numbers do not measure the same thing (another base model, "
        "validation set, `cutoff_len` or `train_on_inputs` for the losses; another training set for "
        "the train loss; another `eval_generate_rows` for the exact match). An unknown id is a 404 naming it."
    ),
    responses={422: {"model": ErrorResponse}},
)
def compare_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    ids: Annotated[Text, Query(max_length=2000, description="job ids separated by commas")],
) -> JobComparison:
    return JobComparison(**comparison.compare_jobs(session, tenant.id, comparison.parse_ids(ids)))


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: Text, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> JobPublic:
    job = job_service.get_job(session, tenant.id, job_id)
    return JobPublic.of(job, workers.place_in_queue(session, settings, job))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    description=(
        "A queued job is cancelled at once. A running job stops at its next step, keeping its "
        "checkpoints and the adapter trained so far; until then it shows `cancel_requested`."
    ),
    responses={409: {"model": ErrorResponse}},
)
def cancel_job(job_id: Text, tenant: CurrentTenant, session: SessionDep, queue: QueueDep) -> JobPublic:
    job = job_service.cancel_job(session, job_service.get_job(session, tenant.id, job_id))
    session.commit()
    if job.status == "cancelled" and (job.spec or {}).get("webhook_url"):  # ended here: its webhook is due
        _send_webhooks(queue, job.id)
    return JobPublic.of(job)


def _send_webhooks(queue, job_id: str) -> None:
    try:
        queue.enqueue_webhooks()
    except Exception:  # the event is in the outbox: a reconciler pass sends it
        logger.exception("could not ask for job %s's webhook to be sent; the reconciler will", job_id)


@router.post(
    "/{job_id}/resume",
    response_model=JobPublic,
    summary="Resume a failed or cancelled job",
    description=(
        "Queues the job again, to continue from its newest checkpoint (from the start without "
        "one; `progress.step` says which) to the end of its schedule, with a fresh budget of "
        "attempts. The body may change what does not change the training: "
        f"{', '.join(job_service.RESUMABLE_HYPERPARAMETERS)} (after running out of memory: a "
        "smaller `micro_batch_size`, or `gradient_checkpointing`); anything else is a 422. The "
        "stopped run's metrics after the checkpoint, result, analysis and final adapter are "
        "replaced by the new run's (its checkpoints stay downloadable). 409 for a queued, "
        "running or succeeded job, or one whose dataset has been deleted; 429 when the tenant "
        "already has MOLA_MAX_ACTIVE_JOBS queued or running jobs."
    ),
    responses={409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
def resume_job(
    job_id: Text,
    tenant: CurrentTenant,
    session: SessionDep,
    queue: QueueDep,
    storage: StorageDep,
    settings: SettingsDep,
    body: JobResume | None = None,
) -> JobPublic:
    changes = body.changes() if body is not None else {}
    job, stopped_adapter = job_service.resume_job(session, job_service.get_job(session, tenant.id, job_id), changes, settings.max_active_jobs)
    session.commit()
    try:
        queue.enqueue_training(job.id)
    except Exception:  # the row is the truth; a reconciler re-enqueues queued jobs
        logger.exception("could not enqueue resumed job %s; it stays queued", job.id)
    if stopped_adapter is not None:
        try:
            storage.delete(stopped_adapter)
        except Exception:  # left under the job's prefix: deleted with the job
            logger.warning("job %s: could not delete the stopped run's adapter %s", job.id, stopped_adapter, exc_info=True)
    return JobPublic.of(job, workers.place_in_queue(session, settings, job))


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete a finished job",
    description=(
        "Deletes a succeeded, failed or cancelled job with its metrics, checkpoints and adapter "
        "(their stored files included); a queued or running job is a 409: cancel it first. The "
        "job answers 404 from the moment the deletion starts. A 503 means its files could not "
        "all be deleted yet: send the DELETE again to finish (`mola serve` also finishes "
        "interrupted deletions when it starts). Its `Idempotency-Key` is free again afterwards."
    ),
    responses={409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
def delete_job(job_id: Text, tenant: CurrentTenant, session: SessionDep, storage: StorageDep) -> Response:
    # A job whose deletion was interrupted is found too: this request finishes it.
    job = job_service.get_job_even_if_being_deleted(session, tenant.id, job_id)
    job_service.start_deletion(session, job)
    session.commit()
    try:
        job_service.delete_job_files(storage, job_id)
    except Exception:
        logger.exception("job %s: deleting its stored files failed; the job stays marked for deletion", job_id)
        raise HTTPException(
            503, f"job {job_id} is deleted, but its stored files could not all be removed yet: send the DELETE again to finish"
        ) from None
    job_service.finish_deletion(session, job_id)
    session.commit()
    return Response(status_code=204)


@router.get(
    "/{job_id}/metrics",
    response_model=MetricList,
    summary="Training and evaluation metrics",
    description="Incremental: pass the previous answer's `last_step` as `after_step`. A page never splits a step.",
)
def get_metrics(
    job_id: Text,
    tenant: CurrentTenant,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="steps per page")] = 100,
    kind: Annotated[str | None, Query(pattern="^(train|eval)$")] = None,
) -> MetricList:
    job_service.get_job(session, tenant.id, job_id)
    rows, has_more = job_service.get_metrics(session, job_id, after_step, limit, kind)
    return MetricList(data=[MetricPublic.of(r) for r in rows], has_more=has_more, last_step=rows[-1].step if rows else None)


def _sse(event: str, data: str, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


# A metric event's id: "<step>.<kind>" (a step's eval and train rows each have their own), or a
# bare "<step>", the ids of earlier versions, meaning "after all of that step".
EVENT_ID_RE = re.compile(r"^(\d{1,20})(?:\.([a-z_]{1,16}))?$")


def metric_event_id(metric: MetricPublic) -> str:
    return f"{metric.step}.{metric.kind}"


def resume_point(last_event_id: str | None, after_step: int) -> tuple[int, str | None]:
    """Where a stream starts: after (step, kind), or after all of step when kind is None; the
    later of `Last-Event-ID` and `after_step`. Rows come in (step, kind) order, so a client
    that saw a step's eval row and not its train row gets the train row."""
    if not last_event_id:
        return after_step, None
    match = EVENT_ID_RE.match(last_event_id)
    if match is None:
        raise InvalidRequest(
            ("header", "Last-Event-ID"),
            f"{last_event_id[:50]!r} is not an event id of this stream: '<step>.<kind>' (e.g. '20.train') or a step",
        )
    step, kind = min(int(match.group(1)), MAX_STEP), match.group(2)
    if step < after_step or (step == after_step and kind is not None):
        return after_step, None
    return step, kind


@router.get(
    "/{job_id}/events",
    summary="Follow a job live (Server-Sent Events)",
    description=(
        "A `text/event-stream` of `job` events (the job, whenever its state or progress "
        "changes), `metric` events (one per metric row, in step order, `id` = `<step>.<kind>`, "
        "e.g. `20.eval` then `20.train`) and a final `end` event when the job reaches a final "
        "status. Reconnect with `Last-Event-ID` (or `after_step`, after a whole step) to "
        "continue after the last metric seen; a bare step (`20`, the ids of earlier versions) "
        "continues after that whole step. A job that resumes after a crash writes again the "
        "steps after its last checkpoint, with the same losses (the resume is exact): a "
        "follower already past them does not get them twice. The stream ends early when the "
        "server shuts down."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: Text,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    await run_in_threadpool(job_service.get_job, session, tenant.id, job_id)
    session.close()  # give the connection back: the stream polls with short sessions of its own
    start = resume_point(last_event_id, after_step)
    factory = request.app.state.sessionmaker

    def poll(cursor: tuple[int, str | None]) -> tuple[JobPublic | None, list[MetricPublic]]:
        """The job (None once it is being deleted) and its metrics after ``cursor``."""
        with factory() as s:
            rows, _ = job_service.get_metrics(s, job_id, cursor[0], limit=500, after_kind=cursor[1])
            job = s.get(Job, job_id)
            if job is None or job.deleted_at is not None:
                return None, []
            return JobPublic.of(job), [MetricPublic.of(r) for r in rows]

    shutting_down = request.app.state.shutting_down

    async def stream() -> AsyncIterator[str]:
        cursor, last_state, last_sent = start, None, time.monotonic()
        while not await request.is_disconnected():
            if shutting_down.is_set():
                # The server is stopping: end here, or uvicorn would wait for this stream until
                # the job ends. A client reconnects with Last-Event-ID when it is back.
                yield ": the server is shutting down; reconnect with Last-Event-ID to continue\n\n"
                return
            job, metrics = await run_in_threadpool(poll, cursor)
            if job is None:  # deleted while followed (it had ended, so this is only the replay)
                return
            # The job first: a client that connects learns the state before the history.
            state = (job.status, job.progress.step, job.cancel_requested, job.progress.total_steps)
            if state != last_state:
                yield _sse("job", job.model_dump_json())
            for metric in metrics:
                yield _sse("metric", metric.model_dump_json(), metric_event_id(metric))
                cursor = (metric.step, metric.kind)
            if metrics or state != last_state:
                last_sent = time.monotonic()
            last_state = state
            if job.status in TERMINAL_STATUSES:
                if not metrics:  # drained: the worker writes its last metrics before finishing
                    yield _sse("end", json.dumps({"status": job.status, "error": job.error}))
                    return
                continue
            if time.monotonic() - last_sent > EVENTS_KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(EVENTS_POLL_SECONDS)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get(
    "/{job_id}/adapter",
    summary="Download the trained adapter",
    description=(
        "A `.tar.gz` with `adapter_config.json`, `adapter_model.safetensors` and a `README.md` "
        "model card; extract it and load the folder with `mola.load_mola_model(base, folder)`. "
        "Available once the job succeeded (or was cancelled after some training). With object "
        "storage the answer is a 307 redirect to a short-lived presigned URL (`MOLA_DOWNLOAD_MODE`)."
    ),
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}, 307: {"description": "redirect to a presigned storage URL"}},
)
def download_adapter(
    job_id: Text, tenant: CurrentTenant, session: SessionDep, storage: StorageDep, settings: SettingsDep
) -> Response:
    job = job_service.get_job(session, tenant.id, job_id)
    if job.adapter_key is None:
        raise NotFound(f"job {job_id} has no adapter (status: {job.status})")
    if not storage.exists(job.adapter_key):
        raise NotFound(f"the adapter file of job {job_id} is missing from storage")
    return _send_archive(storage, settings, job.adapter_key, f"{job.id}-adapter.tar.gz")


def _send_archive(storage, settings, key: str, filename: str) -> Response:
    """A stored `.tar.gz` as a download: a presigned redirect where the storage has URLs (and
    `MOLA_DOWNLOAD_MODE` is `redirect`), else the file or a stream of it."""
    if settings.download_mode == "redirect":  # a folder has no URLs: it streams
        url = storage.presigned_url(key, settings.presign_seconds, filename)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    path = storage.local_path(key)
    if path is not None:
        return FileResponse(path, media_type="application/gzip", filename=filename)
    return StreamingResponse(
        storage.iter_chunks(key),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="Checkpoints saved during training",
    description=(
        "Oldest first, with each step's `loss` and `eval_loss` (when reported at that step) in `metrics`; "
        "`best` marks the one with the lowest `eval_loss`."
    ),
)
def list_checkpoints(job_id: Text, tenant: CurrentTenant, session: SessionDep) -> CheckpointList:
    job_service.get_job(session, tenant.id, job_id)
    checkpoints = job_service.list_checkpoints(session, job_id)
    best = job_service.best_checkpoint_step([(c.step, c.metrics) for c in checkpoints])
    return CheckpointList(data=[CheckpointPublic.of(c, best=c.step == best) for c in checkpoints])


@router.get(
    "/{job_id}/webhooks",
    response_model=WebhookDeliveryList,
    summary="The job's webhook deliveries",
    description=(
        "One per time the job ended (a resumed job can end again), oldest first: `status` "
        "(`pending`, `delivered`, `failed`), `attempts`, the receiver's last `response_status` "
        "or `last_error`, `next_attempt_at` while pending, and the `payload` as sent. A 2xx "
        "answer delivers it; anything else is retried after 30 s, doubling up to an hour, until "
        "MOLA_WEBHOOK_MAX_ATTEMPTS attempts failed. Empty for a job without a `webhook_url`."
    ),
)
def list_webhook_deliveries(job_id: Text, tenant: CurrentTenant, session: SessionDep) -> WebhookDeliveryList:
    job_service.get_job(session, tenant.id, job_id)
    return WebhookDeliveryList(data=[WebhookDeliveryPublic.of(d) for d in webhooks.list_deliveries(session, job_id)])


@router.get(
    "/{job_id}/analysis",
    response_model=JobAnalysis,
    summary="How a finished MoLA job's adapter uses its experts",
    description=(
        "Computed when a MoLA job finishes (succeeded, or cancelled after some training) by routing "
        "the first 256 validation examples (training examples without a validation set) through "
        "the adapter: per layer and per module, each expert's share of the tokens and mean routing "
        "weight, how uneven the load is (`max_load`, `min_load`, `balance_loss`) and how different "
        "the experts' updates are (`relative_distance`, the paper's redundancy). 409 until the job "
        "finishes; 404 for a LoRA job, a job without an adapter, or one finished before analyses "
        "were recorded."
    ),
    responses={409: {"model": ErrorResponse}},
)
def get_analysis(job_id: Text, tenant: CurrentTenant, session: SessionDep) -> JobAnalysis:
    return JobAnalysis.of(job_id, job_service.get_analysis(session, tenant.id, job_id))


@router.get(
    "/{job_id}/checkpoints/{step}/adapter",
    summary="Download the adapter of one checkpoint",
    description=(
        "The adapter as it was at that checkpoint, packed like the final one (`adapter_config.json`, "
        "`adapter_model.safetensors`, a `README.md` naming the step): to keep the checkpoint with "
        "the best validation loss, say. Any job's checkpoint, running ones included; the job "
        "keeps its newest `MOLA_KEEP_CHECKPOINTS` and the one with the lowest `eval_loss`."
    ),
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}, 307: {"description": "redirect to a presigned storage URL"}},
)
def download_checkpoint_adapter(
    job_id: Text,
    step: Annotated[int, Path(ge=0, le=MAX_STEP, description="a step listed by GET /jobs/{id}/checkpoints")],
    tenant: CurrentTenant,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    job_service.get_job(session, tenant.id, job_id)
    key = job_service.checkpoint_adapter_key(job_service.get_checkpoint(session, job_id, step).storage_prefix)
    # Checkpoints written before they carried an archive, or pruned a moment ago.
    if not storage.exists(key):
        raise NotFound(f"the checkpoint at step {step} of job {job_id} has no adapter archive in storage")
    return _send_archive(storage, settings, key, f"{job_id}-step{step}-adapter.tar.gz")
