"""S3 and GCS (and S3-compatible stores) through obstore, with their conditional writes.

obstore sends create-if-absent as ``If-None-Match: *`` (S3) or ``x-goog-if-generation-match: 0`` (GCS's
XML API) and replace-if-unchanged as ``If-Match: <ETag>`` (S3) or ``x-goog-if-generation-match: <generation>``
(GCS); a store answers 412 when the condition does not hold, which becomes :class:`PreconditionFailed`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import from_url

from batchrun.errors import ObjectStoreError, PreconditionFailed
from batchrun.output.stores.base import ObjectInfo, Version

__all__ = ["ObStore"]


class ObStore:
    """An ``s3://`` or ``gs://`` URL as an object store; keys are relative to the URL's prefix."""

    #: Not declared: an S3-compatible store may ignore If-None-Match, so the output probes it.
    conditional_writes: bool | None = None

    def __init__(self, url: str, store: Any) -> None:
        self.url = url
        self._store = store

    def __repr__(self) -> str:
        return f"ObStore({self.url!r})"

    @classmethod
    def from_url(cls, url: str) -> ObStore:
        """Configured from the environment (``AWS_*``, ``GOOGLE_*``), as the store's own tools are."""
        options: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if url.startswith("s3://") and endpoint.startswith("http://"):
            # An S3-compatible store the user named over plain http (a local MinIO or moto): SigV4 sends
            # signatures, never the secret key.
            options["allow_http"] = True
        try:
            # Client options given here replace those read from the environment: pass none unless needed, so
            # that GOOGLE_ALLOW_HTTP (a local GCS emulator) and the like still apply.
            store = from_url(url.rstrip("/"), client_options=options or None)  # type: ignore[arg-type]
        except Exception as exc:  # obstore raises its own errors for a malformed URL or configuration
            raise ObjectStoreError(f"cannot open {url}: {exc}") from exc
        return cls(url.rstrip("/"), store)

    def _error(self, key: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, AlreadyExistsError | PreconditionError):
            return PreconditionFailed(f"{self.url}/{key}: the store refused a conditional write (412)", key)
        first = str(exc).split("\n", 1)[0]
        return ObjectStoreError(f"{self.url}/{key}: {type(exc).__name__}: {first}", key)

    @staticmethod
    def _version(result: Any) -> Version:
        return Version(result.get("e_tag"), result.get("version"))

    def _put(self, key: str, data: Any, mode: Any) -> Version:
        try:
            return self._version(obstore.put(self._store, key, data, mode=mode))
        except Exception as exc:
            raise self._error(key, exc) from exc

    def put(self, key: str, data: bytes) -> Version:
        return self._put(key, data, "overwrite")

    def put_if_absent(self, key: str, data: bytes) -> Version:
        return self._put(key, data, "create")

    def put_if_match(self, key: str, data: bytes, version: Version) -> Version:
        mode = {name: value for name, value in (("e_tag", version.e_tag), ("version", version.version)) if value}
        return self._put(key, data, mode)

    def upload(self, key: str, path: Path) -> None:
        # A path is sent in multipart chunks, never read whole into memory.
        self._put(key, Path(path), "overwrite")

    def get(self, key: str) -> tuple[bytes, Version]:
        try:
            result = obstore.get(self._store, key)
            data = result.bytes().to_bytes()
        except (NotFoundError, FileNotFoundError):
            raise ObjectStoreError(f"{self.url}/{key} does not exist", key, missing=True) from None
        except Exception as exc:
            raise self._error(key, exc) from exc
        meta = result.meta
        return data, Version(meta.get("e_tag"), meta.get("version"))

    def list(self, prefix: str) -> list[ObjectInfo]:
        try:
            found = [ObjectInfo(m["path"], int(m["size"])) for batch in obstore.list(self._store, prefix or None)
                     for m in batch]
        except Exception as exc:
            raise self._error(prefix, exc) from exc
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except (NotFoundError, FileNotFoundError):
            pass
        except Exception as exc:
            raise self._error(key, exc) from exc
