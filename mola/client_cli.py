"""Client commands of the `mola` CLI: talk to a running service over HTTP.

    mola datasets upload train.jsonl
    mola jobs create --model tiny-llama --dataset ds_... --allocation 2468 --max-steps 50 --follow
    mola jobs follow job_...
    mola jobs download job_... --extract adapter/

The server and key come from `--url`/`--api-key` or `MOLA_URL`/`MOLA_API_KEY`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mola.client import Dataset, Generation, GenerationTimeout, Job, JobComparison, Metric, MolaAPIError, MolaClient, QueuePlace

# `jobs create --allocation A --allocation B ...`: as many jobs as `jobs compare` (GET /jobs/compare) takes.
MAX_SWEEP = 20

HYPERPARAMETER_FLAGS = {
    # flag: (hyperparameter, type)
    "epochs": float,
    "max_steps": int,
    "learning_rate": float,
    "batch_size": int,
    "micro_batch_size": int,
    "cutoff_len": int,
    "rank": int,
    "alpha": float,
    "dropout": float,
    "aux_loss_coef": float,
    "seed": int,
    "eval_every": int,
    "checkpoint_every": int,
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server URL (default: $MOLA_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: $MOLA_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer as it sent it")


def _client(args: argparse.Namespace) -> MolaClient:
    return MolaClient(args.url, args.api_key)


def _print_json(raw: Any) -> None:
    """The API's answer, values untouched (pretty-printed)."""
    print(json.dumps(raw, indent=2))


def _text_out(args: argparse.Namespace) -> TextIO:
    """Where messages for a person go: stderr when stdout carries --json."""
    return sys.stderr if args.json else sys.stdout


# ---- flag values (argparse types: a bad value is a usage error naming its flag) -------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the API accepts")


def _json_value(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _allocation_arg(text: str) -> Any:
    """--allocation: the compact forms ('2468', '2,4,6,8', 'inverted_triangle:5') are sent as
    strings for the server to read; JSON (a list, a preset object) is sent as JSON."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("empty: give e.g. 2468, 2,4,6,8 or [2, 2, 4, 4]")
    return _json_value(text) if text[0] in "[{" else text


def _top_k_arg(text: str) -> int | list[Any]:
    """--top-k: a whole number, or a JSON list with one per layer (the API refuses "2")."""
    value = _json_value(text.strip()) if text.strip() else None
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise argparse.ArgumentTypeError(f"expects a whole number or a JSON list with one per layer, got {text!r}")
    return value


def _hp_arg(item: str) -> tuple[str, Any]:
    """--hp KEY=VALUE: the value is read as JSON (`warmup_steps=0`, `bf16=false`), or taken as a
    string when it is a plain word (`lr_schedule=cosine`)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expects KEY=VALUE, got {item!r}")
    if _is_plain_string(text):
        return key, text
    try:
        return key, _json_value(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{key}: {exc}") from None


def _is_plain_string(text: str) -> bool:
    """A value meant as a string: not JSON, and not JSON broken off (`[1, 2`, which would
    otherwise travel as the string "[1, 2")."""
    if text.strip()[:1] in ("[", "{", '"'):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return True
    return False


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    hp: dict[str, Any] = dict(args.hp or [])
    for name in HYPERPARAMETER_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            hp[name] = value
    if args.target_modules:
        hp["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    return hp


def _id_arg(text: str) -> str:
    """A dataset or job id: refused here when it cannot be one (empty: `mola jobs show "$ID"`
    with ID unset), rather than as a traceback from the client."""
    if text.strip() in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"not an id: {text!r}")
    return text.strip()


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within [low, high], the range the API accepts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            within = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {within}, got {value}")
        return value

    return parse


# ---- text output -----------------------------------------------------------------------------
def _adapter_shape(job: Job) -> str:
    """What the job trains, in a few words: experts per layer, or a LoRA's rank."""
    if job.method == "lora":
        return f"LoRA rank {job.hyperparameters.get('rank')}, alpha {job.hyperparameters.get('alpha')}"
    return f"experts per layer {job.allocation}, top-k {job.top_k}"


def _load_hint(method: str, folder: Path) -> str:
    if method == "lora":  # a plain peft adapter: mola's loader expects MoLA weights
        return f"peft.PeftModel.from_pretrained(base, '{folder}')"
    return f"mola.load_mola_model(base, '{folder}')"


def _job_line(job: Job) -> str:
    p = job.progress
    steps = f"{p.step}/{p.total_steps}" if p.total_steps else f"{p.step}"
    label = f"  {job.suffix}" if job.suffix else ""
    return f"{job.id}  {job.status:<9}  {job.method:<4}  {job.base_model:<24}  step {steps:<11}  {job.created_at:%Y-%m-%d %H:%M}{label}"


def _when(moment: Any) -> str:
    """A timestamp as `datasets show` and `keys list` write it: to the second, in UTC."""
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment is not None else "-"


def _count(n: Any, noun: str) -> str:
    """``1 row``, ``2 rows``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _data_line(stats: dict[str, Any]) -> str:
    """What tokenizing a split kept, e.g. "200 records, 190 examples; 16 cut and 10 dropped (no
    trainable token left) at cutoff_len 512"."""
    line = f"{stats.get('records')} records, {stats.get('examples')} examples"
    if stats.get("over_cutoff") or stats.get("dropped_at_cutoff"):
        line += f"; {stats.get('over_cutoff')} cut and {stats.get('dropped_at_cutoff')} dropped (no trainable token left)"
    return line + f" at cutoff_len {stats.get('cutoff_len')}"


def _place_line(place: QueuePlace) -> str:
    """Where a queued job or generation stands, in words."""
    ahead = f"{place.ahead} ahead of it, {place.running} running"
    if place.workers == 0:
        return f"{ahead}; no worker consumes queue {place.name}: nothing runs it until one starts (`mola queues`)"
    return f"{ahead}; {place.workers} worker{'s' if place.workers > 1 else ''} on queue {place.name}"


def _warn_without_workers(place: QueuePlace | None, what: str) -> None:
    if place is not None and place.workers == 0:
        waits = "wait" if what.endswith("s") else "waits"
        print(f"warning: no worker consumes queue {place.name}: the {what} {waits} until one starts (`mola queues`)", file=sys.stderr)


def _show_job(job: Job) -> None:
    print(f"id:          {job.id}")
    print(f"status:      {job.status}{' (cancel requested)' if job.cancel_requested and not job.done else ''}")
    if job.queue is not None:
        print(f"waiting:     {_place_line(job.queue)}")
    print(f"base model:  {job.base_model} ({job.method})")
    print(f"dataset:     {job.dataset_id}" + (f", validation {job.validation_dataset_id}" if job.validation_dataset_id else ""))
    if job.allocation:
        print(f"allocation:  {job.allocation} (top-k {job.top_k})")
    if job.adapter_parameters is not None:
        print(f"trainable:   {job.adapter_parameters:,} adapter parameters")
    p = job.progress
    if p.total_steps:
        eta = f", ETA {p.eta_seconds:.0f} s" if p.eta_seconds is not None else ""
        print(f"progress:    step {p.step}/{p.total_steps}, epoch {p.epoch or 0:.2f}{eta}")
    for i, (split, stats) in enumerate((job.data or {}).items()):  # what the run tokenized
        print(f"{'data:' if i == 0 else '':<13}{split}: {_data_line(stats)}")
    if job.suffix:
        print(f"label:       {job.suffix}")
    if job.webhook_url:
        print(f"webhook:     {job.webhook_url} (deliveries: `mola jobs webhooks {job.id}`)")
    print(f"created:     {_when(job.created_at)}")
    if job.started_at:
        print(f"started:     {_when(job.started_at)}")
    if job.finished_at:
        print(f"finished:    {_when(job.finished_at)}")
    if job.error:
        print(f"error:       {job.error}")
    if job.result and job.result.get("train"):
        loss = job.result["train"].get("loss")
        print(f"final loss:  {loss:.4f}" if isinstance(loss, float) else f"final loss:  {loss}")
    evaluation = (job.result or {}).get("eval") or {}
    if isinstance(evaluation.get("eval_loss"), float):
        print(f"eval loss:   {evaluation['eval_loss']:.4f}")
    if isinstance(evaluation.get("eval_exact_match"), float):  # eval_generate_rows
        answers = evaluation.get("eval_answer_accuracy")
        answers = f", answers right {answers:.1%}" if isinstance(answers, float) else ""
        print(f"generated:   {evaluation['eval_exact_match']:.1%} exact on {evaluation.get('eval_generated')} validation rows{answers}")
    if job.adapter_available:
        adapter = f"available (`mola jobs download {job.id} --extract DIR`)"
    else:  # a job that ended without one will never have one
        adapter = "none" if job.done else "not yet"
    print(f"adapter:     {adapter}")
    if job.method == "mola" and job.adapter_available and job.done:
        print(f"experts:     routing and redundancy per layer: `mola jobs analysis {job.id}`")
    if job.status in ("failed", "cancelled"):
        print(f"resume:      {_resume_advice(job)}")


def _resume_advice(job: Job) -> str:
    """What resuming a failed or cancelled job takes, by the cause of its failure."""
    command = f"`mola jobs resume {job.id}`"
    kind = job.error_kind if job.status == "failed" else None
    if kind in ("data", "hyperparameters"):
        return "no: a resume would fail the same way; create a new job with the cause changed"
    if kind == "out_of_memory":
        micro_batch = int(job.hyperparameters.get("micro_batch_size") or 1)
        if micro_batch == 1:
            return f"from its newest checkpoint with less memory: `mola jobs resume {job.id} --hp gradient_checkpointing=true`"
        return f"from its newest checkpoint with less memory: `mola jobs resume {job.id} --micro-batch-size {micro_batch // 2}` (or --hp gradient_checkpointing=true)"
    if kind == "diverged":
        return (
            f"from the checkpoint before it without bf16: `mola jobs resume {job.id} --hp bf16=false` "
            "(it may diverge again: a new job with a lower learning_rate is the surer way)"
        )
    if kind == "evaluation":
        return f"with other eval_generate_rows: `mola jobs resume {job.id} --hp eval_generate_rows=null` (null: no generated evaluation)"
    after = {
        "base_model": " once the server can load its base model",
        "server_limit": " once the operator raises MOLA_MAX_ADAPTER_PARAMS",
        "abandoned": " after checking the worker logs (its worker stopped without finishing it on every attempt)",
    }.get(kind or "", "")
    return f"from its newest checkpoint{after}: {command}"


def _show_dataset(dataset: Dataset) -> None:
    report = dataset.report
    formats = ", ".join(f"{name} {count}" for name, count in (report.get("formats") or {}).items())
    print(f"id:          {dataset.id}")
    print(f"file:        {dataset.filename} ({dataset.size_bytes} bytes, sha256 {dataset.sha256[:16]}...)")
    print(f"rows:        {report.get('valid_rows', dataset.rows)} valid of {dataset.rows}, format {dataset.format or '-'}" + (f" ({formats})" if formats else ""))
    print(f"created:     {_when(dataset.created_at)}")
    if report.get("empty_targets"):
        print(f"warning:     {_count(report['empty_targets'], 'row')} with an empty completion (output, completion or final reply): they teach to end the answer at once")
    for error in report.get("errors") or []:
        print(f"  line {error.get('line')}: {error.get('message')}")
    counts = dataset.token_counts or {}
    print(f"tokens:      {counts.get('status') or 'not counted'}" + (f": {counts['error']}" if counts.get("error") else ""))
    for model, c in (counts.get("models") or {}).items():
        dropped = c.get("dropped_at_cutoff")
        # Rows cut before any trainable token are left out of training; when that is every row,
        # a job at that cutoff_len is refused.
        lost = f", {dropped} of them with no trainable token left (a job at that cutoff skips them)" if dropped else ""
        mean = c.get("mean_tokens")
        mean = f"{mean:.1f}" if isinstance(mean, float) else mean  # 2.6666666666666665 read as noise
        print(
            f"  {model}: {c.get('total_tokens')} tokens, mean {mean}, max {c.get('max_tokens')}; "
            f"{_count(c.get('over_cutoff'), 'row')} over cutoff_len {c.get('cutoff_len')}{lost}"
        )
        for row in c.get("unrenderable") or []:  # a job on this model is refused until they go
            print(f"    line {row.get('line')}: {row.get('message')}")
    for model, stats in (dataset.token_stats or {}).items():  # measured by jobs that trained on it
        print(f"  {model} (from a job): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))


# ---- datasets --------------------------------------------------------------------------------
def cmd_datasets_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            dataset = client.upload_dataset(args.file)
        except MolaAPIError as exc:
            report = (exc.body or {}).get("report") if isinstance(exc.body, dict) else None
            if report and not args.json:
                print(f"error: {exc.detail}", file=sys.stderr)
                for error in report.get("errors", []):
                    print(f"  line {error.get('line')}: {error.get('message')}", file=sys.stderr)
                return 1
            raise
    if args.json:
        _print_json(dataset.raw)
    else:
        print(f"{dataset.id}  {dataset.filename}: {_count(dataset.rows, 'row')}, format {dataset.format}")
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_datasets(limit=args.limit, after=args.after)
    if args.json:
        _print_json(page.raw)
        return 0
    for d in page:
        print(f"{d.id}  {d.filename:<30}  {d.rows:>7} {'row ' if d.rows == 1 else 'rows'}  {d.format or '-':<10}  {d.created_at:%Y-%m-%d %H:%M}")
    if page.has_more:
        print(f"(more: --after {page.cursor})")
    return 0


def cmd_datasets_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        dataset = client.get_dataset(args.id)
    _print_json(dataset.raw) if args.json else _show_dataset(dataset)
    return 0


def cmd_datasets_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        answer = client.delete_dataset(args.id)
    _print_json(answer) if args.json else print(f"deleted {args.id}")
    return 0


# ---- jobs ------------------------------------------------------------------------------------
def cmd_jobs_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_job(args.id)
    # The API answers 204 without a body: --json prints what it would have said.
    _print_json({"id": args.id, "deleted": True}) if args.json else print(f"deleted {args.id}")
    return 0


def cmd_jobs_create(args: argparse.Namespace) -> int:
    """One job, or one per --allocation (a sweep): every allocation is checked by the server
    (POST /jobs/plan) before the first job is created, so a bad one creates none."""
    allocations = args.allocation or [None]
    if len(allocations) > MAX_SWEEP:
        print(f"error: at most {MAX_SWEEP} --allocation values (jobs compare takes {MAX_SWEEP}), got {len(allocations)}", file=sys.stderr)
        return 2
    base = {
        "base_model": args.model,
        "dataset_id": args.dataset,
        "method": args.method,
        "top_k": args.top_k,
        "hyperparameters": _hyperparameters(args) or None,
        "validation_dataset_id": args.validation_dataset,
        "suffix": args.suffix,
        "webhook_url": args.webhook_url,
    }
    requests = [{**base, "allocation": allocation} for allocation in allocations]
    if args.dry_run:
        if args.follow or args.idempotency_key:
            print("error: --dry-run creates nothing: it takes neither --follow nor --idempotency-key", file=sys.stderr)
            return 2
        with _client(args) as client:
            plans = [client.plan_job(**request) for request in requests]
        if args.json:
            _print_json(plans[0] if len(plans) == 1 else plans)
        else:
            print("\n\n".join(_plan_text(plan) for plan in plans))
        return 0
    with _client(args) as client:
        if len(requests) > 1:
            for request in requests:
                client.plan_job(**request)
        jobs = _create_jobs(client, requests, args.idempotency_key, quiet=args.json)
        if args.json:
            _print_json(jobs[0].raw if len(jobs) == 1 else [job.raw for job in jobs])
        _warn_without_workers(jobs[-1].queue, "job" if len(jobs) == 1 else "jobs")
        if len(jobs) > 1 and not args.follow:
            print(f"compare them: mola jobs compare {' '.join(job.id for job in jobs)}", file=_text_out(args))
        if not args.follow:
            return 0
        # With --json, stdout keeps the one JSON answer above: progress goes to stderr.
        codes = [_follow(client, job.id, _text_out(args)) for job in jobs]
        if len(jobs) > 1 and not args.json:
            print()
            _print_comparison(client.compare_jobs([job.id for job in jobs]))
    return max(codes)


def _create_jobs(client: MolaClient, requests: list[dict[str, Any]], idempotency_key: str | None, quiet: bool) -> list[Job]:
    """Create the jobs of ``requests`` in order, a line each (unless ``quiet``). A sweep's jobs
    get ``KEY/1``, ``KEY/2``, ... as their idempotency keys, so the same command retried
    creates none twice. When one fails, the jobs already created are named on stderr."""
    jobs: list[Job] = []
    for number, request in enumerate(requests, 1):
        key = idempotency_key if idempotency_key is None or len(requests) == 1 else f"{idempotency_key}/{number}"
        try:
            job = client.create_job(**request, idempotency_key=key)
        except MolaAPIError:
            if jobs:
                print(f"created before the error: {' '.join(job.id for job in jobs)}", file=sys.stderr)
            raise
        jobs.append(job)
        if quiet:
            continue
        if job.replayed:  # the server answered 200 with the job this key created before
            print(f"{job.id} was created earlier with this --idempotency-key (now {job.status}); no new job: "
                  f"{job.method} on {job.base_model}, {_adapter_shape(job)}")
        else:
            print(f"created {job.id}: {job.method} on {job.base_model}, {_adapter_shape(job)}")
    return jobs


def _plan_text(plan: dict[str, Any]) -> str:
    """`jobs create --dry-run`: the plan for a person."""
    shape = (
        f"experts per layer {plan['allocation']}, top-k {plan['top_k']}"
        if plan["method"] == "mola"
        else f"LoRA rank {plan['hyperparameters'].get('rank')}"
    )
    size = "" if plan.get("adapter_parameters") is None else f"; {plan['adapter_parameters']:,} adapter parameters"
    lines = [f"plan: {plan['method']} on {plan['base_model']}, {shape}{size}"]
    for split in ("train", "validation"):
        data = plan["data"].get(split)
        if data is None:
            continue
        counted = [f"{data[key]} {word}" for key, word in (("over_cutoff", "cut"), ("dropped_at_cutoff", "dropped")) if data[key] is not None]
        cut = f" ({', '.join(counted)} at cutoff_len {plan['hyperparameters']['cutoff_len']})" if counted else ""
        examples = f"{data['examples']} examples" if data["exact"] else f"at most {data['examples']} examples"
        lines.append(f"{split + ':':<12}{data['dataset_id']}: {data['rows']} rows, {examples}{cut}")
    steps = plan["schedule"]
    if steps["total_steps"] is not None:
        about = "" if steps["exact"] else "at most "
        lines.append(
            f"{'steps:':<12}{about}{steps['total_steps']} ({steps['steps_per_epoch']} per epoch, {steps['epochs']:g} epochs), "
            f"warm-up {steps['warmup_steps']}, {steps['micro_batches_per_step']} micro-batches per step"
        )
    lora = plan.get("equal_size_lora")
    if lora:
        lines.append(f"{'baseline:':<12}a plain LoRA of about this size: --method lora --rank {lora['rank']} ({lora['adapter_parameters']:,} adapter parameters)")
    lines += [f"{'warning:':<12}{warning}" for warning in plan["warnings"]]
    lines.append("nothing was created: run it again without --dry-run to create the job")
    return "\n".join(lines)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_jobs(status=args.status, limit=args.limit, after=args.after, dataset_id=args.dataset, base_model=args.model, method=args.method)
    if args.json:
        _print_json(page.raw)
        return 0
    for job in page:
        print(_job_line(job))
    if page.has_more:
        print(f"(more: --after {page.cursor})")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.id)
    _print_json(job.raw) if args.json else _show_job(job)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.id)
    if args.json:
        _print_json(job.raw)
    else:
        print(f"{job.id}: {job.status}" + (" (stops at its next step)" if job.status == "running" else ""))
    return 0


def cmd_jobs_resume(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.resume_job(args.id, _hyperparameters(args) or None)
        if args.json:
            _print_json(job.raw)
        else:
            where = f"from its checkpoint at step {job.progress.step}" if job.progress.step else "from the start (no checkpoint)"
            print(f"{job.id}: {job.status}, resuming {where}")
        if args.follow:
            return _follow(client, job.id, _text_out(args))
    return 0


# The columns of `jobs metrics --csv`, in this order; any other metric follows, by name.
CSV_COLUMNS = (
    "step", "kind", "epoch", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_memory_mb",
    "eval_loss", "eval_exact_match", "eval_answer_accuracy",
)  # fmt: skip


def _write_metrics_csv(metrics: list[Metric], out: TextIO) -> None:
    """One row per step and kind, for a spreadsheet or pandas.read_csv; a metric a row lacks is empty."""
    names = {name for m in metrics for name in m.metrics} - {"kind", "step", "total_steps"}
    columns = [c for c in CSV_COLUMNS if c in ("step", "kind") or c in names] + sorted(names - set(CSV_COLUMNS))
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for m in metrics:
        writer.writerow({**m.metrics, "step": m.step, "kind": m.kind})


def cmd_jobs_metrics(args: argparse.Namespace) -> int:
    if args.csv:
        if args.json:
            print("error: --csv and --json are two formats: give one", file=sys.stderr)
            return 2
        with _client(args) as client:
            metrics = client.all_metrics(args.id, kind=args.kind, after_step=args.after_step)
        _write_metrics_csv(metrics, sys.stdout)
        return 0
    with _client(args) as client:
        page = client.metrics(args.id, after_step=args.after_step, limit=args.limit, kind=args.kind)
    if args.json:
        _print_json(page.raw)
        return 0
    for m in page:
        values = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in m.metrics.items()
            if k in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_exact_match", "eval_answer_accuracy", "epoch")
        )
        print(f"step {m.step:>6}  {m.kind:<5}  {values}")
    if page.has_more:
        print(f"(more: --after-step {page.cursor})")
    return 0


def cmd_jobs_checkpoints(args: argparse.Namespace) -> int:
    with _client(args) as client:
        checkpoints = client.checkpoints(args.id)
    if args.json:
        _print_json(checkpoints.raw)
        return 0
    for c in checkpoints:
        scores = ("loss", "eval_loss", "eval_exact_match", "eval_answer_accuracy")
        losses = "".join(f"  {k}={c.metrics[k]:.4f}" for k in scores if isinstance(c.metrics.get(k), float))
        print(f"step {c.step:>6}  {c.size_bytes / 1e6:8.2f} MB  {c.created_at:%Y-%m-%d %H:%M:%S}{losses}" + ("  (best eval_loss)" if c.best else ""))
    if checkpoints:
        print(f"(an adapter: mola jobs download {args.id} --step STEP --extract DIR)")
    return 0


def _shares(values: list[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.2f}" for v in values)


def _number(value: Any, spec: str = ".4f") -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, spec)


def cmd_jobs_analysis(args: argparse.Namespace) -> int:
    with _client(args) as client:
        analysis = client.analysis(args.id)
    if args.json:
        _print_json(analysis.raw)
        return 0
    if analysis.status != "ready":
        print(f"the expert analysis of {args.id} failed: {analysis.error}")
        return 0
    print(f"routing of the first {analysis.examples} {analysis.split} examples ({analysis.tokens:,} tokens)")
    print(
        "busiest/idlest: an expert's share of the tokens over the fair share top-k/experts (1 = balanced; a layer: "
        "the extremes over its modules); distance/norm: how different the experts are"
    )
    rows = [(f"layer {row['layer']}", row) for row in analysis.layers]
    if args.modules:
        rows = list(analysis.modules.items())
    width = max(len(name) for name, _ in rows) if rows else 5
    print(f"{'':<{width}}  experts  top-k  busiest  idlest  distance/norm  share of tokens per expert")
    for name, row in rows:
        print(
            f"{name:<{width}}  {row['num_experts']:>7}  {row['top_k']:>5}  {_number(row['max_load'], '.2f'):>7}  {_number(row['min_load'], '.2f'):>6}  "
            f"{_number(row['relative_distance'], '.2f'):>13}  {_shares(row['selection_share'])}"
        )
    return 0


def _trained(row: dict[str, Any]) -> str:
    """What a compared job trains, in a word or two: ``2468 top-2``, ``LoRA r8``."""
    if row["method"] == "lora":
        return f"LoRA r{row['hyperparameters'].get('rank')}"
    spec = row["allocation_spec"]
    if isinstance(spec, dict):
        spec = f"{spec.get('preset')} ~{spec.get('average')}"
    elif not isinstance(spec, str):
        spec = ",".join(str(n) for n in row["allocation"] or [])
    top_k = set(row["top_k"] or [])
    return f"{spec} top-{top_k.pop()}" if len(top_k) == 1 else f"{spec} top-k {row['top_k']}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]


def cmd_jobs_compare(args: argparse.Namespace) -> int:
    """Jobs side by side: one line each, then the settings that differ and the warnings."""
    if bool(args.ids) == bool(args.dataset):
        print("error: give the job ids to compare, or --dataset ID (its newest jobs), not both", file=sys.stderr)
        return 2
    with _client(args) as client:
        ids = args.ids
        if args.dataset:
            ids = [job.id for job in client.list_jobs(dataset_id=args.dataset, limit=MAX_SWEEP)]
            if len(ids) < 2:
                print(f"error: {args.dataset} has {_count(len(ids), 'job')} training on it: nothing to compare", file=sys.stderr)
                return 1
        comparison = client.compare_jobs(ids)
    if args.json:
        _print_json(comparison.raw)
    else:
        _print_comparison(comparison)
    return 0


def _print_comparison(comparison: JobComparison) -> None:
    best_scores = [row["best_eval"] or {} for row in comparison.jobs]
    shown = [name for name in ("eval_exact_match", "eval_answer_accuracy") if any(isinstance(b.get(name), (int, float)) for b in best_scores)]
    header = ["job", "status", "trained", "params", "steps", "lm_loss", "eval_loss", "best eval_loss"]
    header += [{"eval_exact_match": "exact", "eval_answer_accuracy": "answers"}[name] for name in shown] + ["tokens/s", "peak MB", "time"]
    rows = []
    for row, best in zip(comparison.jobs, best_scores):
        steps = f"{row['step']}/{row['total_steps']}" if row["total_steps"] else str(row["step"])
        params = f"{row['adapter_parameters']:,}" if row["adapter_parameters"] is not None else "-"
        best_loss = f"{best['eval_loss']:.4f} @{best['step']}" if best else "-"
        if row["id"] == comparison.best_eval_loss:
            best_loss += " *"
        train, last_eval = row["train"] or {}, row["eval"] or {}
        line = [row["id"], row["status"], _trained(row), params, steps, _number(train.get("lm_loss")), _number(last_eval.get("eval_loss")), best_loss]
        line += [_number(best.get(name), ".1%") for name in shown]
        rows.append(line + [_number(train.get(name), ",.0f") for name in ("tokens_per_s", "peak_memory_mb")] + [_duration(row["seconds"])])
    for text in _table(header, rows):
        print(text)
    if comparison.best_eval_loss:
        print("(* the lowest eval_loss; best eval_loss: the lowest of a job's evaluations, @ its step)")
    if comparison.differences:
        print("differs:")
        for difference in comparison.differences:
            print(f"  {difference['field']}: " + " | ".join("-" if v is None else json.dumps(v) for v in difference["values"]))
    else:
        print("differs: nothing (the same settings)")
    for warning in comparison.warnings:
        print(f"warning: {warning}")


def cmd_jobs_generate(args: argparse.Namespace) -> int:
    """Prompts (or a dataset's rows) completed by the job's adapter on the server: the texts,
    one block per prompt (per row, with its reference, and the scores)."""
    texts = [sys.stdin.read().rstrip("\n") if text == "-" else text for text in args.prompt] if args.prompt else None
    with _client(args) as client:
        generation = client.generate(
            args.id, texts, template=args.template, input=args.input, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, wait=False,
            dataset_id=args.dataset, rows=args.rows, step=args.step,
        )  # fmt: skip
        # Before any wait: with no worker on its queue, waiting would only run into --timeout.
        _warn_without_workers(generation.queue, "generation")
        if not args.no_wait:
            try:
                generation = client.wait_for_generation(args.id, generation, timeout=args.timeout, on_update=_progress_printer())
            except GenerationTimeout as exc:  # it stays on the server: say how to see it or cancel it
                command = f"mola jobs generation {args.id} {exc.generation.id}"
                print(f"error: {exc}; see it with `{command}`, or cancel it with `{command} --delete`", file=sys.stderr)
                return 1
    if args.json:
        _print_json(generation.raw)
        return 0
    if args.no_wait:
        print(f"{generation.id} {generation.status}: see it with mola jobs generation {args.id} {generation.id} (--delete cancels it)")
        return 0
    return _print_generation(generation)


def cmd_jobs_generation(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.delete:
            client.delete_generation(args.id, args.generation_id)
        else:
            generation = client.get_generation(args.id, args.generation_id)
    if args.delete:  # the API answers 204 without a body, as for a job
        _print_json({"id": args.generation_id, "deleted": True}) if args.json else print(f"deleted {args.generation_id}")
        return 0
    if args.json:
        _print_json(generation.raw)
        return 0
    if not generation.done:
        print(f"{generation.id} is {generation.status}" + (f": {_place_line(generation.queue)}" if generation.queue else _progress_words(generation)))
        return 0
    return _print_generation(generation)


def cmd_jobs_generations(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.generations(args.id, limit=args.limit, after=args.after)
    if args.json:
        _print_json(page.raw)
        return 0
    for generation in page:
        print(f"{generation.id}  {generation.status:<9}  {_when(generation.created_at)}  {_asked(generation)}")
    if page.has_more:
        print(f"(more: --after {page.cursor})")
    return 0


def _progress_printer() -> Callable[[Generation], None]:
    """For `wait_for_generation`: a line on stderr each time the generation's progress moves
    (a test set's rows take minutes; stdout keeps only the result)."""
    shown: dict[str, int] | None = None

    def show(generation: Generation) -> None:
        nonlocal shown
        if generation.progress and generation.progress != shown:
            shown = generation.progress
            print(f"{generation.id}{_progress_words(generation)}", file=sys.stderr)

    return show


def _progress_words(generation: Generation) -> str:
    progress = generation.progress
    return f": {progress['done']} of {progress['total']} completed" if progress else ""


def _asked(generation: Generation) -> str:
    """What a generation was asked to complete, in a few words: its first prompt, or its dataset."""
    request = generation.request
    step = f" (checkpoint {request['step']})" if request.get("step") is not None else ""
    if request.get("dataset_id"):
        rows = f"first {request['rows']} rows" if request.get("rows") else "rows"
        scores = generation.scores
        loss = f", loss {scores['loss']:.4f}" if scores and scores.get("loss") is not None else ""
        scored = f": {scores['exact_match']:.1%} exact{loss}" if scores else ""
        return f"{rows} of {request['dataset_id']}{step}{scored}"
    prompts = request.get("prompts") or [""]
    more = f" (+{len(prompts) - 1} more)" if len(prompts) > 1 else ""
    first = prompts[0].replace("\n", " ")
    first = first if len(first) <= 40 else first[:39] + "…"
    return f"{first!r}{more}{step}"


def _print_generation(generation: Generation) -> int:
    from mola.cli import scored_row, scores_line

    if generation.status == "failed":
        print(f"generation {generation.id} failed: {generation.error}", file=sys.stderr)
        return 1
    if generation.scores is not None:  # a dataset's rows
        for completion in generation.completions or []:
            print(f"### row {completion['row']}\n{scored_row(completion['prompt'], completion['reference'], completion['text'])}")
        left_out = generation.scores.get("without_prompt")
        print(f"\n{scores_line(generation.scores)}" + (f" ({left_out} without a prompt left out)" if left_out else ""))
        return 0
    for i, text in enumerate(generation.texts):
        if len(generation.texts) > 1:
            print(f"### {i + 1}")
        print(text)
    return 0


def cmd_jobs_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.output == "-":
            return _download_to_stdout(client, args.id, args.step)
        if args.extract:
            method = client.get_job(args.id).method  # the loader to suggest depends on it
            path = client.download_adapter(args.id, args.extract, extract=True, step=args.step)
            print(f"adapter extracted to {path}/ (load it with {_load_hint(method, path)})", file=_text_out(args))
        else:
            default = f"{args.id}-adapter.tar.gz" if args.step is None else f"{args.id}-step{args.step}-adapter.tar.gz"
            path = client.download_adapter(args.id, args.output or default, step=args.step)
            print(f"saved {path}", file=_text_out(args))
        print(f"try it: mola generate {path} --prompt '...'", file=_text_out(args))
    return 0


def _download_to_stdout(client: MolaClient, job_id: str, step: int | None = None) -> int:
    """`-o -`: the archive's bytes on stdout, for a pipe (`| tar xz`) or a redirection."""
    if sys.stdout.isatty():
        print("error: -o - writes a binary archive: redirect stdout to a file or a pipe", file=sys.stderr)
        return 2
    sys.stdout.flush()
    client.write_adapter(job_id, sys.stdout.buffer, step=step)
    sys.stdout.buffer.flush()
    return 0


def cmd_jobs_follow(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, args.id, _text_out(args), print_final_json=args.json)


def _follow(client: MolaClient, job_id: str, out: TextIO, print_final_json: bool = False) -> int:
    """A progress bar (on stderr) over the job's events until it ends, then its final status on
    ``out``; exit code 0 when it succeeded. ``print_final_json``: print the job's last state as
    the API sent it. The bar is drawn at the first event, so a job that does not exist (404)
    draws none."""
    bar, job, end = None, None, {}
    try:
        for event, data in client.events(job_id):
            if bar is None:
                bar = _progress_bar(job_id)
            if event == "job":
                job = data
                _show_job_progress(bar, data)
            elif event == "metric":
                _show_metric(bar, data)
            elif event == "end":
                end = data
    except KeyboardInterrupt:
        print(f"stopped following {job_id} (the job goes on; `mola jobs cancel {job_id}` stops it)", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    status, error = end.get("status"), end.get("error")
    print(f"{job_id}: {status}" + (f": {error}" if error else ""), file=out)
    if print_final_json and job is not None:
        _print_json(job.raw)
    return 0 if status == "succeeded" else 1


def _progress_bar(job_id: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=None, unit="step", desc=job_id, dynamic_ncols=True, file=sys.stderr)


def _show_job_progress(bar: Any, job: Job) -> None:
    if job.progress.total_steps and bar.total != job.progress.total_steps:
        bar.total = job.progress.total_steps
        bar.refresh()
    if job.progress.step > bar.n:
        bar.update(job.progress.step - bar.n)
    bar.set_description(f"{job.id} {job.status}")


def _show_metric(bar: Any, metric: Metric) -> None:
    if metric.step > bar.n:
        bar.update(metric.step - bar.n)
    shown = {k: f"{v:.4g}" for k, v in metric.metrics.items() if k in ("loss", "eval_loss") and isinstance(v, float)}
    if shown:
        bar.set_postfix(shown, refresh=False)


def cmd_jobs_webhooks(args: argparse.Namespace) -> int:
    """The job's webhook deliveries, one line each."""
    with _client(args) as client:
        deliveries = client.webhook_deliveries(args.id)
    if args.json:
        _print_json(deliveries.raw)
        return 0
    if not deliveries:
        print("no webhook deliveries (a job gets one each time it ends, when it has a --webhook-url)")
    for d in deliveries:
        attempts = _count(d.attempts, "attempt")
        if d.status == "delivered":
            state = f"delivered {_when(d.delivered_at)} ({attempts}, answered {d.response_status})"
        elif d.status == "pending":
            state = f"pending, next attempt {_when(d.next_attempt_at)}" + (f" ({attempts}; the last: {d.last_error})" if d.attempts else "")
        else:
            state = f"failed after {attempts}: {d.last_error}"
        print(f"{d.id}  {d.event:<13}  {state}  -> {d.url}")
    return 0


def cmd_webhooks_secret(args: argparse.Namespace) -> int:
    with _client(args) as client:
        secret = client.webhook_secret(rotate=args.rotate)
    if args.json:
        _print_json({"secret": secret})
    else:
        print(secret)
        print("(verify a webhook with mola.webhooks.verify(secret, headers, body))", file=sys.stderr)
    return 0


def cmd_webhooks_test(args: argparse.Namespace) -> int:
    """A signed ping to the receiver, from the server: exit code 0 when it took it."""
    with _client(args) as client:
        result = client.test_webhook(args.receiver)
    if args.json:
        _print_json(result)
    elif result["delivered"]:
        print(f"delivered: {result['url']} answered {result['response_status']} to ping {result['id']}")
    else:
        print(f"not delivered: {result['error']}")
    return 0 if result["delivered"] else 1


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _print_json(models.raw)
        return 0
    for m in models:
        print(f"{m.name:<28} {m.model_type:<8} {m.num_layers:>3} layers  hidden {m.hidden_size:<5} targets {','.join(m.target_modules)}")
    return 0


def cmd_queues(args: argparse.Namespace) -> int:
    with _client(args) as client:
        queues = client.queues()
    if args.json:
        _print_json({"data": [q.raw for q in queues]})
        return 0
    for q in queues:
        running = "" if q.running is None else f", {q.running} running"
        idle = "  <- no worker: what waits here does not run" if q.workers == 0 and q.waiting else ""
        print(f"{q.name:<16} {' + '.join(q.carries):<26} {q.workers} worker{'s' if q.workers != 1 else ' '}  {q.waiting} waiting{running}{idle}")
    return 0


# ---- wiring ----------------------------------------------------------------------------------
def _wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except BrokenPipeError:  # `mola jobs list | head`: the reader has all it wanted
            _silence_stdout()
            return 141  # as a shell reports a command ended by SIGPIPE
        except MolaAPIError as exc:
            detail = exc.detail
            if exc.status_code == 401 and not (args.api_key or os.environ.get("MOLA_API_KEY")):
                detail = "no API key: set MOLA_API_KEY or pass --api-key (keys come from `mola keys create --tenant NAME`)"
            print(f"error: {detail}" if exc.status_code == 0 else f"error ({exc.status_code}): {detail}", file=sys.stderr)
            return 1
        except OSError as exc:  # a local file: the upload to read, the download to write
            print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail on the closed pipe
    again (Python would print "Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is no file (a test's capture)
        pass


def add_model_list_command(models_subparsers: argparse._SubParsersAction) -> None:
    p = models_subparsers.add_parser("list", help="list the server's base models (over HTTP)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_models_list))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `jobs ...`, `datasets ...` and `queues` to a CLI's subcommands."""
    p = subparsers.add_parser("queues", help="the server's queues: their live workers, what waits and runs")
    _common(p)
    p.set_defaults(func=_wrap(cmd_queues))
    datasets = subparsers.add_parser("datasets", help="upload and manage datasets on a server").add_subparsers(dest="datasets_command", required=True)
    p = datasets.add_parser("upload", help="upload a JSONL file (validated by the server)")
    p.add_argument("file")
    _common(p)
    p.set_defaults(func=_wrap(cmd_datasets_upload))
    p = datasets.add_parser("list", help="list datasets")
    p.add_argument("--limit", type=_int_in(1, 100), default=20, help="datasets per page (1-100)")
    p.add_argument("--after")
    _common(p)
    p.set_defaults(func=_wrap(cmd_datasets_list))
    for name, fn, text in (("show", cmd_datasets_show, "show a dataset and its report"), ("delete", cmd_datasets_delete, "delete a dataset")):
        p = datasets.add_parser(name, help=text)
        p.add_argument("id", type=_id_arg)
        _common(p)
        p.set_defaults(func=_wrap(fn))

    jobs = subparsers.add_parser("jobs", help="create and follow fine-tuning jobs on a server").add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("create", help="create a fine-tuning job")
    p.add_argument("--model", required=True, help="base model (see `mola models list`)")
    p.add_argument("--dataset", required=True, help="training dataset id")
    p.add_argument("--validation-dataset", help="validation dataset id")
    p.add_argument("--method", choices=("mola", "lora"), default="mola")
    p.add_argument(
        "--allocation", action="append", type=_allocation_arg,
        help="experts per layer: '2468', '2,4,6,8', 'inverted_triangle:5' or JSON ([2,2,4,4], {\"preset\": ..., \"average\": ...}); "
        "repeated: one job per allocation (a sweep), compared at the end with --follow",
    )
    p.add_argument("--top-k", type=_top_k_arg, help="experts per token: N or a JSON list per layer ([2, 2, 1, 1])")
    for name, kind in HYPERPARAMETER_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    p.add_argument("--target-modules", help="comma-separated module names")
    p.add_argument("--hp", action="append", type=_hp_arg, metavar="KEY=VALUE", help="any other hyperparameter (the value read as JSON, or a plain word as a string)")
    p.add_argument("--suffix")
    p.add_argument("--webhook-url", help="POSTed a signed event when the job ends (`mola webhooks secret` verifies it)")
    p.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    p.add_argument("--follow", action="store_true", help="follow the job with a progress bar (on stderr)")
    p.add_argument("--dry-run", action="store_true", help="create nothing: print what the job would be (examples, steps, adapter size) and any warning")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_create))
    p = jobs.add_parser("list", help="list jobs")
    p.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    p.add_argument("--dataset", type=_id_arg, help="only the jobs training on this dataset")
    p.add_argument("--model", help="only the jobs on this base model")
    p.add_argument("--method", choices=("mola", "lora"))
    p.add_argument("--limit", type=_int_in(1, 100), default=20, help="jobs per page (1-100)")
    p.add_argument("--after")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_list))
    for name, fn, text in (
        ("show", cmd_jobs_show, "show a job"),
        ("cancel", cmd_jobs_cancel, "cancel a job (a running one stops at its next step)"),
        ("follow", cmd_jobs_follow, "follow a job with a progress bar until it ends"),
        ("checkpoints", cmd_jobs_checkpoints, "list a job's checkpoints"),
        ("delete", cmd_jobs_delete, "delete a finished job with its metrics, checkpoints and adapter"),
    ):
        p = jobs.add_parser(name, help=text)
        p.add_argument("id", type=_id_arg)
        _common(p)
        p.set_defaults(func=_wrap(fn))
    p = jobs.add_parser("resume", help="queue a failed or cancelled job again, from its newest checkpoint")
    p.add_argument("id", type=_id_arg)
    for name in ("micro_batch_size", "checkpoint_every", "eval_every"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=HYPERPARAMETER_FLAGS[name])
    p.add_argument("--hp", action="append", type=_hp_arg, metavar="KEY=VALUE", help="another setting that may change: gradient_checkpointing=true, ...")
    p.add_argument("--follow", action="store_true", help="follow the job with a progress bar (on stderr)")
    p.set_defaults(target_modules=None)
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_resume))
    p = jobs.add_parser("metrics", help="print a job's metrics")
    p.add_argument("id", type=_id_arg)
    p.add_argument("--after-step", type=_int_in(0), default=0)
    p.add_argument("--limit", type=_int_in(1, 1000), default=100, help="steps per page (1-1000)")
    p.add_argument("--kind", choices=("train", "eval"))
    p.add_argument("--csv", action="store_true", help="every step (after --after-step) as CSV on stdout: step, kind, then one column per metric")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_metrics))
    p = jobs.add_parser("analysis", help="how a finished MoLA job's adapter uses its experts, per layer")
    p.add_argument("id", type=_id_arg)
    p.add_argument("--modules", action="store_true", help="one row per adapted module instead of per layer")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_analysis))
    p = jobs.add_parser("compare", help="jobs side by side: what each trained, its losses, speed and time, and what differs")
    p.add_argument("ids", nargs="*", type=_id_arg, metavar="ID", help="2 to 20 job ids")
    p.add_argument("--dataset", type=_id_arg, help="instead of ids: the newest 20 jobs that train on this dataset")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_compare))
    p = jobs.add_parser("generate", help="complete prompts, or score a dataset's rows, with a finished job's adapter, on the server")
    p.add_argument("id", type=_id_arg)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="a prompt (repeat for several, up to 16; - reads one from stdin)")
    what.add_argument("--dataset", type=_id_arg, help="an uploaded dataset (a test set) whose rows are completed and scored against their own completions")
    p.add_argument("--rows", type=_int_in(1, 1000), help="with --dataset: its first N rows (default: all; at most 1000)")
    p.add_argument("--step", type=_int_in(0), help="the adapter of the job's checkpoint at this step (`mola jobs checkpoints ID`) instead of its final one")
    p.add_argument("--template", choices=("alpaca", "chat", "raw"), help="how a prompt is dressed (default: as the job's training rows were)")
    p.add_argument("--input", help="with the alpaca template: the Alpaca input that goes with every prompt")
    p.add_argument("--max-new-tokens", type=_int_in(1, 2048), default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling")
    p.add_argument("--seed", type=_int_in(0), help="makes sampling repeatable")
    p.add_argument("--timeout", type=float, help="seconds to wait for the completions (default: no limit)")
    p.add_argument("--no-wait", action="store_true", help="print the generation's id and return; `mola jobs generation JOB ID` shows it")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_generate))
    p = jobs.add_parser("generation", help="one generation of a job: its status, or its completions")
    p.add_argument("id", type=_id_arg)
    p.add_argument("generation_id", type=_id_arg)
    p.add_argument("--delete", action="store_true", help="delete it instead (a queued one is never run)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_generation))
    p = jobs.add_parser("generations", help="a job's generations, newest first: id, status, when, first prompt")
    p.add_argument("id", type=_id_arg)
    p.add_argument("--limit", type=_int_in(1, 100), default=20, help="generations per page (1-100)")
    p.add_argument("--after", type=_id_arg, help="the last id of the previous page")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_generations))
    p = jobs.add_parser("webhooks", help="a job's webhook deliveries: delivered, pending (next attempt) or failed, and why")
    p.add_argument("id", type=_id_arg)
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_webhooks))
    webhooks = subparsers.add_parser("webhooks", help="the secret that signs your webhooks").add_subparsers(dest="webhooks_command", required=True)
    p = webhooks.add_parser("secret", help="print the secret that signs your webhooks (made the first time)")
    p.add_argument("--rotate", action="store_true", help="make a new one: every webhook from now on is signed with it")
    _common(p)
    p.set_defaults(func=_wrap(cmd_webhooks_secret))
    p = webhooks.add_parser("test", help="send a signed ping to a receiver from the server, and say whether it took it")
    p.add_argument("receiver", metavar="URL", help="the receiver (--url is the server's)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_webhooks_test))
    p = jobs.add_parser("download", help="download a job's adapter")
    p.add_argument("id", type=_id_arg)
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", help="archive path, or - for stdout (default: <job id>-adapter.tar.gz)")
    where.add_argument("--extract", metavar="DIR", help="unpack into DIR instead, ready for mola.load_mola_model (peft for a lora job)")
    p.add_argument("--step", type=_int_in(0), help="the adapter saved with this checkpoint (`mola jobs checkpoints ID`) instead of the final one")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_download))
