"""A queued generation (POST /jobs/{id}/generations), run by a training worker: the job's
adapter archive onto its base model (`mola.generate.attach_adapter`; the base model is kept
a while for the next generation, `worker.base_models`), the prompts dressed as the training
rows were, the completions recorded on the row.

The template is the request's, else the one the adapter records, else (an adapter saved
before adapters recorded it) the one the job's training upload's format implies.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from service import generations as generation_service
from service.db import session_scope
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
        job_facts = {"id": job.id, "base_model": job.base_model, "adapter_key": job.adapter_key}
        dataset = session.get(Dataset, job.dataset_id)
        upload_format = dataset.format if dataset is not None else None

    work = settings.scratch_dir / generation_id
    try:
        result = _generate(job_facts, upload_format, request, work, res, settings)
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


def _generate(job: dict[str, Any], upload_format: str | None, request: dict[str, Any], work, res: Any, settings: Settings) -> dict[str, Any]:
    import torch

    from mola.data import TEMPLATE_OF_FORMAT
    from mola.generate import attach_adapter, generate, prompt
    from mola.models import bf16_by_default
    from worker.base_models import BASE_MODELS

    if job["adapter_key"] is None:  # resumed since it was asked for: the adapter is being replaced
        raise RuntimeError(f"job {job['id']} has no adapter now (resumed?); ask again once it finishes")
    archive = res.storage.get_file(job["adapter_key"], work / "adapter.tar.gz")
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if bf16_by_default(device) else None
    keep = settings.generation_keep_base_seconds
    with BASE_MODELS.lend(job["base_model"], device, dtype, keep) as (base, tokenizer), attach_adapter(archive, base, tokenizer, job["base_model"], dtype) as adapter:
        template = request.get("template") or adapter.prompt_template or TEMPLATE_OF_FORMAT.get(upload_format or "", "alpaca")
        if request.get("input") is not None and template != "alpaca":
            raise ValueError(f"an input goes with the alpaca template, and the job's training rows were {template}")
        prompts = [prompt(text, adapter.tokenizer, template, request.get("input")) for text in request["prompts"]]
        started = time.perf_counter()
        texts = generate(
            adapter.model,
            adapter.tokenizer,
            prompts,
            max_new_tokens=request["max_new_tokens"],
            temperature=request["temperature"],
            top_p=request["top_p"],
            seed=request.get("seed"),
        )
        seconds = time.perf_counter() - started
    return {
        "template": template,
        "completions": [{"prompt": rendered, "text": text} for (rendered, _), text in zip(prompts, texts)],
        "seconds": seconds,
    }
