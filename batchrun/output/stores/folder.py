"""The object store protocol on a local (or mounted) folder: the tests' and the benchmark's store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from batchrun.errors import ObjectStoreError, PreconditionFailed
from batchrun.output.files import fsync_dir, write_durably
from batchrun.output.stores.base import ObjectInfo, Version

__all__ = ["FolderStore"]

_TMP = ".tmp"


class FolderStore:
    """Objects as files under ``root``; keys are relative paths.

    Create-if-absent is ``os.link`` of a complete temp file (it fails when the name exists), so no reader
    ever sees half an object; replace-if-unchanged compares the file's SHA-256 under an exclusive ``flock``.
    """

    #: Not declared: a network filesystem may not honour the link's refusal, so the output probes it.
    conditional_writes: bool | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"FolderStore({self.url!r})"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not an object key: {key!r}")
        return self.root / key

    def _staged(self, data: bytes) -> Path:
        tmp = self.root / _TMP / uuid.uuid4().hex
        tmp.parent.mkdir(parents=True, exist_ok=True)
        write_durably(tmp, data)
        return tmp

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{_TMP}-guard", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield

    def put(self, key: str, data: bytes) -> Version:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._staged(data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return Version(hashlib.sha256(data).hexdigest())

    def put_if_absent(self, key: str, data: bytes) -> Version:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._staged(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise PreconditionFailed(f"{key} exists already", key) from None
        finally:
            tmp.unlink()
        fsync_dir(path.parent)
        return Version(hashlib.sha256(data).hexdigest())

    def put_if_match(self, key: str, data: bytes, version: Version) -> Version:
        with self._guard():
            try:
                current = hashlib.sha256(self._path(key).read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != version.e_tag:
                raise PreconditionFailed(f"{key} changed since it was read", key)
            return self.put(key, data)

    def upload(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / _TMP / uuid.uuid4().hex
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def get(self, key: str) -> tuple[bytes, Version]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectStoreError(f"{key} does not exist in {self.url}", key, missing=True) from None
        return data, Version(hashlib.sha256(data).hexdigest())

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            relative = path.relative_to(self.root).as_posix()
            if path.is_file() and not relative.startswith(_TMP):
                found.append(ObjectInfo(relative, path.stat().st_size))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()
