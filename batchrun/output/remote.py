"""The output on object storage (``s3://``, ``gs://``): parts written once, commit records, a lease per shard.

There is no rename, no append and no lock on an object store, so the local protocol (temp file,
rename, manifest line; see the package docstring) becomes this one (docs/object-storage.md)::

    URL/
      data/shard-00001-of-00004-part-00003-r20261207T144501-9f3ac2d1.parquet   parts, written once each
      failed/...                                                               under a name no other writer
                                                                               can choose (the run's id is
                                                                               its start time and 32 random bits)
      state/[shards/<shard>/]
        commits/<part stem>.json          the commit record: the part counts from the moment it exists
        commits/<part stem>.retired.json  the part no longer counts (its failures are retried, or it is lost)
        lease.json                        the shard's writer: holder, heartbeat; replaced with If-Match
        job.json, summary.json, spend.json

How a part is published (a kill at any instant is harmless):

1. the run buffers rows and writes the part on local disk (the cache: ``ParquetSink`` as for a folder);
2. it uploads the part under its unique name (an upload cut short leaves no object, or a complete one);
3. it checks that it still holds the shard's lease, then writes the commit record (id range, rows,
   positions, size, CRC-32) with create-if-absent. Only this makes the part count;
4. it removes the part from the local cache.

A part without a commit record (a kill between 2 and 3) is ignored by every reader and removed by
the shard's next run, and its rows are redone. Resume lists the commit records: their positions
rebuild the :class:`DoneSet`; the local cache is never trusted, so losing the disk loses only rows
not yet uploaded. Two writers of one shard cannot both commit: the lease is taken with
create-if-absent and renewed (a heartbeat) with replace-if-unchanged, and a writer whose lease was
taken over, or not renewed within half its lifetime, writes no more commit records.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import ObjectStoreError, OutputError, OutputLockedError, PreconditionFailed
from batchrun.holder import Holder
from batchrun.output.buffer import prepare_conversions
from batchrun.output.done import DoneSet
from batchrun.output.files import json_bytes
from batchrun.output.layout import (
    MANIFEST,
    PARQUET_SUFFIX,
    SHARD_PREFIX,
    SHARDS_STATE,
    OutputStore,
    register_url_store,
)
from batchrun.output.manifest import POSITION_DTYPE, ManifestLog, ManifestView, file_crc32
from batchrun.output.schema import kept_columns_of
from batchrun.output.sink import ParquetSink
from batchrun.output.stores import open_store
from batchrun.output.stores.base import ObjectStore, Version

__all__ = ["LEASE_STALE_S", "ObjectOutputStore", "ObjectSink", "ShardLease", "cache_root", "mirror"]

logger = logging.getLogger(__name__)

#: A lease whose heartbeat is older than this is a dead writer's, and another run may take it over.
LEASE_STALE_S = 60.0
#: How often a writer renews its lease.
LEASE_HEARTBEAT_S = 15.0
_COMMITS = "commits/"
_RETIRED = ".retired.json"


def cache_root() -> Path:
    """Where runs buffer rows and readers keep their copies: ``BATCHRUN_CACHE_DIR`` or ~/.cache/batchrun."""
    base = os.environ.get("BATCHRUN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "batchrun")
    return Path(base)


def _cache_for(url: str, kind: str) -> Path:
    return cache_root() / kind / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:20]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age_s(stamp: Any) -> float | None:
    try:
        then = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    return (datetime.now(UTC) - (then if then.tzinfo else then.replace(tzinfo=UTC))).total_seconds()


def _state_prefix(shard: str | None) -> str:
    return f"state/{SHARDS_STATE}/{shard}/" if shard else "state/"


def encode_positions(positions: np.ndarray) -> str:
    """A part's source positions in its commit record: little-endian uint64, zlib, base64."""
    return base64.b64encode(zlib.compress(positions.astype(POSITION_DTYPE, copy=False).tobytes(), 6)).decode()


def decode_positions(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=POSITION_DTYPE)


# --------------------------------------------------------------------------- commit records


class Commits:
    """One writer's part of an output in a store: its commit records and state files."""

    def __init__(self, store: ObjectStore, shard: str | None) -> None:
        self.store = store
        self.shard = shard
        self.prefix = _state_prefix(shard)

    def owns(self, key: str) -> bool:
        """Whether a part (``data/...``) is this writer's: its shard's, or, unsplit, nobody's shard."""
        name = key.rsplit("/", 1)[-1]
        return name.startswith(f"{self.shard}-") if self.shard else not name.startswith(SHARD_PREFIX)

    def read(self) -> tuple[dict[str, dict], set[str]]:
        """The parts that count (file -> commit record) and the parts retired, from the records alone."""
        listed: dict[str, dict] = {}
        retired: set[str] = set()
        for info in self.store.list(self.prefix + _COMMITS):
            try:
                record = json.loads(self.store.get(info.key)[0])
            except ObjectStoreError as exc:
                raise OutputError(f"cannot read the commit record {self.store.url}/{info.key}: {exc}") from exc
            except ValueError as exc:
                # Records are written whole (one PUT) and never changed: a damaged one is not guessed at.
                raise OutputError(f"the commit record {self.store.url}/{info.key} is damaged ({exc}); "
                                  "batchrun will not guess what it vouched for") from exc
            if record.get("op") == "retire":
                retired.add(record["file"])
            else:
                listed[record["file"]] = record
                if record.get("replaces"):
                    retired.add(record["replaces"])
        for file in retired:
            listed.pop(file, None)
        return listed, retired

    def commit(self, record: dict) -> None:
        """Write a part's commit record (create-if-absent): from now on the part counts."""
        key = f"{self.prefix}{_COMMITS}{Path(record['file']).stem}.json"
        try:
            self.store.put_if_absent(key, json_bytes(record))
        except PreconditionFailed:
            # The name is this writer's alone: a record there is this one, written by a first attempt whose
            # answer was lost (a timeout the client retried). Anything else is not guessed at.
            existing = json.loads(self.store.get(key)[0])
            if (existing.get("file"), existing.get("crc32")) != (record["file"], record["crc32"]):
                raise

    def retire(self, file: str, reason: str) -> None:
        """Write a retire record: ``file`` no longer counts. Writing it twice changes nothing."""
        record = {"op": "retire", "file": file, "reason": reason, "time": _now()}
        with contextlib.suppress(PreconditionFailed):
            self.store.put_if_absent(f"{self.prefix}{_COMMITS}{Path(file).stem}{_RETIRED}", json_bytes(record))

    def load(self, name: str) -> dict | None:
        try:
            data, _ = self.store.get(self.prefix + name)
        except ObjectStoreError as exc:
            if exc.missing:
                return None
            raise OutputError(f"cannot read {self.store.url}/{self.prefix}{name}: {exc}") from exc
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise OutputError(f"{self.store.url}/{self.prefix}{name} is not valid JSON ({exc})") from exc
        return value if isinstance(value, dict) else None

    def save(self, name: str, value: dict) -> None:
        self.store.put(self.prefix + name, json_bytes(value))


# --------------------------------------------------------------------------- the lease


class ShardLease:
    """One writer per shard (or per unsplit output) in a store, without flock: ``state/.../lease.json``.

    Taken with create-if-absent; renewed every ``heartbeat_s`` with replace-if-unchanged; taken over
    (replace-if-unchanged again) only from a holder that is dead: on this host, its process is gone;
    elsewhere, its heartbeat is older than ``stale_after_s``. A renewal that finds the lease changed
    means another run took it: from then on this writer commits nothing (:meth:`ensure_held`).
    """

    def __init__(self, commits: Commits, *, heartbeat_s: float = LEASE_HEARTBEAT_S,
                 stale_after_s: float = LEASE_STALE_S) -> None:
        self.commits = commits
        self.key = commits.prefix + "lease.json"
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.holder: Holder | None = None
        self._version: Version | None = None
        self._renewed_at = 0.0
        self._lost: str | None = None
        self._token = secrets.token_hex(8)  # tells this lease's records from any other's, even in one process
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ShardLease({self.commits.store.url}/{self.key})"

    @property
    def held(self) -> bool:
        return self._version is not None and self._lost is None

    def _record(self, *, released: bool = False) -> bytes:
        assert self.holder is not None
        return json_bytes({**self.holder.to_dict(), "heartbeat_at": _now(), "released": released,
                           "token": self._token})

    def acquire(self) -> Holder | None:
        """Take the lease; returns the dead holder taken over from, if any. Raises OutputLockedError."""
        store, me = self.commits.store, Holder.current()
        self.holder = me
        stale: Holder | None = None
        try:
            self._version = store.put_if_absent(self.key, self._record())
        except PreconditionFailed:
            data, version = store.get(self.key)
            try:
                record = json.loads(data)
            except ValueError:
                record = {}
            other = Holder.from_dict(record)
            if not self._is_dead(other, record):
                raise OutputLockedError(f"{store.url} (shard {self.commits.shard})" if self.commits.shard
                                        else store.url, other) from None
            try:
                self._version = store.put_if_match(self.key, self._record(), version)
            except PreconditionFailed:  # another run took it over at the same moment
                raise OutputLockedError(store.url, None) from None
            stale = None if record.get("released") else other
        self._renewed_at = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="batchrun-lease", daemon=True)
        self._thread.start()
        return stale

    def _is_dead(self, holder: Holder | None, record: dict) -> bool:
        if record.get("released"):
            return True
        if holder is not None and holder.on_this_host():
            return not holder.alive()
        age = _age_s(record.get("heartbeat_at"))
        return age is None or age >= self.stale_after_s

    def renew(self) -> None:
        """Write a fresh heartbeat if the lease is still ours; otherwise remember it is lost."""
        with self._io:
            if self._version is None or self._lost is not None:
                return
            try:
                self._version = self.commits.store.put_if_match(self.key, self._record(), self._version)
                self._renewed_at = time.monotonic()
            except PreconditionFailed:
                # A first attempt that succeeded but whose answer was lost looks the same: the record says whose.
                data, version = self.commits.store.get(self.key)
                with contextlib.suppress(ValueError, AttributeError):
                    if json.loads(data).get("token") == self._token:
                        self._version = version
                        self._renewed_at = time.monotonic()
                        return
                self._lost = "another run took the lease over (this run's heartbeat was too late)"
                logger.error("output.lease_lost key=%s", self.key)

    def ensure_held(self) -> None:
        """Before a commit record: renew a lease older than half its lifetime; raise if it is lost."""
        if time.monotonic() - self._renewed_at > self.stale_after_s / 2:
            self.renew()
        if self._lost is not None or time.monotonic() - self._renewed_at > self.stale_after_s / 2:
            raise OutputError(f"{self.commits.store.url}: this run no longer holds the lease of its output "
                              f"({self._lost or 'it could not be renewed in time'}); nothing more is committed")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except ObjectStoreError as exc:  # a hiccup of the store: the next beat tries again
                logger.warning("output.lease_heartbeat_failed %s", exc)

    def release(self) -> None:
        """Mark the lease released (replace-if-unchanged), so the next run takes it at once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._io:
            version, self._version = self._version, None
            if version is not None and self._lost is None:
                with contextlib.suppress(ObjectStoreError):
                    self.commits.store.put_if_match(self.key, self._record(released=True), version)


# --------------------------------------------------------------------------- the store a run writes


class ObjectOutputStore(OutputStore):
    """An output in an object store, for one run: ``root`` is its local cache, the rest is in the store."""

    def __init__(self, url: str, shard: str | None = None, *, store: ObjectStore | None = None) -> None:
        super().__init__(_cache_for(url, "outputs"), shard)
        self.url = url.rstrip("/")
        self.objects = store if store is not None else open_store(self.url)
        self.commits = Commits(self.objects, shard)
        self.lease: ShardLease | None = None
        #: Whether the store refused a second create-if-absent (None: not probed yet; see check_writable).
        self.conditional_writes: bool | None = None

    def __repr__(self) -> str:
        return f"ObjectOutputStore({self.url!r}{f', shard={self.shard!r}' if self.shard else ''})"

    def relative(self, path: Path) -> str:
        return f"{self.url}/{super().relative(path)}"

    def exists(self) -> bool:
        return bool(self.objects.list(self.commits.prefix.rstrip("/")))

    def shards_in_store(self) -> list[str]:
        """The shards that keep state in the store, in order; empty for a job that was not split."""
        keys = self.objects.list(f"state/{SHARDS_STATE}")
        return sorted({key.key.split("/")[2] for key in keys if key.key.count("/") >= 3})

    def check_split(self) -> None:
        names = self.shards_in_store()
        if self.shard is None:
            if names:
                raise OutputError(f"{self.url} holds a job split into shards: run each shard with --shard I/N")
            return
        if self.objects.list("state/commits") or Commits(self.objects, None).load("job.json") is not None:
            raise OutputError(f"{self.url} holds a run made without --shard: use another output for the sharded job")
        mine = self.shard.rsplit("-of-", 1)[1]
        if others := sorted({name.rsplit("-of-", 1)[1] for name in names} - {mine}):
            raise OutputError(f"{self.url} holds shards of a split in {int(others[0])}, not {int(mine)}: run with "
                              "the same N, or use another output")

    def check_writable(self) -> None:
        """Write and remove a probe object (and prove the cache folder writable): nothing costs money first."""
        probe = f"{self.commits.prefix}write-probe-{secrets.token_hex(4)}"
        declared = self.objects.conditional_writes  # a store that has none says so (hf://)
        try:
            self.objects.put_if_absent(probe, b"batchrun write probe\n")
            if declared is False:
                self.conditional_writes = False  # it says so: no second write to ask it
            else:
                try:
                    self.objects.put_if_absent(probe, b"batchrun write probe\n")
                    self.conditional_writes = False  # it ignored If-None-Match
                except PreconditionFailed:
                    self.conditional_writes = True
            self.objects.delete(probe)
        except ObjectStoreError as exc:
            raise OutputError(f"the output {self.url} is not writable: {exc}") from exc
        if not self.conditional_writes:
            # Parts and records keep their unique names, so one writer per shard is still exactly-once; what
            # is lost is the refusal of a second writer and the exclusive guard of a shared endpoint.
            logger.warning("output.no_conditional_writes url=%s (the store has no atomic create-if-absent: it cannot "
                           "refuse a second writer of a shard; run one per shard, and bracket a shared endpoint with "
                           "`batchrun endpoint up/down`; docs/object-storage.md)", self.url)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"the local cache {self.root} is not writable: {exc}") from exc

    def load_job(self) -> dict | None:
        return self.commits.load("job.json")

    def save_job(self, job: dict) -> None:
        self.commits.save("job.json", job)

    def load_summary(self) -> dict | None:
        return self.commits.load("summary.json")

    def write_summary(self, summary: dict) -> None:
        self.commits.save("summary.json", summary)

    def load_spend(self) -> dict | None:
        return self.commits.load("spend.json")

    def save_spend(self, spend: dict) -> None:
        self.commits.save("spend.json", spend)

    def set_aside(self) -> Path:
        raise OutputError(f"--fresh on {self.url}: an object store has no rename to set the output aside. "
                          "Write to another prefix, or remove this one with the store's tools first")

    def sibling_job(self) -> dict | None:
        return next((job for shard in self.shards_in_store()
                     if (job := Commits(self.objects, shard).load("job.json")) is not None), None)

    def read_status(self) -> Any:
        """What this writer's part holds, from its commit records alone (each says its rows and retryable ones)."""
        from batchrun.output.status import OutputStatus

        listed, _ = self.commits.read()
        data = [r for r in listed.values() if r["kind"] == "data"]
        failed = [r for r in listed.values() if r["kind"] != "data"]
        retryable = sum(int(r.get("retryable", 0)) for r in failed)
        rows_failed = sum(int(r["rows"]) for r in failed)
        return OutputStatus(ok=sum(int(r["rows"]) for r in data), failed=rows_failed - retryable,
                            failed_retryable=retryable, data_shards=len(data), failed_shards=len(failed),
                            last_summary=self.load_summary(), job=self.load_job())

    def lease_state(self) -> Any:
        """Whether a live run holds this writer's lease, and who (a :class:`~batchrun.output.lock.LockState`)."""
        from batchrun.output.lock import LockState

        lease = ShardLease(self.commits)
        record = self.commits.load("lease.json")
        holder = Holder.from_dict(record)
        if record is None or holder is None:
            return None
        running = not lease._is_dead(holder, record)
        return LockState(running=running, holder=holder, heartbeat_at=record.get("heartbeat_at"))

    def writer_lock(self) -> ShardLease:
        self.lease = ShardLease(self.commits)
        return self.lease

    def new_sink(self, **options: Any) -> ObjectSink:
        return ObjectSink(self, **options)


# --------------------------------------------------------------------------- the sink


register_url_store(ObjectOutputStore)


class ObjectSink(ParquetSink):
    """A :class:`ParquetSink` whose shards are parts in an object store, counted by their commit records.

    The local machinery writes each shard into the store's cache folder as for a local output; each
    publication is then uploaded and committed (see the module docstring).
    """

    def __init__(self, store: ObjectOutputStore, **options: Any) -> None:
        super().__init__(store, **options)
        self.remote = store
        self._last_record: dict = {}

    def open(self, *, retry_failed: bool = False) -> DoneSet:
        store = self.remote
        if store.lease is None or not store.lease.held:
            raise RuntimeError("ObjectSink.open() needs the output's lease: take store.writer_lock() first")
        prepare_conversions()  # pyarrow's one-time imports now, not at the first part
        try:
            self._reset_cache()
            self._manifest = ManifestLog(store.manifest_path, ManifestView({}, {}, 0, -1, 0, False))
            self.run_id = f"r{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
            self._next_seq = 0
            listed, _ = store.commits.read()
            parts = {info.key: info.size for folder in ("data", "failed") for info in store.objects.list(folder)
                     if store.commits.owns(info.key)}
            for file, record in list(listed.items()):
                if parts.get(file) != record.get("bytes"):
                    problem = "missing" if file not in parts else f"holds {parts[file]} bytes, not {record['bytes']}"
                    logger.warning("sink.part_unreadable file=%s problem=%s (its rows are redone)", file, problem)
                    store.commits.retire(file, problem)
                    del listed[file]
            done = DoneSet()
            self._reopen_failures(listed, done, everything=retry_failed)
            for record in listed.values():
                done.add_many(decode_positions(record["positions_z"]))
                if record["kind"] == "data":
                    done.ok += int(record["rows"])
                else:
                    done.failed += int(record["rows"])
            for key in sorted(set(parts) - set(listed)):
                # Uploaded but never committed (a kill before its record), or retired: it never counts.
                logger.warning("sink.orphan_removed file=%s/%s (no commit record; its rows are redone)", store.url, key)
                store.objects.delete(key)
        except BaseException as exc:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None
            if isinstance(exc, OSError):
                raise OutputError(f"cannot open the local cache {store.root} of {store.url}: {exc}") from exc
            raise
        self.done = done
        return done

    def _reset_cache(self) -> None:
        """The cache of an earlier run is never trusted: whatever it held was either uploaded or is redone."""
        store = self.remote
        for folder in (store.data_dir, store.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for path in folder.glob(f"*{PARQUET_SUFFIX}"):
                if store.owns(path.name):
                    path.unlink()
        for folder in (store.positions_dir, store.tmp_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            store.manifest_path.unlink()

    def _reopen_failures(self, listed: dict[str, dict], done: DoneSet, *, everything: bool) -> None:
        """Retire each failed part holding retryable rows (``everything``: every failed part), its
        permanent rows committed again first in a part whose record ``replaces`` it."""
        store = self.remote
        for file, record in sorted(listed.items()):
            if record["kind"] != "failed" or (int(record.get("retryable", 0)) == 0 and not everything):
                continue
            table = pq.read_table(pa.BufferReader(store.objects.get(file)[0]))
            for name in kept_columns_of(self.failed_schema):
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(table.num_rows, self.failed_schema.field(name).type))
            table = table.select(self.failed_schema.names).cast(self.failed_schema)
            positions = decode_positions(record["positions_z"])
            permanent = ~np.asarray(table.column("retryable").fill_null(False).to_numpy(zero_copy_only=False))
            if everything:
                permanent[:] = False
            done.retried_failures += int((~permanent).sum())
            del listed[file]
            if permanent.any():
                event = self._publish("failed", table.filter(pa.array(permanent)), positions[permanent], retryable=0,
                                      replaces=file)
                listed[event["file"]] = self._last_record
            else:
                store.commits.retire(file, "retry_failed" if everything else "retryable")

    def _append(self, event: dict) -> None:
        super()._append(event)  # the cache's own manifest
        if event.get("op") == "publish":
            self._upload(event)

    def _upload(self, event: dict) -> None:
        """Upload a shard the cache just published, then commit it; a failed upload keeps its rows buffered."""
        store = self.remote
        assert store.lease is not None
        local = store.root / event["file"]
        sidecar = store.root / event["positions"]
        positions = np.fromfile(sidecar, dtype=POSITION_DTYPE)
        # The part goes up under its own name: a failure here leaves at most an uncommitted object.
        store.lease.ensure_held()
        store.objects.upload(event["file"], local)
        ids = pq.read_table(local, columns=[self.id_column]).column(0)
        record = {
            "op": "publish", "kind": event["kind"], "file": event["file"], "rows": event["rows"],
            "retryable": event["retryable"], "seq": event["seq"], "run": event["run"], "bytes": event["bytes"],
            "crc32": event["crc32"], "ids": [str(ids[0].as_py()), str(ids[-1].as_py())] if len(ids) else [],
            "positions": event["positions"], "positions_z": encode_positions(positions), "time": event["time"],
        }  # fmt: skip
        if event.get("replaces"):
            record["replaces"] = event["replaces"]
        try:
            store.lease.ensure_held()
            store.commits.commit(record)
        except (ObjectStoreError, OutputError) as exc:
            # The record may or may not have been written: these rows must never be published again.
            self._break(f"committing {store.url}/{event['file']} failed ({exc})")
            raise self._broken_error() from exc
        self._last_record = record
        for path in (local, sidecar):
            with contextlib.suppress(OSError):
                path.unlink()


# --------------------------------------------------------------------------- readers


def mirror(url: str, *, store: ObjectStore | None = None) -> Path:
    """A local, read-only copy of the committed union of ``url``, laid out as an output folder.

    Every reader of an output folder (status, runs, compare, export, push, preview) reads it as it is.
    Only committed parts are copied, each once: a part's name is never reused, so a copy already in
    the cache is the part. Parts no longer committed are dropped from the copy.
    """
    url = url.rstrip("/")
    objects = store if store is not None else open_store(url)
    root = _cache_for(url, "mirrors")
    shards = sorted({info.key.split("/")[2] for info in objects.list(f"state/{SHARDS_STATE}")
                     if info.key.count("/") >= 3})
    writers = [Commits(objects, shard) for shard in shards] or [Commits(objects, None)]
    wanted: set[str] = set()
    try:
        pushed = (root / "state" / "hub.json").read_bytes() if (root / "state" / "hub.json").is_file() else None
        shutil.rmtree(root / "state", ignore_errors=True)
        if pushed is not None:  # what `batchrun push` published from this copy: kept for the next push
            (root / "state").mkdir(parents=True)
            (root / "state" / "hub.json").write_bytes(pushed)
        for commits in writers:
            listed, _ = commits.read()
            state = OutputStore(root, commits.shard)
            state.positions_dir.mkdir(parents=True, exist_ok=True)
            lines = []
            for file, record in sorted(listed.items(), key=lambda item: item[0]):
                local = root / file
                if not local.exists() or local.stat().st_size != record["bytes"]:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_bytes(objects.get(file)[0])
                    if file_crc32(local) != record["crc32"]:
                        raise OutputError(f"{url}/{file} is not the part its commit record describes (CRC-32)")
                positions = root / record["positions"]
                positions.parent.mkdir(parents=True, exist_ok=True)
                positions.write_bytes(decode_positions(record["positions_z"]).tobytes())
                wanted.add(file)
                event = {k: record[k] for k in ("kind", "file", "positions", "rows", "retryable", "seq", "bytes",
                                                "crc32")}
                lines.append(json.dumps({"op": "publish", **event, "mtime_ns": local.stat().st_mtime_ns}))
            (state.state_dir / MANIFEST).write_text("".join(f"{line}\n" for line in lines))
            for name in ("job.json", "summary.json", "spend.json"):
                value = commits.load(name)
                if value is not None:
                    (state.state_dir / name).write_text(json.dumps(value))
        for folder in ("data", "failed"):
            for path in (root / folder).glob(f"*{PARQUET_SUFFIX}") if (root / folder).is_dir() else []:
                if f"{folder}/{path.name}" not in wanted:
                    path.unlink()
    except OSError as exc:
        raise OutputError(f"cannot copy {url} to its local cache {root}: {exc}") from exc
    return root


def readable(path: str | Path) -> Path:
    """An output a reader can open: a local folder as it is, an object store URL as its :func:`mirror`."""
    from batchrun.output.stores.base import is_store_url

    return mirror(str(path)) if is_store_url(path) else Path(path)

