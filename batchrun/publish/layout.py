"""Where a job's output lives in a dataset repo, and what a push must change there.

The layout on the Hub (docs/hub.md)::

    README.md                          the dataset card: YAML header (configs, dataset_info) + prose
    {config}/{split}-00003-r2.parquet  one file per committed data shard (data/part-00003-r2.parquet)
    {failed}/{split}-00004-r2.parquet  failed rows, only with --include-failed ({failed}: "failed" for
                                       the default config, else "{config}-failed")
    assets/{config}-samples.png        a thumbnail strip of the first images (image jobs)

A Hub file is named after the local shard it copies, so the repo holds each shard once whatever
happened to earlier pushes: a push only adds the shards the repo lacks (or holds with other bytes)
and deletes the files of its own configs that the output no longer lists.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun.output.layout import OutputStore
from batchrun.output.manifest import ShardFile, read_manifest, shard_problem
from batchrun.publish.names import failed_config_name, name_problem, repo_problem

__all__ = [
    "LocalShard",
    "PushPlan",
    "RemoteFile",
    "Target",
    "failed_config_name",
    "local_shards",
    "name_problem",
    "plan_push",
    "repo_problem",
]

# ``part-00003-r2.parquet``, or a split job's ``shard-00001-of-00004-part-00003-r2.parquet``.
_PART = re.compile(r"^(?P<shard>shard-\d+-of-\d+-)?part-(?P<rest>.+)\.parquet$")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a push goes: the repo, the config and split, whether failed rows go too, and which Hub."""

    repo: str
    config: str = "default"
    split: str = "train"
    private: bool = False
    include_failed: bool = False
    endpoint: str | None = None  # None: huggingface_hub's own (HF_ENDPOINT)

    def problem(self) -> str | None:
        """Why this target cannot be pushed to, said before anything is read or sent; None when fine."""
        return (repo_problem(self.repo) or name_problem(self.config, "config") or name_problem(self.split, "split")
                or (None if self.config != "failed" else "the config name 'failed' holds failed rows: pick another"))

    @property
    def configs(self) -> dict[str, str]:
        """The configs this push writes: config name -> the local kind ("data" or "failed") it holds."""
        out = {self.config: "data"}
        if self.include_failed:
            out[failed_config_name(self.config)] = "failed"
        return out

    def hub_path(self, shard: ShardFile) -> str:
        """The file a local shard becomes: ``data/part-00003-r2.parquet`` -> ``default/train-00003-r2.parquet``."""
        config = self.config if shard.kind == "data" else failed_config_name(self.config)
        name = Path(shard.file).name
        match = _PART.match(name)
        rest = (match.group("shard") or "") + match.group("rest") if match else name.removesuffix(".parquet")
        return f"{config}/{self.split}-{rest}.parquet"

    def owned_file(self, path: str) -> bool:
        """Whether ``path`` is one of this push's shard files (so it may be deleted when the output lost it)."""
        return any(path.startswith(f"{config}/{self.split}-") and path.endswith(".parquet") for config in self.configs)

    def thumbnails_path(self) -> str:
        return f"assets/{self.config}-samples.png"


@dataclass(frozen=True, slots=True)
class LocalShard:
    """A committed shard of the output, and the file it becomes on the Hub."""

    shard: ShardFile
    path: Path  # on disk
    hub_path: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def local_shards(root: Path, target: Target) -> list[LocalShard]:
    """The output's committed shards this push publishes, in sequence order.

    Only what the manifest lists counts (reliability.md: only closed Parquet files are published):
    a shard being written is not listed yet, and a listed one that cannot be read is left out (the
    next run redoes its rows, and the push after it publishes them).
    """
    root = Path(root).absolute()  # as the sink wrote it (see OutputStore): pyarrow never reads it as a URI
    listed = [shard for part in OutputStore.parts(root) for shard in read_manifest(part.manifest_path).listed.values()]
    kinds = set(target.configs.values())
    return [
        LocalShard(shard=shard, path=root / shard.file, hub_path=target.hub_path(shard))
        for shard in sorted(listed, key=lambda s: (s.kind, s.file))
        if shard.kind in kinds and shard_problem(root, shard, ()) is None
    ]


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file of the repo as the tree lists it: its git blob id, and its sha256 when stored with LFS/Xet."""

    path: str
    size: int
    blob_id: str | None = None
    sha256: str | None = None


def same_bytes(local: Path, remote: RemoteFile) -> bool:
    """Whether the repo's file holds exactly the bytes of ``local`` (compared by hash, never downloaded)."""
    size = local.stat().st_size
    if size != remote.size:
        return False
    if remote.sha256:
        return _digest(local, hashlib.sha256(), b"") == remote.sha256
    if remote.blob_id:
        return _digest(local, hashlib.sha1(), b"blob %d\0" % size) == remote.blob_id
    return False


def same_content(data: bytes, remote: RemoteFile | None) -> bool:
    """:func:`same_bytes` for bytes made in memory (the card, the thumbnail strip)."""
    if remote is None or len(data) != remote.size:
        return False
    if remote.sha256:
        return hashlib.sha256(data).hexdigest() == remote.sha256
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == remote.blob_id


def _digest(path: Path, hasher: Any, prefix: bytes) -> str:
    # A published shard never changes, so a run that pushes every N minutes hashes each one once.
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, hasher.name)
    if key not in _DIGESTS:
        hasher.update(prefix)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        if len(_DIGESTS) >= _DIGESTS_KEPT:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = hasher.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int, str], str] = {}
_DIGESTS_KEPT = 100_000


@dataclass(slots=True)
class PushPlan:
    """What one commit must do: the shards to add, the repo files to delete, the shards already there."""

    add: list[LocalShard] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    held: list[LocalShard] = field(default_factory=list)

    @property
    def changes_data(self) -> bool:
        return bool(self.add or self.delete)


def plan_push(shards: Iterable[LocalShard], remote: Mapping[str, RemoteFile], target: Target) -> PushPlan:
    """Compare the output with the repo: add what it lacks, delete what the output no longer lists."""
    plan = PushPlan()
    wanted: set[str] = set()
    for local in shards:
        wanted.add(local.hub_path)
        there = remote.get(local.hub_path)
        if there is not None and same_bytes(local.path, there):
            plan.held.append(local)
        else:
            plan.add.append(local)
    plan.delete = sorted(path for path in remote if target.owned_file(path) and path not in wanted)
    return plan
