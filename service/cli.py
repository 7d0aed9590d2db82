"""The `mola` command: service commands (serve, worker, migrate, keys, models), the library's
commands (train, analyze, from `mola.cli`) and client commands (jobs, datasets, from
`mola.client_cli`).

Heavy imports (torch, the trainer, uvicorn, celery) happen inside the command that needs them,
so `mola jobs list` starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mola import client_cli

logger = logging.getLogger("mola.service")

WORKER_STOP_SECONDS = 60
# How long requests other than event streams (which end at once) may take to finish at Ctrl-C.
GRACEFUL_SHUTDOWN_SECONDS = 5


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="data folder (sets MOLA_DATA_DIR)")
    parser.add_argument("--database-url", help="database URL (sets MOLA_DATABASE_URL)")


def _settings(args: argparse.Namespace):
    """Settings with the command-line overrides applied (through the environment, so that child
    processes inherit them)."""
    from service.settings import get_settings

    for flag, env in (("data_dir", "MOLA_DATA_DIR"), ("database_url", "MOLA_DATABASE_URL"), ("host", "MOLA_HOST"), ("port", "MOLA_PORT")):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[env] = str(value)
    if getattr(args, "no_worker", False):
        os.environ["MOLA_EMBEDDED_WORKER"] = "false"
    get_settings.cache_clear()
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


def _sessions(settings):
    from service.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings))


# ---- migrate, keys, models -------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    from service.db import downgrade, migrate

    settings = _settings(args)
    if args.downgrade:
        downgrade(settings, args.downgrade)
        print(f"database downgraded to {args.downgrade}")
    else:
        migrate(settings, args.revision)
        print(f"database at {args.revision}: {settings.resolved_database_url}")
    return 0


@contextmanager
def _admin_session(args: argparse.Namespace) -> Iterator[Any]:
    """A transaction on the configured database (migrated first in local mode) for the
    administrative commands; a `ValueError` they raise (an unknown tenant or key) becomes
    `AdminError`, which `main` prints as one line with exit status 2."""
    from service.db import session_scope

    settings = _settings(args)
    # A one-line answer, not alembic's dozen lines of plugins and revisions on each call.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _require_schema(settings)
    try:
        with session_scope(_sessions(settings)) as session:
            yield session
    except ValueError as exc:
        raise AdminError(str(exc)) from exc


class AdminError(Exception):
    """A refused administrative command: its message is the whole story."""


def cmd_keys_create(args: argparse.Namespace) -> int:
    from service.security import create_api_key

    with _admin_session(args) as session:
        _, token = create_api_key(session, args.tenant, args.name)
    print(token)
    print(f"(API key for tenant {args.tenant!r}; it is shown only this once)", file=sys.stderr)
    return 0


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def _key_summary(key, tenant: str) -> dict:
    """What `mola keys list` shows of a key: never its secret (the database has only a hash)."""
    return {
        "id": key.id,
        "prefix": f"mola_{key.prefix}_...",
        "tenant": tenant,
        "name": key.name,
        "created_at": key.created_at.isoformat(timespec="seconds"),
        "last_used_at": key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else None,
        "revoked_at": key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else None,
    }


def cmd_keys_list(args: argparse.Namespace) -> int:
    from service.security import list_api_keys

    with _admin_session(args) as session:
        keys = list_api_keys(session, args.tenant)
    if args.json:
        print(json.dumps([_key_summary(key, tenant) for key, tenant in keys], indent=2))
        return 0
    rows = [("ID", "PREFIX", "TENANT", "NAME", "CREATED (UTC)", "LAST USED", "REVOKED")]
    rows += [
        (key.id, f"mola_{key.prefix}_...", tenant, key.name or "-", _when(key.created_at), _when(key.last_used_at), _when(key.revoked_at))
        for key, tenant in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from service.security import revoke_api_key

    with _admin_session(args) as session:
        key, revoked = revoke_api_key(session, args.key)
        label = f"API key {key.id} (mola_{key.prefix}_..., tenant {key.tenant.name!r})"
        when = _when(key.revoked_at)
    print(f"{label} revoked; requests with it now get 401" if revoked else f"{label} was already revoked at {when} UTC")
    return 0


def cmd_models_sync(args: argparse.Namespace) -> int:
    from service import catalogue
    from service.db import session_scope

    settings = _settings(args)
    _require_schema(settings)
    names = list(settings.models)
    with session_scope(_sessions(settings)) as session:
        if args.missing_only:
            # A row synced before module_paths or module_shapes existed is described again.
            have = {m.name for m in catalogue.list_models(session) if m.module_paths is not None and m.module_shapes is not None}
            if set(names) == have:
                print(f"model catalogue up to date ({len(names)} models)")
                return 0
        synced, errors = catalogue.sync(session, names)
    for name in synced:
        print(f"synced {name}")
    for name, error in errors.items():
        print(f"skipped {name}: {error}", file=sys.stderr)
    return 0 if synced else 1


def _require_schema(settings) -> None:
    """Apply migrations first in local mode; elsewhere `mola migrate` is a deployment step."""
    if settings.mode == "local":
        from service.db import migrate

        migrate(settings)


# ---- serve and worker -----------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    _exit_with_parent()
    settings = _settings(args)
    from worker.celery_app import create_celery_app

    app = create_celery_app(settings)
    argv = [
        *(["--quiet"] if args.quiet else []),  # a global option of the celery command: before "worker"
        "worker",
        f"--pool={args.pool}",
        f"--concurrency={args.concurrency}",
        f"--queues={args.queues or settings.queue}",
        f"--hostname=mola-{os.getpid()}@%h",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)
    return 0


def _recover(settings) -> None:
    """At start-up, one reconciliation pass (`service/reconcile.py`): jobs whose lease expired
    are re-queued (or failed after MOLA_MAX_ATTEMPTS), and queued jobs the broker does not hold
    are enqueued again, without waiting (a duplicate message is harmless: a worker only claims
    a job that is still queued). The workers keep reconciling while they run."""
    from service.queue import CeleryQueue
    from service.reconcile import reconcile

    try:
        report = reconcile(settings, _sessions(settings), CeleryQueue(settings), requeue_after_seconds=0)
    except Exception:
        logger.exception("could not reconcile the jobs with the broker; the workers will")
        return
    if report.enqueued:
        logger.info("enqueued %d queued job(s) again", len(report.enqueued))


def _finish_deletions(settings) -> None:
    """At start-up, finish the job deletions that were interrupted after the job was hidden:
    its stored files, then its row (see `service/jobs.py`, "deleting a job")."""
    from service import jobs
    from service.db import session_scope
    from service.storage import make_storage

    try:
        sessions, storage = _sessions(settings), make_storage(settings)
        with sessions() as session:
            pending = jobs.jobs_being_deleted(session)
        for job_id in pending:
            jobs.delete_job_files(storage, job_id)
            with session_scope(sessions) as session:
                jobs.finish_deletion(session, job_id)
            logger.info("job %s: its interrupted deletion is finished", job_id)
    except Exception:
        logger.exception("could not finish the interrupted job deletions; DELETE /jobs/{id} again finishes one")


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Run the reconciliation once, or every MOLA_RECONCILE_SECONDS with --loop."""
    from service.queue import CeleryQueue
    from service.reconcile import reconcile

    settings = _settings(args)
    sessions, queue = _sessions(settings), CeleryQueue(settings)
    while True:
        try:
            report = reconcile(settings, sessions, queue, requeue_after_seconds=args.requeue_after)
            print(f"re-queued {len(report.requeued)}, failed {len(report.failed)}, enqueued {len(report.enqueued)}", flush=True)
        except Exception:
            if not args.loop:
                raise
            logger.exception("reconciliation failed; retrying")
        if not args.loop:
            return 0
        time.sleep(settings.reconcile_seconds)


def _ensure_first_key(settings) -> str | None:
    from service import security
    from service.db import session_scope

    with session_scope(_sessions(settings)) as session:
        if security.any_key_exists(session):
            return None
        _, token = security.create_api_key(session, "default", "created by mola serve")
        return token


def _exit_with_parent() -> None:
    """In the embedded worker: get SIGTERM when `mola serve` dies, even by SIGKILL (Linux)."""
    parent = os.environ.get("MOLA_SERVE_PID")
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if str(os.getppid()) != parent:  # the parent died before prctl took effect
        sys.exit(0)


class WorkerProcess:
    """The embedded worker: `mola worker` as a child process, restarted if it dies. ``args``
    are extra `mola worker` options (the quick worker: `--queues MOLA_QUICK_QUEUE`)."""

    def __init__(self, args: Sequence[str] = (), name: str = "worker") -> None:
        self.args, self.name = list(args), name
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self.thread.start()

    def _spawn(self) -> None:
        # Quiet: two Celery banners (some 70 lines) would scroll the first API key out of sight.
        cmd = [sys.executable, "-m", "service.cli", "worker", "--quiet", *self.args]
        # Its own session: a Ctrl-C in the terminal reaches `mola serve`, which then stops the
        # worker with one SIGTERM (a second signal would make Celery stop without waiting).
        env = {**os.environ, "MOLA_SERVE_PID": str(os.getpid())}
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        logger.info("embedded %s started (pid %d)", self.name, self.proc.pid)

    def _watch(self) -> None:
        while not self.stopping:
            code = self.proc.wait()
            if self.stopping:
                return
            logger.error("embedded %s exited with %s; restarting in 2 s", self.name, code)
            self._recover_its_jobs(self.proc.pid, code)
            time.sleep(2)
            if not self.stopping:
                self._spawn()

    @staticmethod
    def _recover_its_jobs(pid: int, code: int) -> None:
        """The dead worker's running job will never finish there: end its lease now, so the
        restarted worker's first reconciliation re-queues it (it resumes from its last
        checkpoint; after MOLA_MAX_ATTEMPTS such deaths it fails)."""
        from service import jobs
        from service.db import session_scope
        from service.settings import get_settings
        from worker.runner import worker_prefix

        try:
            with session_scope(_sessions(get_settings())) as session:
                for job_id in jobs.expire_leases_of_worker(session, worker_prefix(pid)):
                    logger.error("job %s: its worker died (exit code %s); it will resume from its last checkpoint", job_id, code)
        except Exception:
            logger.exception("could not update the jobs of the dead worker")

    def signal_stop(self) -> None:
        """Send the one SIGTERM of a warm shutdown (a running job checkpoints and is re-queued),
        without waiting; called again, it does nothing (a second SIGTERM would be a cold one)."""
        if self.stopping:
            return
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            logger.info("stopping the embedded %s (a running job checkpoints and is re-queued)", self.name)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop the worker and wait for it (killed after WORKER_STOP_SECONDS)."""
        self.signal_stop()
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from service.db import migrate

    migrate(settings)
    # Describing models imports torch: do it in a child so the API process stays torch-free.
    sync = subprocess.run([sys.executable, "-m", "service.cli", "models", "sync", "--missing-only"])
    if sync.returncode != 0:
        logger.warning("no base model could be described; GET /models is empty until `mola models sync` succeeds")
    _recover(settings)
    _finish_deletions(settings)
    token = _ensure_first_key(settings)
    if token:
        print(
            "\n  First API key (tenant 'default'); it is shown only this once:\n\n"
            f"    export MOLA_API_KEY={token}\n",
            flush=True,
        )
    # Two children: the training worker (MOLA_QUEUE) and a quick worker (MOLA_QUICK_QUEUE, one
    # task at a time: an upload's token counts), so a quick task never waits behind training;
    # and a generation worker when MOLA_GENERATION_QUEUE names a queue of its own.
    workers = [WorkerProcess(), WorkerProcess(["--queues", settings.quick_queue], name="quick worker")]
    if settings.generations_queue not in (settings.queue, settings.quick_queue):
        workers.append(WorkerProcess(["--queues", settings.generations_queue], name="generation worker"))
    if not settings.embedded_worker:
        workers = []
    for worker in workers:
        worker.start()
    print(f"  mola serving on http://{settings.host}:{settings.port} (API docs at /docs)\n", flush=True)
    try:
        started = _run_api(settings, workers)
    finally:
        for worker in reversed(workers):  # the training worker last: the others stop sooner
            worker.stop()
    return 0 if started else 1


def _run_api(settings, workers: Sequence[WorkerProcess]) -> bool:
    """Run uvicorn until Ctrl-C (or SIGTERM); False if it could not start (the port in use).

    The first signal stops everything at once: the API's event streams end (uvicorn waits for
    every open connection, and a follower's stream lasts as long as its job), and the workers
    get their SIGTERM now, so a running job checkpoints while the API drains rather than after.
    Other requests get GRACEFUL_SHUTDOWN_SECONDS to finish."""
    import uvicorn

    from api.main import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = uvicorn.Server(config)
    uvicorn_handle_exit = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:  # the signal handler uvicorn installs
        app.state.shutting_down.set()
        for worker in workers:
            worker.signal_stop()
        uvicorn_handle_exit(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the signal it caught again once it has stopped
        pass
    return server.started


# ---- the parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mola", description="MoLA adapters: train them, serve a fine-tuning API, talk to it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API with an embedded worker (migrates the database first)")
    _server_options(p)
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a training worker (one per GPU)")
    _server_options(p)
    p.add_argument("--pool", default="solo", choices=("solo", "prefork", "threads"), help="Celery pool (solo: jobs run in this process)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument(
        "--queues",
        help="comma-separated queues to consume (default MOLA_QUEUE, the training queue; MOLA_QUICK_QUEUE for a quick worker; "
        "MOLA_GENERATION_QUEUE, when set, for a generation worker)",
    )
    p.add_argument("--quiet", action="store_true", help="no Celery start-up banner (the embedded workers of mola serve)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("reconcile", help="re-queue jobs of dead workers, enqueue queued jobs the broker lost (workers do this on their own)")
    _server_options(p)
    p.add_argument("--loop", action="store_true", help="every MOLA_RECONCILE_SECONDS until stopped")
    p.add_argument("--requeue-after", type=float, default=None, metavar="SECONDS", help="enqueue again queued jobs unclaimed this long (default MOLA_REQUEUE_AFTER_SECONDS)")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("migrate", help="apply database migrations")
    _server_options(p)
    p.add_argument("--revision", default="head")
    p.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create an API key for a tenant (created if new)")
    _server_options(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", help="a label for the key")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="API keys (never their secrets): tenant, name, created, last used, revoked")
    _server_options(p)
    p.add_argument("--tenant", help="only this tenant's keys")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke an API key: it gets 401 from the next request on")
    _server_options(p)
    p.add_argument("key", metavar="KEY_ID_OR_PREFIX", help="the key's id (key_...) or prefix (as `mola keys list` shows it)")
    p.set_defaults(func=cmd_keys_revoke)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("sync", help="describe the configured base models (MOLA_MODELS) into the catalogue")
    _server_options(p)
    p.add_argument("--missing-only", action="store_true", help="only when a configured model is not in the catalogue yet")
    p.set_defaults(func=cmd_models_sync)
    client_cli.add_model_list_command(models)

    try:
        from mola.cli import add_commands as add_library_commands
    except ImportError:  # the library CLI is optional here
        add_library_commands = None
    if add_library_commands is not None:
        add_library_commands(sub)
    client_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "func"):
        try:
            return int(args.func(args) or 0)
        except AdminError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    # A library command (mola.cli): its handler, with the library CLI's logging and errors.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
