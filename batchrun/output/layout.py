"""Where things live in an output folder, and the state files that are not the manifest."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from batchrun.errors import OutputError
from batchrun.output.files import fsync_dir, json_bytes, read_json, replace_atomically, write_durably, write_error

if TYPE_CHECKING:
    import pyarrow as pa

# The key a kept schema was built for, in its own metadata.
_SCHEMA_KEY = b"batchrun_schema_key"

__all__ = ["MANIFEST", "PARQUET_SUFFIX", "POSITIONS_SUFFIX", "OutputStore"]

MANIFEST = "manifest.jsonl"
PARQUET_SUFFIX = ".parquet"
POSITIONS_SUFFIX = ".u64"
#: How often a write probe raced by another process's folders is tried again.
_PROBE_ATTEMPTS = 5


class OutputStore:
    """The output folder of one job: where things live, job.json, summary.json, and setting it aside."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.failed_dir = self.root / "failed"
        self.state_dir = self.root / "state"

    def __repr__(self) -> str:
        return f"OutputStore({str(self.root)!r})"

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
        return any(any(d.glob(f"*{PARQUET_SUFFIX}")) for d in (self.data_dir, self.failed_dir) if d.is_dir())

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

        Never deletes: a previous run's results may have cost hours of GPU time.
        """
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
