"""On object storage a part counts only once its commit record exists; resume lists commit records.

Every test runs on a real S3-compatible server (moto, over HTTP on loopback) and on a folder store;
the proof is the store's own listing, read with boto3 for S3.
"""

from __future__ import annotations

import contextlib
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3kit import S3Server

from batchrun.errors import OutputError, OutputLockedError
from batchrun.output import build_data_schema, read_status
from batchrun.output.remote import ObjectOutputStore, ShardLease, mirror
from batchrun.output.stores import FolderStore, open_store
from batchrun.records import RowFailure, RowResult

INPUT_SCHEMA = pa.schema([("key", pa.string()), ("prompt", pa.string())])
OUTPUT_SCHEMA = pa.schema([("generated_text", pa.string()), ("finish_reason", pa.string())])
DATA_SCHEMA = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=None, output_schema=OUTPUT_SCHEMA)


def ok(position: int) -> RowResult:
    return RowResult(position=position, id=f"row-{position:06d}", kept={"prompt": f"prompt {position}"},
                     output={"generated_text": "hello", "finish_reason": "stop"}, latency_s=0.25, attempts=1)


def failure(position: int, *, retryable: bool) -> RowFailure:
    return RowFailure(position=position, id=f"row-{position:06d}", error_type="http_503" if retryable else "validation",
                      error="unavailable" if retryable else "invalid", status=503 if retryable else 422,
                      attempts=3 if retryable else 1, retryable=retryable)


#: The leases this test's writers took: released when it ends, whatever the test did before.
_taken: list[ShardLease] = []


def _heartbeats() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "batchrun-lease" and t.is_alive()}


@pytest.fixture(autouse=True)
def _no_heartbeat_outlives_its_test():
    """A lease left held beats every 15 s against a server that stops with the module, and logs on after it."""
    before = _heartbeats()
    yield
    while _taken:
        with contextlib.suppress(OutputError):
            _taken.pop().release()
    assert _heartbeats() - before == set()


@pytest.fixture(scope="module")
def s3():
    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture(params=["s3", "folder"])
def output(request, tmp_path, monkeypatch):
    """An output URL and a function listing the keys under it, as the store itself lists them."""
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))
    if request.param == "folder":
        folder = FolderStore(tmp_path / "bucket")
        return folder.url, folder, lambda under="": [o.key for o in folder.list(under)]
    server = request.getfixturevalue("s3")
    for name, value in server.environ().items():
        monkeypatch.setenv(name, value)
    url = server.bucket()
    return url, open_store(url), lambda under="": server.keys(url, under)


def writer(output, shard=None, **options):
    url, objects, _ = output
    store = ObjectOutputStore(url, shard, store=objects)
    _taken.append(store.writer_lock())
    _taken[-1].acquire()
    sink = store.new_sink(data_schema=DATA_SCHEMA, id_column="key", **options)
    return store, sink


def test_parts_count_only_with_their_commit_records_and_resume_skips_them(output):
    store, sink = writer(output, shard_rows=3)
    sink.open()
    for position in range(7):
        sink.add(ok(position))
    sink.close()
    store.lease.release()
    keys = output[2]()
    parts = [k for k in keys if k.startswith("data/")]
    records = [k for k in keys if k.startswith("state/commits/")]
    assert len(parts) == 3 and len(records) == 3
    assert {k.rsplit("/", 1)[1].removesuffix(".json") for k in records} == {
        p.rsplit("/", 1)[1].removesuffix(".parquet") for p in parts}

    store, sink = writer(output, shard_rows=3)
    done = sink.open()
    assert done.ok == 7 and all(p in done for p in range(7)) and 7 not in done
    sink.close()
    store.lease.release()  # its heartbeat ends with the test, not after the server has stopped


def test_a_part_without_its_commit_record_is_ignored_then_removed(output):
    url, objects, keys = output
    store, sink = writer(output, shard_rows=2)
    sink.open()
    for position in range(4):
        sink.add(ok(position))
    store.lease.release()
    # A kill between the upload and the commit record: the part is there, its record is not.
    record = next(k for k in keys("state/commits"))
    objects.delete(record)
    orphan = "data/" + record.rsplit("/", 1)[1].replace(".json", ".parquet")
    assert orphan in keys("data")
    assert read_status(mirror(url, store=objects)).ok == 2  # readers count committed parts only

    store, sink = writer(output, shard_rows=2)
    done = sink.open()
    assert done.ok == 2 and orphan not in keys("data")
    sink.close()
    store.lease.release()


def test_a_second_writer_of_the_same_shard_is_refused_and_a_dead_ones_lease_taken_over(output):
    url, objects, _ = output
    first = ObjectOutputStore(url, "shard-00001-of-00002", store=objects)
    first.writer_lock().acquire()
    second = ObjectOutputStore(url, "shard-00001-of-00002", store=objects)
    with pytest.raises(OutputLockedError):
        ShardLease(second.commits, stale_after_s=60).acquire()
    other_shard = ObjectOutputStore(url, "shard-00000-of-00002", store=objects)
    other_shard.writer_lock().acquire()  # shards do not exclude each other
    # A holder on another host that stopped beating is dead once its heartbeat is stale.
    lease = ShardLease(second.commits, stale_after_s=0.0)
    lease._is_dead = lambda holder, record: True  # as if its heartbeat were older than stale_after_s
    assert lease.acquire() is not None
    first.lease._renewed_at = 0  # its next commit must renew first, and finds the lease taken
    with pytest.raises(OutputError, match="no longer holds the lease"):
        first.lease.ensure_held()
    for held in (lease, other_shard.lease, first.lease):  # their heartbeats end with the test, not after it
        with contextlib.suppress(OutputError):
            held.release()


def test_retryable_failures_are_reopened_and_permanent_ones_kept(output):
    url, objects, keys = output
    store, sink = writer(output)
    sink.open()
    sink.add(ok(0))
    sink.add(failure(1, retryable=True))
    sink.add(failure(2, retryable=False))
    sink.close()
    store.lease.release()

    store, sink = writer(output)
    done = sink.open()
    assert 1 not in done and 0 in done and 2 in done and done.retried_failures == 1
    sink.add(ok(1))
    sink.close()
    store.lease.release()
    status = read_status(mirror(url, store=objects))
    assert (status.ok, status.failed, status.failed_retryable) == (2, 1, 0)
    copy = mirror(url, store=objects)
    ids = sorted(i for f in (copy / "data").glob("*.parquet") for i in pq.read_table(f).column("key").to_pylist())
    assert ids == ["row-000000", "row-000001"]
    assert len(keys("failed")) == 1  # the retired part was removed, its permanent row republished


class _Unconditional(FolderStore):
    """A store that ignores If-None-Match, as some S3-compatible stores do."""

    def put_if_absent(self, key, data):
        return self.put(key, data)


def test_a_store_that_ignores_conditional_writes_is_found_out_and_said(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))
    honest = ObjectOutputStore("s3://b/honest", store=FolderStore(tmp_path / "honest"))
    honest.check_writable()
    assert honest.conditional_writes is True
    lax = ObjectOutputStore("s3://b/lax", store=_Unconditional(tmp_path / "lax"))
    lax.check_writable()
    assert lax.conditional_writes is False and "no_conditional_writes" in caplog.text
    assert FolderStore(tmp_path / "lax").list("") == []  # the probe is gone


def test_a_commit_or_a_heartbeat_whose_answer_was_lost_is_recognised_as_its_own(output):
    url, objects, keys = output
    store, sink = writer(output, shard_rows=2)
    sink.open()
    sink.add(ok(0))
    sink.add(ok(1))
    record = sink._last_record
    store.commits.commit(record)  # written again, as a client's retry after a lost answer does: no error
    lease = store.lease
    lease.renew()
    stale = lease._version
    lease.renew()
    lease._version = stale  # as if the answer to the last renewal had been lost
    lease.renew()
    lease.ensure_held()  # still ours: the record names this run
    sink.close()
    lease.release()
    assert len(keys("state/commits")) == 1
