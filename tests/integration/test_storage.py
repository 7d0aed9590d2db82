"""The `Storage` contract, one table of checks run against every backend: the local folder and
S3 (SeaweedFS, a real server). Then what only object storage does: multipart uploads,
presigned URLs, bucket creation, readiness with wrong settings."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from service.storage import LocalStorage, S3Storage, Storage, StorageError, make_storage
from tests.servers import remove_bucket, s3_bucket, s3_server, unique_name  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def _file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- the contract ------------------------------------------------------------------------------
def round_trip(storage: Storage, tmp: Path) -> None:
    data = os.urandom(3000)
    assert storage.put_file("datasets/t1/ds_1.jsonl", _file(tmp, "in.bin", data)) == 3000
    assert storage.exists("datasets/t1/ds_1.jsonl") and storage.size("datasets/t1/ds_1.jsonl") == 3000
    assert storage.get_file("datasets/t1/ds_1.jsonl", tmp / "out" / "copy.bin").read_bytes() == data
    with storage.open("datasets/t1/ds_1.jsonl") as stream:
        assert stream.read() == data
    assert b"".join(storage.iter_chunks("datasets/t1/ds_1.jsonl", chunk_size=1000)) == data


def overwrite(storage: Storage, tmp: Path) -> None:
    storage.put_file("a/x", _file(tmp, "1", b"first"))
    storage.put_file("a/x", _file(tmp, "2", b"second, longer"))
    assert storage.get_file("a/x", tmp / "x").read_bytes() == b"second, longer" and storage.size("a/x") == 14


def listing(storage: Storage, tmp: Path) -> None:
    for key in ("jobs/j1/c/2", "jobs/j1/a", "jobs/j1/b/1", "jobs/j10/a", "jobs/j2/a"):
        storage.put_file(key, _file(tmp, "f", key.encode()))
    # Sorted, recursive, and a prefix is a folder: "jobs/j1" is not "jobs/j10".
    assert storage.list("jobs/j1") == ["jobs/j1/a", "jobs/j1/b/1", "jobs/j1/c/2"]
    assert storage.list("jobs/none") == []


def directories(storage: Storage, tmp: Path) -> None:
    source = tmp / "checkpoint-4"
    files = {"adapter_model.safetensors": os.urandom(500), "state/optimizer.pt": b"opt", "trainer.json": b"{}"}
    for name, data in files.items():
        _file(source, name, data)
    assert storage.put_dir("jobs/j/checkpoints/checkpoint-4", source) == sum(map(len, files.values()))
    back = storage.get_dir("jobs/j/checkpoints/checkpoint-4", tmp / "back")
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files


def deletion(storage: Storage, tmp: Path) -> None:
    for key in ("d/1", "d/sub/2", "keep/3"):
        storage.put_file(key, _file(tmp, "f", b"x"))
    storage.delete("d/1")
    storage.delete("d/1")  # missing: not an error
    assert not storage.exists("d/1") and storage.exists("d/sub/2")
    storage.delete_prefix("d")
    assert storage.list("d") == [] and storage.list("keep") == ["keep/3"]


def missing_objects(storage: Storage, tmp: Path) -> None:
    assert not storage.exists("no/such")
    for call in (lambda: storage.get_file("no/such", tmp / "x"), lambda: storage.open("no/such"), lambda: storage.size("no/such")):
        with pytest.raises(StorageError, match="no object"):
            call()
    assert not (tmp / "x").exists()


def invalid_keys(storage: Storage, tmp: Path) -> None:
    source = _file(tmp, "f", b"x")
    for key in ("", "/etc/passwd", "../up", "a/../../b", "a//b", "a/./b"):
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.put_file(key, source)


def reachable(storage: Storage, tmp: Path) -> None:
    storage.check(timeout_s=2)


CONTRACT = [round_trip, overwrite, listing, directories, deletion, missing_objects, invalid_keys, reachable]


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "artifacts")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    # Each test under a prefix of its own in the run's bucket (this also covers MOLA_S3_PREFIX).
    return server.storage(bucket, prefix=unique_name("t"))


@pytest.mark.parametrize("check", CONTRACT, ids=lambda check: check.__name__)
def test_storage_contract(storage: Storage, check, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    check(storage, work)


# ---- object storage only -----------------------------------------------------------------------
def test_big_files_upload_in_parts(s3_server, s3_bucket, tmp_path: Path) -> None:
    storage = s3_server.storage(s3_bucket, prefix=unique_name("big"), multipart_threshold_bytes=5 * 1024 * 1024)
    data = os.urandom(20 * 1024 * 1024)
    assert storage.put_file("adapter.tar.gz", _file(tmp_path, "big", data)) == len(data)
    head = storage.client.head_object(Bucket=s3_bucket, Key=storage.prefix + "adapter.tar.gz")
    assert head["ETag"].strip('"').endswith("-3")  # three 8 MiB parts, not one PUT
    assert storage.get_file("adapter.tar.gz", tmp_path / "back").read_bytes() == data


def test_presigned_url_downloads_and_expires_with_its_signature(s3_server, s3_bucket, tmp_path: Path) -> None:
    storage = s3_server.storage(s3_bucket, prefix=unique_name("url"))
    storage.put_file("jobs/j/adapter.tar.gz", _file(tmp_path, "a", b"adapter bytes"))
    url = storage.presigned_url("jobs/j/adapter.tar.gz", expires_s=60, filename="j-adapter.tar.gz")
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"adapter bytes"
    assert 'filename="j-adapter.tar.gz"' in response.headers["content-disposition"]
    assert "X-Amz-Expires=60" in url
    if s3_server.enforces_auth:  # a server that allows anonymous reads ignores signatures
        assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
        assert httpx.get(url.split("?")[0]).status_code == 403


def test_presigned_url_uses_the_public_endpoint(s3_server, s3_bucket) -> None:
    storage = s3_server.storage(s3_bucket, public_endpoint_url="http://files.example.com:9000")
    assert storage.presigned_url("k").startswith(f"http://files.example.com:9000/{s3_bucket}/k?")


def test_make_storage_creates_the_bucket_when_configured(s3_server) -> None:
    bucket = unique_name("mola-create")
    env = s3_server.settings_env(bucket)
    settings = Settings(**{k.removeprefix("MOLA_").lower(): v for k, v in env.items()}, s3_create_bucket=True)
    storage = make_storage(settings)
    try:
        assert isinstance(storage, S3Storage)
        storage.check()
        assert storage.ensure_bucket() is False  # already there
    finally:
        remove_bucket(storage)
    with pytest.raises(StorageError, match="404|NoSuchBucket|NotFound"):
        storage.check()


def test_check_names_what_is_wrong(s3_server, s3_bucket) -> None:
    with pytest.raises(StorageError, match="Could not connect|connect"):
        S3Storage(s3_bucket, endpoint_url="http://127.0.0.1:1", access_key_id="a", secret_access_key="b").check(timeout_s=1)
    if s3_server.enforces_auth:
        with pytest.raises(StorageError, match="403"):
            s3_server.storage(s3_bucket, secret_access_key="wrong").check()
