"""Readiness: can this process reach its database, broker and storage? (`GET /readyz`)

Each check runs in its own thread under one deadline, so a backend that hangs (a firewalled
host) costs at most the timeout, and the answer names every backend that failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from sqlalchemy import Engine, text

from service.settings import Settings
from service.storage import Storage

CHECKS = ("database", "broker", "storage")


def check_database(engine: Engine, timeout_s: float) -> None:
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))
        connection.execute(text("SELECT 1"))


def check_broker(settings: Settings, timeout_s: float) -> None:
    url = settings.resolved_broker_url
    scheme = url.split(":", 1)[0]
    if scheme == "filesystem":
        folder = Path(settings.broker_folder)
        folder.mkdir(parents=True, exist_ok=True)  # what the broker itself does on first use
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RuntimeError(f"broker folder {folder} is not writable")
    elif scheme in ("redis", "rediss"):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            client.ping()
        finally:
            client.close()
    else:
        from kombu import Connection

        with Connection(url, connect_timeout=timeout_s) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)


def check_all(engine: Engine, settings: Settings, storage: Storage, timeout_s: float | None = None) -> dict[str, str]:
    """{backend: "ok" or the reason it failed}; a check still running at the deadline is a
    timeout."""
    timeout_s = timeout_s or settings.ready_timeout_seconds
    checks: dict[str, Callable[[], None]] = {
        "database": lambda: check_database(engine, timeout_s),
        "broker": lambda: check_broker(settings, timeout_s),
        "storage": lambda: storage.check(timeout_s),
    }
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="readyz")
    try:
        futures = {name: pool.submit(check) for name, check in checks.items()}
        wait(futures.values(), timeout=timeout_s + 0.5)
        results = {}
        for name, future in futures.items():
            if not future.done():
                results[name] = f"timed out after {timeout_s:g} s"
            elif future.exception() is not None:
                error = future.exception()
                results[name] = f"{type(error).__name__}: {_one_line(error)}"
            else:
                results[name] = "ok"
        return results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return message[:300]


def main() -> int:
    """`python -m service.readiness`: the checks of this process's settings, as JSON; exit code 1
    when one fails (the worker container's health check)."""
    import json

    from service.db import make_engine
    from service.settings import get_settings
    from service.storage import make_storage

    settings = get_settings()
    engine = make_engine(settings)
    try:
        results = check_all(engine, settings, make_storage(settings))
    finally:
        engine.dispose()
    print(json.dumps(results))
    return 0 if all(result == "ok" for result in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
