"""Artifact storage: datasets, checkpoints and adapter archives, addressed by keys such as
``jobs/<id>/adapter.tar.gz``.

`Storage` is the interface; `LocalStorage` (a folder) is the embedded default and `S3Storage`
an S3-compatible object store (AWS S3, MinIO, SeaweedFS), which also gives `presigned_url`s so
adapter downloads can skip the API.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.settings import Settings

logger = logging.getLogger(__name__)


class StorageError(Exception):
    pass


def check_key(key: str) -> str:
    """Keys are relative POSIX paths without '..' (they become file names and object names)."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    @abstractmethod
    def put_file(self, key: str, path: Path) -> int:
        """Store the file at ``path`` under ``key``; returns its size in bytes."""

    def put_dir(self, prefix: str, directory: Path) -> int:
        """Store every file under ``directory`` as ``prefix/<relative path>``; returns bytes."""
        total = 0
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            total += self.put_file(f"{prefix}/{path.relative_to(directory).as_posix()}", path)
        return total

    @abstractmethod
    def get_file(self, key: str, path: Path) -> Path:
        """Copy the object ``key`` to the local file ``path``."""

    def get_dir(self, prefix: str, directory: Path) -> Path:
        for key in self.list(prefix):
            self.get_file(key, directory / key[len(prefix) + 1 :])
        return directory

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; `StorageError` if it does not exist."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix/``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine when the backend is a folder, else None."""
        return None

    def presigned_url(self, key: str, expires_s: int = 300, filename: str | None = None) -> str | None:
        """A short-lived URL a client can download from directly, where the backend has them;
        ``filename`` names the download (Content-Disposition)."""
        return None

    @abstractmethod
    def check(self, timeout_s: float = 2.0) -> None:
        """Raise `StorageError` unless the backend is reachable and usable (for GET /readyz)."""

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self.open(key) as stream:
            while chunk := stream.read(chunk_size):
                yield chunk


class LocalStorage(Storage):
    """Objects as files under a root folder; writes go through a temporary file and a rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> int:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def get_file(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"no object {key!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise StorageError(f"no object {key!r}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"no object {key!r}") from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def check(self, timeout_s: float = 2.0) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage folder {self.root} is missing or not writable")


class S3Storage(Storage):
    """Objects in one bucket of an S3-compatible store, under an optional key prefix.

    Large files upload in parts (boto3's managed transfer); downloads go through a temporary
    file and a rename, like `LocalStorage`. Presigned URLs are signed for ``public_endpoint_url``
    when set: the host a client reaches (``localhost:9000``) need not be the one the service
    uses (``minio:9000``), and the signature covers the host.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        prefix: str = "",
        multipart_threshold_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._session = boto3.session.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
        )
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url or endpoint_url
        self.client = self._client(endpoint_url, connect_timeout=5, read_timeout=60, attempts=4)
        self._presigner = self._client(self.public_endpoint_url, connect_timeout=5, read_timeout=60, attempts=1)
        self._check_clients: dict[float, object] = {}  # short timeouts, no retries: readiness
        chunk = max(8 * 1024 * 1024, multipart_threshold_bytes // 8)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold_bytes, multipart_chunksize=chunk)

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Storage":
        return cls(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            prefix=settings.s3_prefix,
            multipart_threshold_bytes=int(settings.s3_multipart_threshold_mb * 1024 * 1024),
        )

    def _client(self, endpoint_url: str | None, *, connect_timeout: float, read_timeout: float, attempts: int):
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            # Path-style (endpoint/bucket/key): what MinIO and SeaweedFS serve without DNS set-up.
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
        )
        return self._session.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    @staticmethod
    def _missing(error: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return False
        return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist; returns True when it was created."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        self.client.create_bucket(Bucket=self.bucket)
        logger.info("created bucket %s", self.bucket)
        return True

    def put_file(self, key: str, path: Path) -> int:
        size = Path(path).stat().st_size
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        return size

    def get_file(self, key: str, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp, Config=self.transfer)
            os.replace(tmp, path)
        except Exception as error:
            Path(tmp).unlink(missing_ok=True)
            if self._missing(error):
                raise StorageError(f"no object {key!r}") from None
            raise
        return path

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as error:
            if self._missing(error):
                raise StorageError(f"no object {key!r}") from None
            raise

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as error:
            if self._missing(error):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise StorageError(f"no object {key!r}")
        return int(head["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/"
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects call takes
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def presigned_url(self, key: str, expires_s: int = 300, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self._presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    def check(self, timeout_s: float = 2.0) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._check_clients.get(timeout_s)
        if client is None:
            client = self._check_clients[timeout_s] = self._client(
                self.endpoint_url, connect_timeout=timeout_s, read_timeout=timeout_s, attempts=1
            )
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "?")
            raise StorageError(f"bucket {self.bucket!r}: {code}") from None
        except BotoCoreError as error:
            raise StorageError(f"{self.endpoint_url or 'S3'}: {error}") from None


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "local":
        return LocalStorage(settings.resolved_storage_dir)
    if settings.storage == "s3":
        storage = S3Storage.from_settings(settings)
        if settings.s3_create_bucket:
            try:
                storage.ensure_bucket()
            except Exception as error:  # the process still starts; GET /readyz reports it
                logger.error("cannot create bucket %s: %s", settings.s3_bucket, error)
        return storage
    raise ValueError(f"unknown storage backend {settings.storage!r}")
