"""The sink keeps reliability.md §1: every input row ends in exactly one place, and only closed files count."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import OutputError, register_secret
from batchrun.output import (
    FAILED_COLUMNS,
    DoneSet,
    OutputStore,
    ParquetSink,
    build_data_schema,
    read_status,
)
from batchrun.records import RowFailure, RowResult

INPUT_SCHEMA = pa.schema([("key", pa.string()), ("prompt", pa.string()), ("lang", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("generated_text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)
DATA_SCHEMA = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=None, output_schema=OUTPUT_SCHEMA)


def row_id(position: int) -> str:
    return f"row-{position:06d}"


def ok(position: int, *, text: str | None = "hello", lang: str | None = "en") -> RowResult:
    return RowResult(
        position=position,
        id=row_id(position),
        kept={"prompt": f"prompt {position}", "lang": lang},
        output={"generated_text": text, "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 5},
        latency_s=0.25,
        attempts=1,
    )


def failure(position: int, *, retryable: bool) -> RowFailure:
    return RowFailure(
        position=position,
        id=row_id(position),
        error_type="http_503" if retryable else "validation",
        error="Service Unavailable" if retryable else "Input validation error: `inputs` cannot be empty",
        status=503 if retryable else 422,
        attempts=3 if retryable else 1,
        retryable=retryable,
    )


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(tmp_path / "out")


def make_sink(store: OutputStore, **kwargs) -> ParquetSink:
    return ParquetSink(store, data_schema=DATA_SCHEMA, id_column="key", **kwargs)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def ids_in(folder: Path) -> list[str]:
    return [i for path in shards(folder) for i in pq.read_table(path).column("key").to_pylist()]


def manifest_events(store: OutputStore) -> list[dict]:
    return [json.loads(line) for line in store.manifest_path.read_text().splitlines() if line.strip()]


def abandon(sink: ParquetSink) -> None:
    """What a SIGKILL leaves behind: buffered rows are lost, nothing is committed on the way out."""
    sink._manifest.close()
    sink._manifest = None


# --------------------------------------------------------------------------------------------------
# Schemas


def test_data_schema_puts_id_then_kept_input_then_output_then_latency_and_attempts():
    assert DATA_SCHEMA.names == [
        "key", "prompt", "lang", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens",
        "latency_s", "attempts",
    ]  # fmt: skip
    assert DATA_SCHEMA.field("latency_s").type == pa.float64()
    assert DATA_SCHEMA.field("attempts").type == pa.int32()
    features = json.loads(DATA_SCHEMA.metadata[b"huggingface"])["info"]["features"]
    assert list(features) == DATA_SCHEMA.names


def test_data_schema_without_an_id_column_generates_an_int64_id_and_keeps_only_listed_columns():
    schema = build_data_schema(INPUT_SCHEMA, id_column=None, keep_columns=["lang"], output_schema=OUTPUT_SCHEMA)
    assert schema.names[:2] == ["id", "lang"]
    assert schema.field("id").type == pa.int64()


def test_data_schema_never_holds_the_id_column_twice():
    schema = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=["key", "lang"], output_schema=OUTPUT_SCHEMA)
    assert schema.names[:2] == ["key", "lang"]


def test_a_kept_column_clashing_with_an_output_column_is_refused_with_a_way_out():
    clashing = INPUT_SCHEMA.append(pa.field("generated_text", pa.string()))
    with pytest.raises(OutputError, match="generated_text.*keep_columns"):
        build_data_schema(clashing, id_column="key", keep_columns=None, output_schema=OUTPUT_SCHEMA)


def test_failed_shards_hold_the_id_column_then_the_failure_columns(store):
    sink = make_sink(store)
    sink.open()
    sink.add(failure(0, retryable=False))
    sink.close()
    (path,) = shards(store.failed_dir)
    schema = pq.read_schema(path)
    assert schema.names == ["key", *(f.name for f in FAILED_COLUMNS)]
    assert schema.field("status").type == pa.int32()
    assert schema.field("retryable").type == pa.bool_()


# --------------------------------------------------------------------------------------------------
# Publication


def test_shards_are_only_visible_once_committed(store):
    sink = make_sink(store)
    sink.open()
    for position in range(5):
        sink.add(ok(position))
    sink.add(failure(5, retryable=False))
    assert shards(store.data_dir) == [] and shards(store.failed_dir) == []
    sink.commit()
    assert len(shards(store.data_dir)) == 1 and len(shards(store.failed_dir)) == 1
    assert list(store.tmp_dir.iterdir()) == []
    sink.close()


def test_every_published_shard_is_readable_and_listed_in_the_manifest(store):
    sink = make_sink(store, shard_rows=4)
    sink.open()
    for position in range(10):
        sink.add(ok(position) if position % 3 else failure(position, retryable=False))
    sink.close()
    listed = {e["file"] for e in manifest_events(store) if e["op"] == "publish"}
    on_disk = {p.relative_to(store.root).as_posix() for p in shards(store.data_dir) + shards(store.failed_dir)}
    assert listed == on_disk
    for relative in on_disk:
        assert pq.read_table(store.root / relative).num_rows > 0
    assert sorted(ids_in(store.data_dir) + ids_in(store.failed_dir)) == [row_id(p) for p in range(10)]
    assert sink.counters.ok == 6 and sink.counters.failed == 4


def test_shard_names_never_collide_across_runs(store):
    for run in range(2):
        sink = make_sink(store)
        sink.open()
        sink.add(ok(run))
        sink.close()
    names = [p.name for p in shards(store.data_dir)]
    assert names == ["part-00000-r1.parquet", "part-00001-r2.parquet"]


def test_shards_rotate_by_rows(store):
    sink = make_sink(store, shard_rows=10)
    sink.open()
    for position in range(35):
        sink.add(ok(position))
    assert [pq.read_metadata(p).num_rows for p in shards(store.data_dir)] == [10, 10, 10]
    sink.close()
    assert [pq.read_metadata(p).num_rows for p in shards(store.data_dir)] == [10, 10, 10, 5]


def test_shards_rotate_by_bytes(store):
    sink = make_sink(store, shard_bytes=10_000)
    sink.open()
    for position in range(50):
        sink.add(ok(position, text="x" * 1000))
    sink.close()
    sizes = [pq.read_metadata(p).num_rows for p in shards(store.data_dir)]
    assert sum(sizes) == 50
    assert len(sizes) >= 5 and max(sizes) <= 10


def test_rows_that_do_not_fit_the_schema_are_refused(store):
    sink = make_sink(store)
    sink.open()
    bad = RowResult(position=0, id="a", kept={}, output={"surprise": 1}, latency_s=0.1, attempts=1)
    with pytest.raises(OutputError, match="surprise"):
        sink.add(bad)
    assert 0 not in sink.done


def test_a_position_recorded_twice_is_refused(store):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(7))
    with pytest.raises(OutputError, match="position 7"):
        sink.add(failure(7, retryable=False))


# --------------------------------------------------------------------------------------------------
# Loading with datasets


def test_datasets_loads_all_shards_as_one_with_consistent_types_even_when_a_column_is_all_null(store, tmp_path):
    datasets = pytest.importorskip("datasets")
    sink = make_sink(store, shard_rows=3)
    sink.open()
    for position in range(3):  # the first shard's text and lang are all null
        sink.add(ok(position, text=None, lang=None))
    for position in range(3, 7):
        sink.add(ok(position))
    sink.close()
    assert len(shards(store.data_dir)) == 3
    assert pq.read_schema(shards(store.data_dir)[0]).field("generated_text").type == pa.string()

    ds = datasets.load_dataset(
        "parquet", data_files=str(store.data_dir / "*.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds.num_rows == 7
    assert ds.features["generated_text"] == datasets.Value("string")
    assert ds.features["attempts"] == datasets.Value("int32")
    assert sorted(ds["key"]) == [row_id(p) for p in range(7)]


def test_an_image_column_declared_in_the_schema_is_decoded_by_datasets_as_an_image(tmp_path):
    datasets = pytest.importorskip("datasets")
    PIL = pytest.importorskip("PIL.Image")
    png = io.BytesIO()
    PIL.new("RGB", (3, 2), (255, 0, 0)).save(png, format="PNG")

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    output_schema = pa.schema(
        [pa.field("image", image_type)],
        metadata={"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})},
    )
    schema = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=["prompt"], output_schema=output_schema)
    store = OutputStore(tmp_path / "out")
    sink = ParquetSink(store, data_schema=schema, id_column="key")
    sink.open()
    sink.add(
        RowResult(
            position=0, id="a", kept={"prompt": "a red square"},
            output={"image": {"bytes": png.getvalue(), "path": None}}, latency_s=1.0, attempts=1,
        )
    )  # fmt: skip
    sink.close()

    ds = datasets.load_dataset(
        "parquet", data_files=str(store.data_dir / "*.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (3, 2)


# --------------------------------------------------------------------------------------------------
# Resume


def test_reopening_builds_the_done_set_from_the_manifest(store):
    sink = make_sink(store, shard_rows=4)
    sink.open()
    for position in range(10):
        sink.add(ok(position))
    sink.add(failure(10, retryable=False))
    sink.close()

    done = make_sink(store).open()
    assert all(p in done for p in range(11))
    assert 11 not in done and 10_000 not in done
    assert (done.ok, done.failed, done.retried_failures) == (10, 1, 0)


def test_retryable_failures_are_reopened_and_permanent_ones_kept(store):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(0))
    sink.add(failure(1, retryable=True))
    sink.add(failure(2, retryable=False))
    sink.add(failure(3, retryable=True))
    sink.close()
    (old,) = shards(store.failed_dir)

    sink = make_sink(store)
    done = sink.open()
    assert 0 in done and 2 in done
    assert 1 not in done and 3 not in done
    assert (done.ok, done.failed, done.retried_failures) == (1, 1, 2)
    assert ids_in(store.failed_dir) == [row_id(2)]
    assert (store.retired_dir / old.name).exists(), "the old shard is kept, not deleted"

    sink.add(ok(1))
    sink.add(failure(3, retryable=False))
    sink.close()
    assert sorted(ids_in(store.data_dir) + ids_in(store.failed_dir)) == [row_id(p) for p in range(4)]


def test_a_failed_shard_of_only_retryable_rows_is_retired_whole(store):
    sink = make_sink(store)
    sink.open()
    sink.add(failure(0, retryable=True))
    sink.close()

    done = make_sink(store).open()
    assert 0 not in done and done.retried_failures == 1
    assert shards(store.failed_dir) == []
    assert len(shards(store.retired_dir)) == 1


def test_reopening_a_finished_output_finds_everything_done(store):
    sink = make_sink(store)
    sink.open()
    for position in range(20):
        sink.add(ok(position))
    sink.close()
    sink = make_sink(store)
    done = sink.open()
    assert all(p in done for p in range(20)) and done.ok == 20
    sink.close()
    assert len(shards(store.data_dir)) == 1, "a run with nothing to do publishes nothing"


def test_a_done_set_for_100_million_positions_stays_small():
    done = DoneSet()
    done.add_many(np.arange(0, 100_000_000, 997, dtype=np.uint64))
    done.add(99_999_999)
    assert 99_999_999 in done and 997 * 5 in done and 1 not in done
    assert done.nbytes <= 100_000_000 // 8 * 1.15  # 12.5 MB and a little growth slack

    # Growing one position at a time stays close to one bit per position too.
    growing = DoneSet()
    for position in range(0, 10_000_000, 4099):
        growing.add(position)
    assert growing.nbytes <= 10_000_000 // 8 * 1.15


# --------------------------------------------------------------------------------------------------
# Crashes


def _publish_rows(store: OutputStore, positions, **kwargs) -> None:
    sink = make_sink(store, **kwargs)
    sink.open()
    for position in positions:
        sink.add(ok(position))
    sink.close()


def test_a_shard_the_manifest_does_not_list_is_moved_aside_and_not_counted(store):
    _publish_rows(store, range(3))
    (published,) = shards(store.data_dir)
    # A crash between the rename and the manifest append leaves exactly this.
    orphan = store.data_dir / "part-00007-r9.parquet"
    orphan.write_bytes(published.read_bytes())

    done = make_sink(store).open()
    assert not orphan.exists()
    assert (store.orphans_dir / orphan.name).exists()
    assert done.ok == 3
    assert shards(store.data_dir) == [published]


@pytest.mark.parametrize("damage", ["zero_bytes", "no_footer", "missing"])
def test_a_listed_shard_that_cannot_be_read_is_not_counted_and_is_redone(store, damage):
    _publish_rows(store, range(3), shard_rows=2)
    first, second = shards(store.data_dir)
    if damage == "zero_bytes":
        first.write_bytes(b"")
    elif damage == "no_footer":
        first.write_bytes(first.read_bytes()[:-20])
    else:
        first.unlink()

    sink = make_sink(store)
    done = sink.open()
    assert 0 not in done and 1 not in done and 2 in done
    assert done.ok == 1
    assert shards(store.data_dir) == [second]
    if damage != "missing":
        assert (store.orphans_dir / first.name).exists()

    sink.add(ok(0))
    sink.add(ok(1))
    sink.close()
    assert sorted(ids_in(store.data_dir)) == [row_id(p) for p in range(3)]
    assert make_sink(store).open().ok == 3, "the damaged shard stays retired"


def test_a_truncated_last_manifest_line_is_ignored(store):
    _publish_rows(store, range(2))
    _publish_rows(store, range(2, 4))
    lines = store.manifest_path.read_bytes().splitlines(keepends=True)
    store.manifest_path.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])

    sink = make_sink(store)
    done = sink.open()
    assert (0 in done, 2 in done) == (True, False)
    assert len(list(store.orphans_dir.glob("*.parquet"))) == 1, "the second run's shard is no longer vouched for"
    sink.add(ok(2))
    sink.add(ok(3))
    sink.close()
    manifest_events(store)  # every line parses again
    assert sorted(ids_in(store.data_dir)) == [row_id(p) for p in range(4)]


def test_a_damaged_manifest_line_before_the_last_is_refused(store):
    _publish_rows(store, range(2))
    _publish_rows(store, range(2, 4))
    lines = store.manifest_path.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"op": "publ\n'
    store.manifest_path.write_bytes(b"".join(lines))
    with pytest.raises(OutputError, match="damaged at line 2"):
        make_sink(store).open()


def test_leftover_temp_files_are_removed_and_never_counted(store):
    _publish_rows(store, range(2))
    leftover = store.tmp_dir / "part-00005-r1.parquet.tmp"
    leftover.write_bytes(b"PAR1 half a shard")
    done = make_sink(store).open()
    assert not leftover.exists()
    assert done.ok == 2


def test_rows_buffered_at_a_crash_are_redone(store):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(0))
    sink.commit()
    sink.add(ok(1))
    abandon(sink)
    done = make_sink(store).open()
    assert 0 in done and 1 not in done


def test_a_crash_after_the_replacement_is_recorded_finishes_the_retirement(store, monkeypatch):
    sink = make_sink(store)
    sink.open()
    sink.add(failure(0, retryable=True))
    sink.add(failure(1, retryable=False))
    sink.close()
    (old,) = shards(store.failed_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while moving the old shard")

    monkeypatch.setattr("batchrun.output.sink.move_aside", crash)
    with pytest.raises(KeyboardInterrupt):
        make_sink(store).open()
    monkeypatch.undo()
    assert old.exists() and len(shards(store.failed_dir)) == 2  # both, for a moment

    done = make_sink(store).open()
    assert (store.retired_dir / old.name).exists()
    assert ids_in(store.failed_dir) == [row_id(1)]
    assert (0 in done, 1 in done) == (False, True)


def test_a_crash_before_the_replacement_is_recorded_retries_the_retirement(store, monkeypatch):
    sink = make_sink(store)
    sink.open()
    sink.add(failure(0, retryable=True))
    sink.add(failure(1, retryable=False))
    sink.close()
    (old,) = shards(store.failed_dir)

    real_append = ParquetSink._append

    def append_or_crash(self, event):
        if event.get("replaces"):
            raise KeyboardInterrupt("killed before the manifest line")
        real_append(self, event)

    monkeypatch.setattr(ParquetSink, "_append", append_or_crash)
    with pytest.raises(KeyboardInterrupt):
        make_sink(store).open()
    monkeypatch.undo()

    done = make_sink(store).open()
    assert (0 in done, 1 in done) == (False, True)
    assert done.failed == 1 and done.retried_failures == 1
    assert ids_in(store.failed_dir) == [row_id(1)]
    assert (store.retired_dir / old.name).exists()
    assert len(list(store.orphans_dir.glob("*.parquet"))) == 1, "the unrecorded replacement was set aside"


def test_a_shard_with_another_schema_is_refused(store):
    _publish_rows(store, range(2))
    other = build_data_schema(INPUT_SCHEMA, id_column="key", keep_columns=["lang"], output_schema=OUTPUT_SCHEMA)
    with pytest.raises(OutputError, match="other columns than this job writes") as refused:
        ParquetSink(store, data_schema=other, id_column="key").open()
    assert "which this job does not write" in str(refused.value)
    assert "schema metadata" not in str(refused.value)  # said in words, not as Arrow schema dumps


# --------------------------------------------------------------------------------------------------
# The output folder


def test_set_aside_renames_the_folder_and_never_deletes(store):
    _publish_rows(store, range(3))
    before = {p.relative_to(store.root) for p in store.root.rglob("*")}
    first = store.set_aside()
    assert not store.root.exists()
    assert first.name.startswith("out.previous-")
    assert {p.relative_to(first) for p in first.rglob("*")} == before

    _publish_rows(store, range(1))
    second = store.set_aside()  # twice in the same second still keeps both
    assert first.exists() and second.exists() and first != second


def test_exists_tells_a_new_folder_from_a_previous_run(store):
    assert not store.exists()
    store.check_writable()
    assert not store.exists()
    _publish_rows(store, range(1))
    assert store.exists()


def test_check_writable_leaves_nothing_behind_when_it_fails(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = OutputStore(blocker / "out")
    with pytest.raises(OutputError, match="not writable"):
        store.check_writable()

    nested = OutputStore(tmp_path / "x" / "y" / "out")
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # running as root: permissions do not stop us
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(OutputError, match=str(nested.root)):
            nested.check_writable()
    finally:
        os.chmod(tmp_path, 0o700)
    assert not (tmp_path / "x").exists()


def test_check_writable_on_a_fresh_path_leaves_nothing_behind(tmp_path):
    store = OutputStore(tmp_path / "x" / "y" / "out")
    store.check_writable()
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []


def test_check_writable_raced_by_another_process_creating_and_removing_the_folders(tmp_path, monkeypatch):
    # Shards start together on one output: a folder seen missing may exist by the time of our mkdir,
    # and one another prober created may be gone before our mkdir inside it. Neither is "not writable".
    store = OutputStore(tmp_path / "out")
    real_mkdir = Path.mkdir
    raced: list[str] = []

    def racing_mkdir(self: Path, *args, **kwargs):
        if self == store.root and "created" not in raced:  # another process creates it first
            real_mkdir(self)
            raced.append("created")
        elif self == store.state_dir and "removed" not in raced:  # ... and removes it after its probe
            store.root.rmdir()
            raced.append("removed")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    store.check_writable()
    assert raced == ["created", "removed"]


def test_check_writable_on_an_existing_output_removes_nothing_and_leaves_no_probe(store):
    _publish_rows(store, range(3))
    store.write_summary({"ok": 3})
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    store.check_writable()
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before

    # An existing folder without state/ keeps the folder; only the state/ the probe made goes.
    bare = OutputStore(store.root.parent / "bare")
    bare.root.mkdir()
    bare.check_writable()
    assert bare.root.is_dir() and list(bare.root.iterdir()) == []


def test_job_and_summary_are_saved_atomically_without_secrets(store, monkeypatch):
    monkeypatch.setattr("batchrun.errors._SECRETS", set())  # the canary must not outlive this test
    register_secret("hf_canary_NOT_REAL_token")
    store.check_writable()
    assert store.load_job() is None
    store.save_job({"model": "m", "note": "token hf_canary_NOT_REAL_token leaked"})
    store.write_summary({"ok": 3})
    assert store.load_job() == {"model": "m", "note": "token *** leaked"}
    assert json.loads((store.state_dir / "summary.json").read_text()) == {"ok": 3}
    assert "hf_canary" not in (store.state_dir / "job.json").read_text()
    assert list(store.tmp_dir.iterdir()) == []


def test_read_status_counts_from_the_folder_and_changes_nothing(store):
    sink = make_sink(store, shard_rows=3)
    sink.open()
    for position in range(5):
        sink.add(ok(position))
    sink.add(failure(5, retryable=True))
    sink.add(failure(6, retryable=False))
    sink.close()
    store.write_summary({"ok": 5})
    stray = store.data_dir / "part-09999-r9.parquet"
    stray.write_bytes(shards(store.data_dir)[0].read_bytes())
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))

    status = read_status(store.root)
    assert (status.ok, status.failed, status.failed_retryable) == (5, 1, 1)
    assert (status.data_shards, status.failed_shards) == (2, 1)
    assert status.last_summary == {"ok": 5} and status.job is None
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before


def test_read_status_of_a_folder_not_yet_written_reports_nothing_and_creates_nothing(tmp_path):
    status = read_status(tmp_path / "nowhere")
    assert (status.ok, status.failed, status.data_shards, status.job) == (0, 0, 0, None)
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------------------------------
# The promise, end to end


@pytest.mark.parametrize("seed", range(6))
def test_any_interleaving_of_results_failures_commits_and_crashes_ends_with_every_position_exactly_once(store, seed):
    rng = random.Random(seed)
    total = 200
    for cycle in range(30):
        sink = make_sink(store, shard_rows=rng.choice([3, 7, 50]))
        done = sink.open()
        todo = [p for p in range(total) if p not in done]
        if not todo:
            sink.close()
            break
        rng.shuffle(todo)
        crash_at = rng.randrange(len(todo) + 1) if rng.random() < 0.4 else None
        # Late cycles stop producing retryable failures so that the job can finish.
        retry_rate = 0.2 if cycle < 10 else 0.0
        for index, position in enumerate(todo):
            if index == crash_at:
                break
            roll = rng.random()
            if roll < retry_rate:
                sink.add(failure(position, retryable=True))
            elif roll < retry_rate + 0.1:
                sink.add(failure(position, retryable=False))
            else:
                sink.add(ok(position))
            if rng.random() < 0.05:
                sink.commit()
        if crash_at is None:
            sink.close()
            continue
        abandon(sink)
        # Sometimes the crash lands mid-append: the manifest's last line is cut short, and a
        # half-written temp file is left behind. (This cuts lines a real crash could not, such as a
        # retirement already acted on; the promise must hold even then.)
        if rng.random() < 0.3:
            raw = store.manifest_path.read_bytes().rstrip(b"\n")
            store.manifest_path.write_bytes(raw[: rng.randrange(raw.rfind(b"\n") + 2, len(raw))])
            (store.tmp_dir / f"part-{cycle:05d}-crash.parquet.tmp").write_bytes(b"PAR1")
    else:
        pytest.fail("the job never finished")

    every_id = ids_in(store.data_dir) + ids_in(store.failed_dir)
    assert sorted(every_id) == [row_id(p) for p in range(total)]
    status = read_status(store.root)
    assert status.ok + status.failed == total and status.failed_retryable == 0


# --------------------------------------------------------------------------------------------------
# A publication that fails part-way


def _fail_manifest_fsync(monkeypatch, sink: ParquetSink) -> None:
    """Make the fsync of the manifest raise, as a full or failing disk would: the line is already written."""
    real_fsync = os.fsync

    def fsync(fd):
        if sink._manifest is not None and fd == sink._manifest.fileno():
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_manifest_fsync_failure_never_publishes_the_same_rows_twice(store, monkeypatch):
    sink = make_sink(store)
    sink.open()
    for position in range(4):
        sink.add(ok(position))
    _fail_manifest_fsync(monkeypatch, sink)
    with pytest.raises(OutputError, match="run the job again"):
        sink.commit()
    monkeypatch.undo()

    # What the runner does next: more rows, more commits, a close. None of them may write anything.
    with pytest.raises(OutputError, match="could not be committed.*run the job again"):
        sink.add(ok(4))
    with pytest.raises(OutputError, match="could not be committed"):
        sink.commit()
    with pytest.raises(OutputError, match="could not be committed"):
        sink.close()
    assert len(shards(store.data_dir)) == 1
    assert ids_in(store.data_dir) == [row_id(p) for p in range(4)]

    # The line made it whole: the next run counts the shard and redoes only the rest.
    sink = make_sink(store)
    done = sink.open()
    assert done.ok == 4 and 4 not in done
    sink.add(ok(4))
    sink.close()
    assert sorted(ids_in(store.data_dir)) == [row_id(p) for p in range(5)]


def test_a_manifest_line_torn_by_a_failed_append_leaves_every_position_exactly_once(store, monkeypatch):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(0))
    sink.commit()
    for position in range(1, 4):
        sink.add(ok(position))

    def torn_append(self, event):
        line = json.dumps(event, separators=(",", ":")).encode()
        with open(self.store.manifest_path, "ab") as manifest:
            manifest.write(line[: len(line) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ParquetSink, "_append", torn_append)
    with pytest.raises(OutputError, match="run the job again"):
        sink.commit()
    monkeypatch.undo()
    with pytest.raises(OutputError, match="could not be committed"):
        sink.close()
    assert len(shards(store.data_dir)) == 2, "the shard was renamed into place before the append failed"

    sink = make_sink(store)
    done = sink.open()
    assert 0 in done and not any(p in done for p in range(1, 4))
    assert len(list(store.orphans_dir.glob("*.parquet"))) == 1, "the shard its torn line did not vouch for"
    for position in range(1, 4):
        sink.add(ok(position))
    sink.close()
    manifest_events(store)  # every line parses again
    assert sorted(ids_in(store.data_dir)) == [row_id(p) for p in range(4)]


def test_a_failure_before_the_rename_keeps_the_buffer_for_the_next_commit(store, monkeypatch):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(0))

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OutputError, match=r"No space left on the disk holding .*: could not write data/part-"):
        sink.commit()
    monkeypatch.undo()
    assert shards(store.data_dir) == []
    assert list(store.tmp_dir.iterdir()) == [] and list(store.positions_dir.iterdir()) == []

    sink.add(ok(1))
    sink.close()
    assert ids_in(store.data_dir) == [row_id(0), row_id(1)]
    assert make_sink(store).open().ok == 2


# --------------------------------------------------------------------------------------------------
# Rows that do not fit the schema


def test_a_row_whose_value_does_not_fit_its_column_becomes_a_permanent_failure_and_the_rest_are_published(store):
    sink = make_sink(store)
    sink.open()
    sink.add(ok(0))
    drifted = dataclasses.replace(ok(1), attempts=2)
    drifted.output["generated_text"] = {"text": "hello"}  # a dict where strings were inferred
    sink.add(drifted)
    sink.add(ok(2))
    sink.close()

    assert ids_in(store.data_dir) == [row_id(0), row_id(2)]
    (failed,) = shards(store.failed_dir)
    (row,) = pq.read_table(failed).to_pylist()
    assert row["key"] == row_id(1)
    assert row["error_type"] == "output_schema"
    assert "column 'generated_text': expected string, got dict" in row["error"]
    assert (row["status"], row["attempts"], row["retryable"]) == (None, 2, False)
    assert (sink.counters.ok, sink.counters.failed) == (2, 1)

    done = make_sink(store).open()
    assert all(p in done for p in range(3)), "the job can finish: the row is not redone forever"
    assert (done.ok, done.failed, done.retried_failures) == (2, 1, 0)


def test_an_integer_too_large_for_its_column_fails_only_its_row(store):
    sink = make_sink(store)
    sink.open()
    big = ok(0)
    big.output["prompt_tokens"] = 2**70
    sink.add(big)
    sink.add(ok(1))
    sink.add(failure(2, retryable=False))
    sink.close()
    assert ids_in(store.data_dir) == [row_id(1)]
    rows = {r["key"]: r for p in shards(store.failed_dir) for r in pq.read_table(p).to_pylist()}
    assert set(rows) == {row_id(0), row_id(2)}
    assert rows[row_id(0)]["error_type"] == "output_schema"
    assert "column 'prompt_tokens'" in rows[row_id(0)]["error"]
    assert rows[row_id(2)]["error_type"] == "validation"
