"""The object store interface, and the URL schemes batchrun writes to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["SCHEMES", "ObjectInfo", "ObjectStore", "Version", "is_store_url"]

#: The URL schemes an output may be written to, and what serves each.
SCHEMES = {"s3": "obstore (pip install 'batchrun[s3]')", "gs": "obstore (pip install 'batchrun[s3]')",
           "hf": "huggingface_hub's Storage Buckets (hf://buckets/ORG/NAME/PREFIX)"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True, slots=True)
class Version:
    """What a replace-if-unchanged compares: the ETag (S3, Azure, a folder) or the generation (GCS)."""

    e_tag: str | None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object found by :meth:`ObjectStore.list`; ``key`` is relative to the store's prefix."""

    key: str
    size: int


class ObjectStore(Protocol):
    """What the output's commit protocol needs from a store (see the package docstring)."""

    url: str
    #: False: the store declares it cannot refuse a write on a condition (``put_if_absent`` and
    #: ``put_if_match`` only look first); None: not declared, and the output probes it with two writes.
    conditional_writes: bool | None

    def put(self, key: str, data: bytes) -> Version: ...

    def put_if_absent(self, key: str, data: bytes) -> Version: ...

    def put_if_match(self, key: str, data: bytes, version: Version) -> Version: ...

    def upload(self, key: str, path: Path) -> None: ...

    def get(self, key: str) -> tuple[bytes, Version]: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


def url_scheme(path: str) -> str | None:
    """The scheme of a URL (``s3``), or None for a local path."""
    match = _URL.match(path.strip())
    return match.group(1).lower() if match else None


def is_store_url(path: str | Path) -> bool:
    """Whether an output path names an object store batchrun writes to (``s3://``, ``gs://``, ``hf://buckets/``)."""
    if not isinstance(path, str) or url_scheme(path) not in SCHEMES:
        return False
    return url_scheme(path) != "hf" or path.strip().startswith("hf://buckets/")
