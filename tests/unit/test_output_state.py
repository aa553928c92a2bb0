"""Failed shards keep the kept input columns, and a full disk leaves nothing half-written behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import OutputError
from batchrun.output import (
    FAILED_COLUMNS,
    OutputStore,
    ParquetSink,
    build_data_schema,
    build_failed_schema,
    read_status,
)
from batchrun.records import RowFailure, RowResult

INPUT_SCHEMA = pa.schema([("key", pa.string()), ("prompt", pa.string()), ("lang", pa.string())])
OUTPUT_SCHEMA = pa.schema([("generated_text", pa.string()), ("prompt_tokens", pa.int64())])
DATA_SCHEMA = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=None, output_schema=OUTPUT_SCHEMA)
KEPT = ["prompt", "lang"]
FAILURE_NAMES = [f.name for f in FAILED_COLUMNS]


def kept(position: int) -> dict:
    return {"prompt": f"prompt {position}", "lang": "en"}


def ok(position: int) -> RowResult:
    return RowResult(position, f"row-{position}", kept(position), {"generated_text": "hi", "prompt_tokens": 3}, 0.1, 1)


def failure(position: int, *, retryable: bool, with_kept: bool = True) -> RowFailure:
    return RowFailure(
        position=position,
        id=f"row-{position}",
        error_type="http_503" if retryable else "validation",
        error="unavailable" if retryable else "bad input",
        status=503 if retryable else 422,
        attempts=3 if retryable else 1,
        retryable=retryable,
        kept=kept(position) if with_kept else {},
    )


def make_sink(store: OutputStore, kept_columns=tuple(KEPT)) -> ParquetSink:
    return ParquetSink(store, data_schema=DATA_SCHEMA, id_column="key", kept_columns=kept_columns)


def failed_rows(store: OutputStore) -> list[dict]:
    return [r for p in sorted(store.failed_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Kept input columns in failed shards


def test_the_failed_schema_is_the_id_then_the_kept_input_columns_then_the_failure_columns():
    schema = build_failed_schema(DATA_SCHEMA, "key", kept_columns=["lang", "prompt"])
    assert schema.names == ["key", "prompt", "lang", *FAILURE_NAMES]  # in the data schema's order
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert list(features) == schema.names


def test_the_failed_schema_without_kept_columns_is_the_one_older_versions_wrote():
    assert build_failed_schema(DATA_SCHEMA, "key").names == ["key", *FAILURE_NAMES]


def test_only_kept_input_columns_can_be_named_for_failed_shards():
    with pytest.raises(ValueError, match="latency_s"):
        build_failed_schema(DATA_SCHEMA, "key", kept_columns=["prompt", "latency_s"])
    with pytest.raises(ValueError, match="nope"):
        build_failed_schema(DATA_SCHEMA, "key", kept_columns=["nope"])


def test_a_failed_row_is_written_with_its_kept_input_columns(store):
    sink = make_sink(store)
    sink.open()
    sink.add(failure(0, retryable=False))
    sink.close()
    (path,) = store.failed_dir.glob("*.parquet")
    assert pq.read_schema(path).names == ["key", *KEPT, *FAILURE_NAMES]
    (row,) = failed_rows(store)
    assert (row["key"], row["prompt"], row["lang"], row["error_type"]) == ("row-0", "prompt 0", "en", "validation")


def test_a_failure_naming_a_column_the_output_does_not_keep_is_refused(store):
    sink = make_sink(store, kept_columns=["lang"])
    sink.open()
    with pytest.raises(OutputError, match="prompt"):
        sink.add(failure(0, retryable=False))


def test_a_row_that_does_not_fit_the_schema_keeps_its_input_columns_in_its_failure(store):
    sink = make_sink(store)
    sink.open()
    drifted = ok(0)
    drifted.output["prompt_tokens"] = "many"
    sink.add(drifted)
    bad_kept = ok(1)
    bad_kept.kept["lang"] = {"not": "a string"}
    sink.add(bad_kept)
    sink.close()
    rows = {r["key"]: r for r in failed_rows(store)}
    assert rows["row-0"]["error_type"] == "output_schema" and rows["row-0"]["prompt"] == "prompt 0"
    # The value that does not fit is the one left out; the rest of the row's input is kept.
    assert (rows["row-1"]["prompt"], rows["row-1"]["lang"]) == ("prompt 1", None)
    assert "column 'lang'" in rows["row-1"]["error"]


def test_a_failed_shard_written_without_kept_columns_is_still_counted_on_resume(store):
    old = make_sink(store, kept_columns=())
    old.open()
    old.add(failure(0, retryable=False, with_kept=False))
    old.close()

    done = make_sink(store).open()
    assert 0 in done and done.failed == 1
    assert read_status(store.root).failed == 1


def test_a_rewritten_older_failed_shard_gets_null_kept_columns(store):
    old = make_sink(store, kept_columns=())
    old.open()
    old.add(failure(0, retryable=True, with_kept=False))
    old.add(failure(1, retryable=False, with_kept=False))
    old.close()

    sink = make_sink(store)
    done = sink.open()
    assert (0 in done, 1 in done) == (False, True)
    assert done.retried_failures == 1
    (path,) = store.failed_dir.glob("*.parquet")
    assert pq.read_schema(path).names == ["key", *KEPT, *FAILURE_NAMES]
    (row,) = failed_rows(store)
    assert (row["key"], row["prompt"], row["lang"]) == ("row-1", None, None)
    sink.add(failure(0, retryable=False))
    sink.close()
    assert sorted(r["key"] for r in failed_rows(store)) == ["row-0", "row-1"]


# --------------------------------------------------------------------------------------------------
# keep_columns is validated once, by preflight


def test_the_data_schema_trusts_keep_columns_and_keeps_those_the_input_has():
    schema = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=["lang", "gone"], output_schema=OUTPUT_SCHEMA)
    assert schema.names[:2] == ["key", "lang"]


# --------------------------------------------------------------------------------------------------
# A full disk


def _full_disk_for_files(monkeypatch) -> None:
    """Every fsync of a regular file fails as on a full disk (the data never reached it)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_summary_that_does_not_fit_on_the_disk_leaves_no_temp_file_and_says_the_disk_is_full(store, monkeypatch):
    store.write_summary({"rows": 1})
    _full_disk_for_files(monkeypatch)
    with pytest.raises(OutputError) as raised:
        store.write_summary({"rows": 2})
    monkeypatch.undo()
    assert str(raised.value) == (
        f"No space left on the disk holding {store.root}: could not write state/summary.json; "
        "free space and run again to resume"
    )
    assert list(store.tmp_dir.iterdir()) == []
    assert store.load_summary() == {"rows": 1}, "the previous summary is left whole"


def test_a_job_file_that_does_not_fit_on_the_disk_names_job_json(store, monkeypatch):
    _full_disk_for_files(monkeypatch)
    with pytest.raises(OutputError, match=r"could not write state/job\.json"):
        store.save_job({"fingerprint": "abc"})
    monkeypatch.undo()
    assert list(store.tmp_dir.iterdir()) == [] and not (store.state_dir / "job.json").exists()


def test_a_shard_that_does_not_fit_on_the_disk_leaves_no_temp_file_nor_sidecar(store, monkeypatch):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(0))
    sink.add(failure(1, retryable=False))
    real_write_table = pq.write_table

    def write_half_then_fill_the_disk(table, where, **kwargs):
        where.write(b"PAR1" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", write_half_then_fill_the_disk)
    with pytest.raises(OutputError, match=r"^No space left on the disk holding .*: could not write data/part-\d+-r1\.parquet"):
        sink.commit()
    assert list(store.tmp_dir.iterdir()) == [] and list(store.positions_dir.iterdir()) == []
    assert list(store.data_dir.iterdir()) == []

    # Once there is space again, the rows still buffered are published, each once.
    monkeypatch.setattr(pq, "write_table", real_write_table)
    sink.close()
    assert [r["key"] for r in pq.read_table(store.data_dir).to_pylist()] == ["row-0"]
    assert [r["key"] for r in failed_rows(store)] == ["row-1"]
    assert list(store.tmp_dir.iterdir()) == []


def test_other_write_errors_keep_the_system_s_words_and_name_the_file(store, monkeypatch):
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputError, match=r"cannot write state/summary\.json in .*Input/output error"):
        store.write_summary({"rows": 2})
    monkeypatch.undo()
    assert list(store.tmp_dir.iterdir()) == []


def test_scalar_columns_get_the_features_datasets_derives_without_importing_it():
    import pyarrow as pa
    from datasets import Features

    from batchrun.output.schema import _VALUE_DTYPES, features_dict

    schema = pa.schema([pa.field(f"c{i}", type_) for i, type_ in enumerate(_VALUE_DTYPES)])
    assert features_dict(schema) == Features.from_arrow_schema(schema).to_dict()
    # A nested or dated column, or features the schema declares, still go through datasets itself.
    for other in (pa.list_(pa.string()), pa.struct([("a", pa.int64())]), pa.timestamp("s"), pa.date32()):
        mixed = pa.schema([pa.field("text", pa.string()), pa.field("other", other)])
        assert features_dict(mixed) == Features.from_arrow_schema(mixed).to_dict()
    image = Features.from_dict({"text": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}})
    declared = image.arrow_schema
    assert features_dict(declared)["image"] == {"_type": "Image"}


def test_the_fixed_columns_features_are_the_ones_datasets_derives():
    import pyarrow as pa
    from datasets import Features

    from batchrun.output.schema import _FIXED_FEATURES, BOOKKEEPING_COLUMNS, FAILED_COLUMNS

    for columns in (FAILED_COLUMNS, BOOKKEEPING_COLUMNS):
        derived = Features.from_arrow_schema(pa.schema(list(columns))).to_dict()
        assert derived == {field.name: _FIXED_FEATURES[field.name] for field in columns}


def test_the_shards_of_an_output_are_read_while_another_shard_removes_its_probe_folders(tmp_path, monkeypatch):
    # Shards of a new job start together: one's writability probe makes state/shards/ and removes it again,
    # while another lists it to find the job a sibling saved. A folder gone between the look and the listing
    # holds no shard (it used to stop that run with an internal error).
    shards = tmp_path / "out" / "state" / "shards"
    (shards / "shard-00001-of-00004").mkdir(parents=True)
    assert OutputStore.shard_names(tmp_path / "out") == ["shard-00001-of-00004"]
    listed = Path.iterdir

    def vanishing(self: Path):
        if self == shards:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", vanishing)
    assert OutputStore.shard_names(tmp_path / "out") == []
    assert OutputStore(tmp_path / "out", "shard-00000-of-00004").sibling_job() is None
