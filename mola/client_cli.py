"""Client commands of the `mola` CLI: talk to a running service over HTTP.

    mola datasets upload train.jsonl
    mola jobs create --model tiny-llama --dataset ds_... --allocation 2468 --max-steps 50 --follow
    mola jobs follow job_...
    mola jobs download job_... --extract adapter/

The server and key come from `--url`/`--api-key` or `MOLA_URL`/`MOLA_API_KEY`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from mola.client import Job, MolaAPIError, MolaClient

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
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")


def _client(args: argparse.Namespace) -> MolaClient:
    return MolaClient(args.url, args.api_key)


def _json_out(value: Any) -> None:
    def default(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
        return str(obj)

    print(json.dumps(value, indent=2, default=default))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_allocation(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    return json.loads(text) if text[:1] in "[{" else text


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    hp: dict[str, Any] = {}
    for item in args.hp or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hp expects KEY=VALUE, got {item!r}")
        hp[key.strip()] = _parse_value(value)
    for name in HYPERPARAMETER_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            hp[name] = value
    if args.target_modules:
        hp["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    return hp


def _job_line(job: Job) -> str:
    p = job.progress
    steps = f"{p.step}/{p.total_steps}" if p.total_steps else f"{p.step}"
    return f"{job.id}  {job.status:<9}  {job.method:<4}  {job.base_model:<24}  step {steps:<11}  {job.created_at:%Y-%m-%d %H:%M}"


def _show_job(job: Job) -> None:
    print(f"id:          {job.id}")
    print(f"status:      {job.status}{' (cancel requested)' if job.cancel_requested and not job.done else ''}")
    print(f"base model:  {job.base_model} ({job.method})")
    print(f"dataset:     {job.dataset_id}" + (f", validation {job.validation_dataset_id}" if job.validation_dataset_id else ""))
    if job.allocation:
        print(f"allocation:  {job.allocation} (top-k {job.top_k})")
    p = job.progress
    if p.total_steps:
        eta = f", ETA {p.eta_seconds:.0f} s" if p.eta_seconds is not None else ""
        print(f"progress:    step {p.step}/{p.total_steps}, epoch {p.epoch or 0:.2f}{eta}")
    print(f"created:     {job.created_at}")
    if job.finished_at:
        print(f"finished:    {job.finished_at}")
    if job.error:
        print(f"error:       {job.error}")
    if job.result and job.result.get("train"):
        train = job.result["train"]
        print(f"final loss:  {train.get('loss')}")
    print(f"adapter:     {'available' if job.adapter_available else 'not yet'}")


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
        _json_out(dataset)
    else:
        print(f"{dataset.id}  {dataset.filename}: {dataset.rows} rows, format {dataset.format}")
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_datasets(limit=args.limit, after=args.after)
    if args.json:
        _json_out(list(page))
        return 0
    for d in page:
        print(f"{d.id}  {d.filename:<30}  {d.rows:>7} rows  {d.format or '-':<10}  {d.created_at:%Y-%m-%d %H:%M}")
    if page.has_more:
        print(f"(more: --after {page.cursor})")
    return 0


def cmd_datasets_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _json_out(client.get_dataset(args.id))
    return 0


def cmd_datasets_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_dataset(args.id)
    print(f"deleted {args.id}")
    return 0


# ---- jobs ------------------------------------------------------------------------------------
def cmd_jobs_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.create_job(
            base_model=args.model,
            dataset_id=args.dataset,
            method=args.method,
            allocation=_parse_allocation(args.allocation),
            top_k=_parse_allocation(args.top_k) if args.top_k else None,
            hyperparameters=_hyperparameters(args) or None,
            validation_dataset_id=args.validation_dataset,
            suffix=args.suffix,
            idempotency_key=args.idempotency_key,
        )
        if args.json:
            _json_out(job)
        else:
            print(f"created {job.id}: {job.method} on {job.base_model}, experts per layer {job.allocation}")
        if args.follow:
            return _follow(client, job.id)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_jobs(status=args.status, limit=args.limit, after=args.after)
    if args.json:
        _json_out(list(page))
        return 0
    for job in page:
        print(_job_line(job))
    if page.has_more:
        print(f"(more: --after {page.cursor})")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.id)
    _json_out(job) if args.json else _show_job(job)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.id)
    if args.json:
        _json_out(job)
    else:
        print(f"{job.id}: {job.status}" + (" (stops at its next step)" if job.status == "running" else ""))
    return 0


def cmd_jobs_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.metrics(args.id, after_step=args.after_step, limit=args.limit, kind=args.kind)
    if args.json:
        _json_out(list(page))
        return 0
    for m in page:
        values = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in m.metrics.items()
            if k in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "epoch")
        )
        print(f"step {m.step:>6}  {m.kind:<5}  {values}")
    if page.has_more:
        print(f"(more: --after-step {page.cursor})")
    return 0


def cmd_jobs_checkpoints(args: argparse.Namespace) -> int:
    with _client(args) as client:
        checkpoints = client.checkpoints(args.id)
    if args.json:
        _json_out(checkpoints)
        return 0
    for c in checkpoints:
        print(f"step {c.step:>6}  {c.size_bytes / 1e6:8.2f} MB  {c.created_at:%Y-%m-%d %H:%M:%S}")
    return 0


def cmd_jobs_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.extract:
            path = client.download_adapter(args.id, args.extract, extract=True)
            print(f"adapter extracted to {path}/ (load it with mola.load_mola_model(base, '{path}'))")
        else:
            path = client.download_adapter(args.id, args.output or f"{args.id}-adapter.tar.gz")
            print(f"saved {path}")
    return 0


def cmd_jobs_follow(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, args.id)


def _follow(client: MolaClient, job_id: str) -> int:
    """A progress bar over the job's events until it ends; exit code 0 when it succeeded."""
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", desc=job_id, dynamic_ncols=True)
    status, error = None, None
    try:
        for event, data in client.events(job_id):
            if event == "job":
                if data.progress.total_steps and bar.total != data.progress.total_steps:
                    bar.total = data.progress.total_steps
                    bar.refresh()
                if data.progress.step > bar.n:
                    bar.update(data.progress.step - bar.n)
                bar.set_description(f"{job_id} {data.status}")
            elif event == "metric":
                if data.step > bar.n:
                    bar.update(data.step - bar.n)
                shown = {k: f"{v:.4g}" for k, v in data.metrics.items() if k in ("loss", "eval_loss") and isinstance(v, float)}
                if shown:
                    bar.set_postfix(shown, refresh=False)
            elif event == "end":
                status, error = data.get("status"), data.get("error")
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped following {job_id} (the job goes on; `mola jobs cancel {job_id}` stops it)")
        return 130
    finally:
        bar.close()
    print(f"{job_id}: {status}" + (f": {error}" if error else ""))
    return 0 if status == "succeeded" else 1


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _json_out(models)
        return 0
    for m in models:
        print(f"{m.name:<28} {m.model_type:<8} {m.num_layers:>3} layers  hidden {m.hidden_size:<5} targets {','.join(m.target_modules)}")
    return 0


# ---- wiring ----------------------------------------------------------------------------------
def _wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except MolaAPIError as exc:
            print(f"error: {exc.detail}" if exc.status_code == 0 else f"error ({exc.status_code}): {exc.detail}", file=sys.stderr)
            return 1

    return run


def add_model_list_command(models_subparsers: argparse._SubParsersAction) -> None:
    p = models_subparsers.add_parser("list", help="list the server's base models (over HTTP)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_models_list))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `jobs ...` and `datasets ...` to a CLI's subcommands."""
    datasets = subparsers.add_parser("datasets", help="upload and manage datasets on a server").add_subparsers(dest="datasets_command", required=True)
    p = datasets.add_parser("upload", help="upload a JSONL file (validated by the server)")
    p.add_argument("file")
    _common(p)
    p.set_defaults(func=_wrap(cmd_datasets_upload))
    p = datasets.add_parser("list", help="list datasets")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after")
    _common(p)
    p.set_defaults(func=_wrap(cmd_datasets_list))
    for name, fn, text in (("show", cmd_datasets_show, "show a dataset and its report"), ("delete", cmd_datasets_delete, "delete a dataset")):
        p = datasets.add_parser(name, help=text)
        p.add_argument("id")
        _common(p)
        p.set_defaults(func=_wrap(fn))

    jobs = subparsers.add_parser("jobs", help="create and follow fine-tuning jobs on a server").add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("create", help="create a fine-tuning job")
    p.add_argument("--model", required=True, help="base model (see `mola models list`)")
    p.add_argument("--dataset", required=True, help="training dataset id")
    p.add_argument("--validation-dataset", help="validation dataset id")
    p.add_argument("--method", choices=("mola", "lora"), default="mola")
    p.add_argument("--allocation", help="experts per layer: '2468', '2,4,6,8', 'inverted_triangle:5' or JSON ([2,2,4,4], {\"preset\": ..., \"average\": ...})")
    p.add_argument("--top-k", help="experts per token: N or a JSON list per layer")
    for name, kind in HYPERPARAMETER_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    p.add_argument("--target-modules", help="comma-separated module names")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help="any other hyperparameter (value parsed as JSON)")
    p.add_argument("--suffix")
    p.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    p.add_argument("--follow", action="store_true", help="follow the job with a progress bar")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_create))
    p = jobs.add_parser("list", help="list jobs")
    p.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_list))
    for name, fn, text in (
        ("show", cmd_jobs_show, "show a job"),
        ("cancel", cmd_jobs_cancel, "cancel a job (a running one stops at its next step)"),
        ("follow", cmd_jobs_follow, "follow a job with a progress bar until it ends"),
        ("checkpoints", cmd_jobs_checkpoints, "list a job's checkpoints"),
    ):
        p = jobs.add_parser(name, help=text)
        p.add_argument("id")
        _common(p)
        p.set_defaults(func=_wrap(fn))
    p = jobs.add_parser("metrics", help="print a job's metrics")
    p.add_argument("id")
    p.add_argument("--after-step", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--kind", choices=("train", "eval"))
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_metrics))
    p = jobs.add_parser("download", help="download a job's adapter")
    p.add_argument("id")
    p.add_argument("-o", "--output", help="archive path (default: <job id>-adapter.tar.gz)")
    p.add_argument("--extract", metavar="DIR", help="unpack into DIR instead, ready for mola.load_mola_model")
    _common(p)
    p.set_defaults(func=_wrap(cmd_jobs_download))
