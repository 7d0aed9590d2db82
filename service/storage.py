"""Artifact storage: datasets, checkpoints and adapter archives, addressed by keys such as
``jobs/<id>/adapter.tar.gz``.

`Storage` is the interface; `LocalStorage` (a folder) is the embedded default. An object store
implements the same methods (and `presigned_url`, so downloads can skip the API).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.settings import Settings


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
    def size(self, key: str) -> int: ...

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

    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        """A short-lived URL a client can download from directly, where the backend has them."""
        return None

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
        return self._path(key).stat().st_size

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


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "local":
        return LocalStorage(settings.resolved_storage_dir)
    raise ValueError(f"unknown storage backend {settings.storage!r}")
