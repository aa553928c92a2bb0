"""A Hugging Face Storage Bucket (``hf://buckets/ORG/NAME/PREFIX``) through huggingface_hub's bucket API.

Every write is ``HfApi.batch_bucket_files``: hf_xet uploads the bytes to Xet storage, then one
``/batch`` line names the path and the content's hash. Reads are ``download_bucket_files`` (hf_xet
again), listings ``list_bucket_tree``. The token and the Hub's address come from huggingface_hub's usual
environment (``HF_TOKEN`` or ``hf auth login``, ``HF_ENDPOINT``), never from the spec.

A bucket has no conditional write. ``put_if_absent`` and ``put_if_match`` look first (``paths-info``) and
write after: they refuse what they see, but two writers racing between the look and the write both
win. :attr:`HfBucketStore.conditional_writes` says so, and the output warns at run start (one writer
per shard is the launcher's job; docs/object-storage.md). A version is the file's Xet hash and its
upload time. huggingface_hub's progress bars are off during each call (they would draw over the run's).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchrun.errors import ObjectStoreError, PreconditionFailed
from batchrun.output.stores.base import ObjectInfo, Version

__all__ = ["BUCKET_URL", "HfBucketStore"]

#: ``hf://buckets/ORG/NAME/PREFIX``: a bucket and a prefix of the job's own.
BUCKET_URL = re.compile(r"^hf://buckets/([^/\s]+/[^/\s]+)/([^\s]*[^/\s])/*$")


_quiet_lock = threading.Lock()
_quiet_calls = 0  # store calls running now
_quiet_restore = False  # whether the bars were on when the first of them began


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """huggingface_hub's progress bars off while a store call runs (they would draw over the run's own), and back
    on after the last concurrent call when they were on before; a process that turned them off keeps them off."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    global _quiet_calls, _quiet_restore
    with _quiet_lock:
        if _quiet_calls == 0:
            _quiet_restore = not are_progress_bars_disabled()
            disable_progress_bars()
        _quiet_calls += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_calls -= 1
            if _quiet_calls == 0 and _quiet_restore:
                enable_progress_bars()


class HfBucketStore:
    """A bucket's prefix as an object store; keys are relative to the prefix."""

    #: The bucket cannot refuse a write on a condition (see the module docstring).
    conditional_writes: bool | None = False

    def __init__(self, url: str, api: Any = None) -> None:
        match = BUCKET_URL.match(url.strip())
        if match is None:
            raise ObjectStoreError(f"{url!r}: expected hf://buckets/ORG/NAME/PREFIX")
        self.url = url.strip().rstrip("/")
        self.bucket_id, self.prefix = match.group(1), match.group(2)
        if api is None:
            from huggingface_hub import HfApi

            from batchrun import __version__

            api = HfApi(library_name="batchrun", library_version=__version__)
        self._api = api

    def __repr__(self) -> str:
        return f"HfBucketStore({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def _error(self, key: str, exc: Exception) -> ObjectStoreError:
        first = str(exc).split("\n", 1)[0]
        return ObjectStoreError(f"{self.url}/{key}: {type(exc).__name__}: {first}", key)

    def _info(self, key: str) -> Any:
        """The file at ``key`` as ``get_bucket_paths_info`` sees it, or None."""
        try:
            return next(iter(self._api.get_bucket_paths_info(self.bucket_id, [self._path(key)])), None)
        except Exception as exc:
            raise self._error(key, exc) from exc

    @staticmethod
    def _version(info: Any) -> Version:
        uploaded = getattr(info, "uploaded_at", None)
        return Version(info.xet_hash, uploaded.isoformat() if uploaded is not None else None)

    def _write(self, key: str, source: bytes | Path) -> None:
        try:
            with _quiet():
                self._api.batch_bucket_files(self.bucket_id, add=[(source if isinstance(source, bytes) else str(source),
                                                                    self._path(key))])
        except Exception as exc:
            raise self._error(key, exc) from exc

    def _written(self, key: str, data: bytes) -> Version:
        self._write(key, data)
        info = self._info(key)
        if info is None:
            raise ObjectStoreError(f"{self.url}/{key}: written, then not found", key)
        return self._version(info)

    def put(self, key: str, data: bytes) -> Version:
        return self._written(key, data)

    def put_if_absent(self, key: str, data: bytes) -> Version:
        if self._info(key) is not None:
            raise PreconditionFailed(f"{self.url}/{key} exists (a bucket checks before it writes: not atomic)", key)
        return self._written(key, data)

    def put_if_match(self, key: str, data: bytes, version: Version) -> Version:
        info = self._info(key)
        if info is None or self._version(info) != version:
            raise PreconditionFailed(f"{self.url}/{key} changed (a bucket checks before it writes: not atomic)", key)
        return self._written(key, data)

    def upload(self, key: str, path: Path) -> None:
        self._write(key, Path(path))

    def get(self, key: str) -> tuple[bytes, Version]:
        info = self._info(key)
        if info is None:
            raise ObjectStoreError(f"{self.url}/{key} does not exist", key, missing=True)
        with tempfile.TemporaryDirectory(prefix="batchrun-hf-") as folder:
            target = Path(folder) / "object"
            try:
                with _quiet():
                    self._api.download_bucket_files(self.bucket_id, [(info, str(target))],
                                                    raise_on_missing_files=True)
            except Exception as exc:
                raise self._error(key, exc) from exc
            return target.read_bytes(), self._version(info)

    def list(self, prefix: str) -> list[ObjectInfo]:
        from huggingface_hub.errors import HfHubHTTPError

        start = f"{self.prefix}/"
        try:
            found = [ObjectInfo(e.path[len(start):], int(e.size))
                     for e in self._api.list_bucket_tree(self.bucket_id, prefix=self._path(prefix).rstrip("/"),
                                                         recursive=True)
                     if e.type == "file" and e.path.startswith(start)]
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return []
            raise self._error(prefix, exc) from exc
        except Exception as exc:
            raise self._error(prefix, exc) from exc
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        try:
            with _quiet():
                self._api.batch_bucket_files(self.bucket_id, delete=[self._path(key)])
        except Exception as exc:
            raise self._error(key, exc) from exc
