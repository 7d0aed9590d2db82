"""A queued generation (POST /jobs/{id}/generations), run by a training worker: the job's
adapter archive (its final one, or a checkpoint's) onto its base model
(`mola.generate.attach_adapter`; the base model is kept a while for the next generation,
`worker.base_models`), the prompts dressed as the training rows were, or a dataset's rows
dressed as training dresses them, their completions scored against the rows' own and their
loss measured as the job's evaluation measures it; the completions recorded on the row.

The template is the request's, else the one the adapter records, else (an adapter saved
before adapters recorded it) the one the job's training upload's format implies.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

from service import generations as generation_service
from service import jobs as job_service
from service.db import session_scope
from service.errors import NotFound
from service.models import Dataset, Job
from service.settings import Settings

logger = logging.getLogger(__name__)


def run_generation(generation_id: str, settings: Settings) -> str:
    """"succeeded", "failed", or "skipped" (not queued: a duplicate message, or a generation
    the reconciler gave up; or deleted while it ran)."""
    from worker.runner import Resources

    res = Resources.of(settings)
    with session_scope(res.sessions) as session:
        generation = generation_service.claim(session, generation_id)
        if generation is None:
            logger.info("generation %s is not queued; nothing to do", generation_id)
            return "skipped"
        request = dict(generation.request)
        job = session.get(Job, generation.job_id)
        job_facts = {"id": job.id, "base_model": job.base_model, **_adapter_of(session, job, request.get("step"))}
        dataset = session.get(Dataset, job.dataset_id)
        upload_format = dataset.format if dataset is not None else None
        if request.get("dataset_id") is not None:
            rows_from = session.get(Dataset, request["dataset_id"])
            job_facts["rows_key"] = rows_from.storage_key if rows_from is not None and rows_from.deleted_at is None else None
            # The test loss tokenizes the rows as the job tokenized its validation rows.
            hp = job.spec["hyperparameters"]
            job_facts["tokenized"] = {"cutoff_len": hp["cutoff_len"], "train_on_inputs": hp["train_on_inputs"]}

    work = settings.scratch_dir / generation_id
    try:
        progress = _progress_writer(generation_id, res, settings.metrics_flush_seconds)
        result = _generate(job_facts, upload_format, request, work, res, settings, progress)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong is the generation's answer
        logger.warning("generation %s failed: %s", generation_id, exc, exc_info=True)
        with session_scope(res.sessions) as session:
            recorded = generation_service.finish(session, generation_id, error=f"{type(exc).__name__}: {exc}")
        return "failed" if recorded else "skipped"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with session_scope(res.sessions) as session:
        recorded = generation_service.finish(session, generation_id, result=result)
    logger.info("generation %s of job %s: %d completions in %.1f s", generation_id, job_facts["id"], len(result["completions"]), result["seconds"])
    return "succeeded" if recorded else "skipped"


def _progress_writer(generation_id: str, res: Any, every_seconds: float, clock: Callable[[], float] = time.monotonic) -> Callable[[int, int], None]:
    """``(done, total)`` -> the generation's row, at most once per ``every_seconds`` (the first
    and the last always): a client polling a test set's long generation sees it advance."""
    written_at = -float("inf")

    def write(done: int, total: int) -> None:
        nonlocal written_at
        now = clock()
        if 0 < done < total and now - written_at < every_seconds:
            return
        written_at = now
        try:
            with session_scope(res.sessions) as session:
                generation_service.record_progress(session, generation_id, done, total)
        except Exception:  # noqa: BLE001 - progress is for show; the completions matter
            logger.warning("could not record the progress of generation %s", generation_id, exc_info=True)

    return write


def _adapter_of(session: Any, job: Job, step: int | None) -> dict[str, Any]:
    """``{"adapter_key", "adapter_gone"}``: the storage key of the archive to generate with (the
    job's final adapter, or its checkpoint's at ``step``), or None and why there is none now."""
    if step is None:
        # Resumed since it was asked for: the adapter is being replaced.
        return {"adapter_key": job.adapter_key, "adapter_gone": f"job {job.id} has no adapter now (resumed?); ask again once it finishes"}
    # Pruned since it was asked for: the job keeps its newest checkpoints and its best.
    gone = {"adapter_key": None, "adapter_gone": f"job {job.id} no longer has its checkpoint at step {step} (only the newest and the best are kept)"}
    try:
        checkpoint = job_service.get_checkpoint(session, job.id, step)
    except NotFound:
        return gone
    return {**gone, "adapter_key": job_service.checkpoint_adapter_key(checkpoint.storage_prefix)}


def _generate(
    job: dict[str, Any], upload_format: str | None, request: dict[str, Any], work, res: Any, settings: Settings, progress: Callable[[int, int], None]
) -> dict[str, Any]:
    import torch

    from mola.data import TEMPLATE_OF_FORMAT
    from mola.generate import attach_adapter, prompt
    from mola.models import bf16_by_default
    from worker.base_models import BASE_MODELS

    if job["adapter_key"] is None:
        raise RuntimeError(job["adapter_gone"])
    archive = res.storage.get_file(job["adapter_key"], work / "adapter.tar.gz")
    rows_path = None
    if request.get("dataset_id") is not None:
        if job["rows_key"] is None:
            raise RuntimeError(f"dataset {request['dataset_id']} was deleted before its rows were completed")
        rows_path = res.storage.get_file(job["rows_key"], work / "rows.jsonl")
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if bf16_by_default(device) else None
    keep = settings.generation_keep_base_seconds
    with BASE_MODELS.lend(job["base_model"], device, dtype, keep) as (base, tokenizer), attach_adapter(archive, base, tokenizer, job["base_model"], dtype) as adapter:
        if rows_path is not None:
            return _complete_rows(adapter, rows_path, request, job["tokenized"], progress)
        template = request.get("template") or adapter.prompt_template or TEMPLATE_OF_FORMAT.get(upload_format or "", "alpaca")
        if request.get("input") is not None and template != "alpaca":
            raise ValueError(f"an input goes with the alpaca template, and the job's training rows were {template}")
        prompts = [prompt(text, adapter.tokenizer, template, request.get("input")) for text in request["prompts"]]
        progress(0, len(prompts))
        started = time.perf_counter()
        texts = _completions(adapter, prompts, request, progress)
        seconds = time.perf_counter() - started
    return {
        "template": template,
        "completions": [{"prompt": rendered, "text": text} for (rendered, _), text in zip(prompts, texts)],
        "seconds": seconds,
    }


def _complete_rows(adapter: Any, rows_path: Any, request: dict[str, Any], tokenized: dict[str, Any], progress: Callable[[int, int], None]) -> dict[str, Any]:
    """A dataset's first ``request["rows"]`` rows (all by default) completed, as `mola generate
    --data` does on a machine of one's own, and scored against their own completions; with
    their loss, tokenized as ``tokenized`` says (the job's cutoff_len and train_on_inputs)."""
    from mola.data import read_records
    from mola.evaluate import records_loss, score_generations
    from mola.generate import reference_rows

    dataset_id = request["dataset_id"]
    records = read_records(rows_path)[: request.get("rows")]
    rows = reference_rows(records, adapter.tokenizer)
    if not rows:
        raise ValueError(f"none of the first {len(records)} rows of dataset {dataset_id} has a prompt to complete (text rows have none)")
    progress(0, len(rows))
    started = time.perf_counter()
    texts = _completions(adapter, [(row.prompt, row.special) for row in rows], request, progress, names=[f"row {row.row} of dataset {dataset_id}" for row in rows])
    loss = records_loss(adapter.model, adapter.tokenizer, records, **tokenized)
    seconds = time.perf_counter() - started
    scores = score_generations(texts, [row.reference for row in rows])
    return {
        "template": None,
        "completions": [{"prompt": row.prompt, "text": text, "row": row.row, "reference": row.reference} for row, text in zip(rows, texts)],
        "scores": {**scores, "without_prompt": len(records) - len(rows), **loss},
        "seconds": seconds,
    }


def _completions(
    adapter: Any, prompts: list[tuple[str, bool]], request: dict[str, Any], progress: Callable[[int, int], None], names: list[str] | None = None
) -> list[str]:
    from mola.generate import generate

    return generate(
        adapter.model,
        adapter.tokenizer,
        prompts,
        max_new_tokens=request["max_new_tokens"],
        temperature=request["temperature"],
        top_p=request["top_p"],
        seed=request.get("seed"),
        names=names,
        on_progress=progress,
    )
