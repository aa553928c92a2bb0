"""Where things live in an output folder, and the state files that are not the manifest."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrun.errors import OutputError
from batchrun.output.files import fsync_dir, json_bytes, read_json, replace_atomically, write_durably, write_error

if TYPE_CHECKING:
    import pyarrow as pa

# The key a kept schema was built for, in its own metadata.
_SCHEMA_KEY = b"batchrun_schema_key"

__all__ = ["MANIFEST", "PARQUET_SUFFIX", "POSITIONS_SUFFIX", "SHARD_PREFIX", "OutputStore"]

MANIFEST = "manifest.jsonl"
PARQUET_SUFFIX = ".parquet"
POSITIONS_SUFFIX = ".u64"
#: How often a write probe raced by another process's folders is tried again.
_PROBE_ATTEMPTS = 5


#: Where the shards of a split job keep their state: ``state/shards/shard-00001-of-00004/``.
SHARDS_STATE = "shards"
#: Every shard's file names start with its name (``data/shard-00001-of-00004-part-00003-r2.parquet``).
SHARD_PREFIX = "shard-"
_SHARD_NAME = re.compile(r"^shard-\d{5}-of-\d{5}$")


#: The store class of an object-store URL (s3://, gs://): :class:`~batchrun.output.remote.ObjectOutputStore`,
#: which registers itself when it loads (the output package loads it), so that this base names no subclass.
_URL_STORE: list[Any] = []


def register_url_store(store_class: Any) -> None:
    """Make ``store_class`` the store of object-store URLs (called once, by batchrun.output.remote)."""
    _URL_STORE[:] = [store_class]


def url_store_class() -> Any:
    """The store class of an object-store URL."""
    if not _URL_STORE:
        raise OutputError("object-store outputs need batchrun.output.remote, which the output package loads")
    return _URL_STORE[0]


class OutputStore:
    """The output folder of one job: where things live, job.json, summary.json, and setting it aside.

    A job split into shards (shards.py) has one output folder for all of them: their Parquet files share
    ``data/`` and ``failed/`` under names that start with the shard's (no two shards can clash, and
    ``data/*.parquet`` is the union), and each shard keeps its own manifest, lock and state under
    ``state/shards/<shard>/``. ``OutputStore(root, shard=...)`` is one shard's part of the folder.
    """

    def __init__(self, root: str | Path, shard: str | None = None) -> None:
        if shard is not None and not _SHARD_NAME.match(shard):
            raise ValueError(f"not a shard name: {shard!r}")
        # Absolute, so that every reader finds what the writer wrote: pyarrow takes a relative path
        # whose first part ends in ':' ("s3:/bucket/x", all that is left of "s3://bucket/x") for a URI.
        self.root = Path(root).absolute()
        self.shard = shard
        self.data_dir = self.root / "data"
        self.failed_dir = self.root / "failed"
        self.state_dir = self.root / "state" / SHARDS_STATE / shard if shard else self.root / "state"
        #: How this store's Parquet files (and their sidecars) are named: its shard's name first.
        self.file_prefix = f"{shard}-" if shard else ""

    def __repr__(self) -> str:
        return f"OutputStore({str(self.root)!r}{f', shard={self.shard!r}' if self.shard else ''})"

    @classmethod
    def for_spec(cls, spec: Any) -> OutputStore:
        """The store a job's spec writes: its output folder, or its shard's part of it (on object storage, an
        :class:`~batchrun.output.remote.ObjectOutputStore`)."""
        shard = getattr(spec, "shard", None)
        from batchrun.output.stores.base import is_store_url

        if is_store_url(spec.output.path):
            return url_store_class()(spec.output.path, shard.folder if shard is not None else None)
        return cls(spec.output.path, shard.folder if shard is not None else None)

    def sibling_job(self) -> dict | None:
        """The job another shard of this output already saved (what a shard's first run is held to)."""
        return self.job_of(self.root)

    @staticmethod
    def shard_names(root: str | Path) -> list[str]:
        """The shards that keep state in ``root``, in order; empty for a job that was not split."""
        from batchrun.output.stores.base import is_store_url

        if is_store_url(root):
            return url_store_class()(str(root)).shards_in_store()
        folder = Path(root) / "state" / SHARDS_STATE
        try:
            entries = list(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            # None yet; or another shard's first writability probe made the folder and removed it again
            # between a look and this listing (shards of a new job start together).
            return []
        return sorted(p.name for p in entries if p.is_dir() and _SHARD_NAME.match(p.name))

    @classmethod
    def parts(cls, root: str | Path) -> list[OutputStore]:
        """Every store that writes into ``root``: one per shard of a split job, else the folder itself.

        Readers of the whole output (status, export, push) take the union of their manifests.
        """
        from batchrun.output.stores.base import is_store_url

        if is_store_url(root):  # an object store: its writers, read through their commit records
            names = cls.shard_names(root)
            store = url_store_class()
            return [store(str(root), name) for name in names] or [store(str(root))]
        return [cls(root, name) for name in cls.shard_names(root)] or [cls(root)]

    @classmethod
    def job_of(cls, root: str | Path) -> dict | None:
        """The job that wrote ``root`` (``state/job.json``; for a split job, the first shard's: all hold one spec)."""
        return next((job for part in cls.parts(root) if (job := part.load_job()) is not None), None)

    @classmethod
    def spend_of(cls, root: str | Path) -> dict | None:
        """What the runs into ``root`` spent; None for a job split into several shards.

        Each shard meters the replicas of the endpoint it shares while it runs, so shards that ran at the
        same time count the same replica-hours: their sum would overstate the bill, and it is not made.
        """
        records = [spend for part in cls.parts(root) if (spend := part.load_spend())]
        return records[0] if len(records) == 1 and len(cls.shard_names(root)) <= 1 else None

    def owns(self, file_name: str) -> bool:
        """Whether a file in ``data/`` or ``failed/`` is this store's to reconcile (not another shard's)."""
        if self.shard is not None:
            return file_name.startswith(self.file_prefix)
        return not file_name.startswith(SHARD_PREFIX)

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / MANIFEST

    @property
    def positions_dir(self) -> Path:
        return self.state_dir / "positions"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "tmp"

    @property
    def retired_dir(self) -> Path:
        return self.state_dir / "retired"

    @property
    def orphans_dir(self) -> Path:
        return self.state_dir / "orphans"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    def relative(self, path: Path) -> str:
        """``path`` as the user would name it inside the folder, e.g. ``state/summary.json``."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def exists(self) -> bool:
        """Whether the folder holds a previous run: a job.json, a manifest, or any shard."""
        if (self.state_dir / "job.json").exists() or self.manifest_path.exists():
            return True
        return any(self.owns(p.name) for d in (self.data_dir, self.failed_dir) if d.is_dir()
                   for p in d.glob(f"*{PARQUET_SUFFIX}"))

    def check_split(self) -> None:
        """Refuse to mix a split job's shards with an unsplit run, or shards of two different splits.

        An unsplit run would redo every row the shards hold; a shard of another N would be given rows
        that shards of the first split already hold.
        """
        names = self.shard_names(self.root)
        if self.shard is None:
            if names:
                raise OutputError(
                    f"{self.root} holds a job split into shards ({names[0].rsplit('-of-', 1)[1].lstrip('0')} of "
                    "them): run each shard with --shard I/N, read the union with `batchrun status`, or use "
                    "another output for an unsplit run"
                )
            return
        if (self.root / "state" / "job.json").exists() or (self.root / "state" / MANIFEST).exists():
            raise OutputError(
                f"{self.root} holds a run made without --shard: its rows would be done again by the shards. "
                "Use another output for the sharded job"
            )
        mine = self.shard.rsplit("-of-", 1)[1]
        others = sorted({name.rsplit("-of-", 1)[1] for name in names} - {mine})
        if others:
            raise OutputError(
                f"{self.root} holds shards of a split in {int(others[0])}, not {int(mine)}: a different N would "
                "give rows to other shards than those that hold them. Run with the same N, or use another output"
            )

    def check_writable(self) -> None:
        """Prove the folder can be written before anything costs money (reliability.md §3).

        Creates the root and ``state/`` if needed, writes and removes a probe file, then removes every
        folder it created, whether the probe succeeded or not: ``batchrun validate`` promises to change
        nothing, and the run creates what it needs when the sink opens.
        """
        probe = self.state_dir / f".write-probe-{os.getpid()}"
        # Shards of one job check the same folder at the same moment: a folder another process creates
        # (or removes, having created it for its own probe) between our look and our mkdir is raced, and
        # the probe is tried again rather than reported as unwritable.
        for attempt in range(_PROBE_ATTEMPTS):
            created: list[Path] = []
            try:
                for folder in reversed([self.state_dir, *self.state_dir.parents]):
                    if not folder.exists():
                        try:
                            folder.mkdir()
                        except FileExistsError:
                            continue
                        created.append(folder)
                write_durably(probe, b"batchrun write probe\n")
                probe.unlink()
                return
            except FileNotFoundError:
                if attempt == _PROBE_ATTEMPTS - 1:
                    raise OutputError(f"the output folder {self.root} is not writable: its folders kept "
                                      "disappearing while being created") from None
            except OSError as exc:
                with contextlib.suppress(OSError):
                    probe.unlink()
                raise OutputError(f"the output folder {self.root} is not writable: {exc}") from exc
            finally:
                # Innermost first; rmdir never removes a folder something else has written into meanwhile.
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()

    def load_job(self) -> dict | None:
        """The job snapshot saved by a previous run, or None for a new output folder."""
        return read_json(self.state_dir / "job.json")

    def save_job(self, job: dict) -> None:
        """Save the spec snapshot and config fingerprint atomically. Secrets are scrubbed."""
        self._save_state_file("job.json", job)

    def load_summary(self) -> dict | None:
        """The summary of the last run, or None."""
        return read_json(self.state_dir / "summary.json")

    def write_summary(self, summary: dict) -> None:
        """Save the run's summary atomically. Secrets are scrubbed."""
        self._save_state_file("summary.json", summary)

    def load_spend(self) -> dict | None:
        """What the job spent over its runs (see ``batchrun.cost.Spent``), or None."""
        return read_json(self.state_dir / "spend.json")

    def save_spend(self, spend: dict) -> None:
        """Save the job's spending atomically."""
        self._save_state_file("spend.json", spend)

    def schema_for(self, key: str, build: Callable[[], pa.Schema]) -> pa.Schema:
        """The shards' schema that ``build`` makes for inputs summed up by ``key``, kept in state/.

        Building it imports ``datasets`` for the features (a second or more before the first request);
        a resumed run whose ``key`` matches reads it back instead. A schema file that cannot be read
        is built again, never trusted.
        """
        import pyarrow as pa

        path = self.state_dir / "data_schema.arrow"
        try:
            stored = pa.ipc.read_schema(pa.py_buffer(path.read_bytes()))
            metadata = dict(stored.metadata or {})
            if metadata.pop(_SCHEMA_KEY, None) == key.encode():
                return stored.with_metadata(metadata)
        except (OSError, pa.ArrowException):
            pass
        schema = build()
        keyed = schema.with_metadata({**(schema.metadata or {}), _SCHEMA_KEY: key.encode()})
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, keyed.serialize().to_pybytes(), self.tmp_dir)
        except OSError as exc:
            raise write_error(self.root, self.relative(path), exc) from exc
        return schema

    def _save_state_file(self, name: str, value: dict) -> None:
        path = self.state_dir / name
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, json_bytes(value), self.tmp_dir)
        except OSError as exc:
            raise write_error(self.root, self.relative(path), exc) from exc

    def set_aside(self) -> Path:
        """For ``--fresh``: rename the folder to ``<root>.previous-<YYYYmmdd-HHMMSS>`` and return that path.

        Never deletes: a previous run's results may have cost hours of GPU time. A shard's part of a
        folder shared with other shards is not set aside alone (they write there too).
        """
        if self.shard is not None:
            raise OutputError(
                f"--fresh with --shard: {self.root} is shared by every shard of the job, so one shard cannot "
                "start it over alone. Move or remove the whole folder (no shard running) to start the job over"
            )
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.root.with_name(f"{self.root.name}.previous-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.root.with_name(f"{self.root.name}.previous-{stamp}-{n}")
        try:
            os.rename(self.root, target)
        except OSError as exc:
            raise OutputError(f"cannot set {self.root} aside as {target}: {exc}") from exc
        fsync_dir(target.parent)
        return target
