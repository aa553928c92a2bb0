"""Smaller checks on what goes into an output and what counts as in it.

- a change of kept columns is refused in words, like every other change;
- Parquet inputs that differ only in string/large_string (binary/large_binary) are one input;
- a token count that is not a count (negative, fractional) is unknown, never summed;
- a shard whose pages were changed after it was published is not counted, and a resume redoes it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobkit import NS, TOKEN, data_requests, emulator, read_ids, read_rows, run, running_endpoint, write_spec

from batchrun.cli import main
from batchrun.errors import ConfigMismatchError
from batchrun.output import read_status
from batchrun.records import RowResult
from batchrun.stop import Stop
from batchrun.tally import FailureWatch, Tally
from batchrun.tasks.base import header_int, optional_int
from batchrun.tasks.text import parse_chat_completion


def _input(path: Path, n: int, *, large: bool = False, start: int = 0) -> Path:
    string, binary = (pa.large_string(), pa.large_binary()) if large else (pa.string(), pa.binary())
    table = pa.table({
        "id": pa.array([f"row-{i:03d}" for i in range(start, start + n)], string),
        "topic": pa.array([f"topic number {i}" for i in range(start, start + n)], string),
        "blob": pa.array([bytes([i % 256]) * 3 for i in range(start, start + n)], binary),
        "tags": pa.array([[f"t{i}"] for i in range(start, start + n)], pa.list_(string)),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# -- keep_columns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["recorded", "older-output"])
def test_a_keep_columns_change_is_refused_in_words_like_any_other_change(tmp_path, monkeypatch, legacy):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = _input(tmp_path / "in" / "a.parquet", 10)
    with emulator(running_endpoint()) as emu:
        url = emu.endpoint_url(NS, "gen")
        first = write_spec(tmp_path, endpoint={"url": url}, input_path=source,
                           input={"keep_columns": ["topic", "blob"]})
        outcome, lines = run(first)
        assert outcome.exit_code == 0, lines
        job_file = tmp_path / "out" / "job" / "state" / "job.json"
        job = json.loads(job_file.read_text())
        assert job["kept_columns"] == ["topic", "blob"]
        if legacy:  # written before job.json recorded the kept columns
            del job["kept_columns"]
            job_file.write_text(json.dumps(job))
        changed = write_spec(tmp_path, endpoint={"url": url}, input_path=source, input={"keep_columns": ["topic"]})
        with pytest.raises(ConfigMismatchError) as refused:
            run(changed)
        assert data_requests(emu) == 10  # nothing more was sent
    message = str(refused.value)
    assert "kept input columns (['topic', 'blob'] -> ['topic']; input.keep_columns)" in message
    assert "--fresh" in message and "schema" not in message and "large_string" not in message
    assert refused.value.exit_code == 2
    # validate says the same before anything runs.
    assert main(["validate", str(changed)]) == 2


def test_the_same_keep_columns_in_another_order_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = _input(tmp_path / "in" / "a.parquet", 10)
    with emulator(running_endpoint()) as emu:
        url = emu.endpoint_url(NS, "gen")
        run(write_spec(tmp_path, endpoint={"url": url}, input_path=source, input={"keep_columns": ["topic", "blob"]}))
        again, _ = run(write_spec(tmp_path, endpoint={"url": url}, input_path=source,
                                  input={"keep_columns": ["blob", "topic"]}))
    assert again.exit_code == 0 and again.summary["rows"]["skipped"] == 10


# -- string and large_string -----------------------------------------------------------------------


def test_parquet_files_differing_only_in_string_width_are_one_input(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _input(tmp_path / "in" / "a.parquet", 6)
    _input(tmp_path / "in" / "b.parquet", 6, large=True, start=6)
    _input(tmp_path / "in" / "c.parquet", 6, start=12)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=tmp_path / "in")
        assert main(["validate", str(spec)]) == 0
        outcome, lines = run(spec)
    assert outcome.exit_code == 0, lines
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert sorted(r["id"] for r in rows) == [f"row-{i:03d}" for i in range(18)]
    by_id = {r["id"]: r for r in rows}
    assert by_id["row-007"]["blob"] == bytes([7]) * 3 and by_id["row-013"]["tags"] == ["t13"]
    schema = pq.read_schema(next((tmp_path / "out" / "job" / "data").glob("*.parquet")))
    assert schema.field("topic").type == pa.large_string() and schema.field("blob").type == pa.large_binary()


def test_parquet_files_of_other_types_are_still_refused(tmp_path):
    from batchrun.errors import InputError
    from batchrun.sources import open_source
    from batchrun.spec import InputSpec

    _input(tmp_path / "in" / "a.parquet", 3)
    pq.write_table(pa.table({"id": ["x"], "topic": [1], "blob": [b""], "tags": [["t"]]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(InputError, match="different columns or types"):
        open_source(InputSpec(kind="parquet", path=str(tmp_path / "in"), id_column="id"))


# -- token counts ----------------------------------------------------------------------------------


def _chat(usage: dict) -> bytes:
    return json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": usage}).encode()


@pytest.mark.parametrize("bad", [-5, -1, 2.5, 1e3, True, "12", 2**64])
def test_a_token_count_that_is_not_a_count_is_unknown(bad):
    answer = parse_chat_completion(200, {}, _chat({"prompt_tokens": bad, "completion_tokens": bad}))
    assert answer["prompt_tokens"] is None and answer["completion_tokens"] is None
    assert optional_int(bad) is None


def test_a_negative_token_count_is_never_summed():
    answer = parse_chat_completion(200, {"x-prompt-tokens": "-3"}, _chat({"completion_tokens": -40}))
    assert answer["prompt_tokens"] is None and answer["completion_tokens"] is None
    assert header_int({"x-generated-tokens": "-1"}, "x-generated-tokens") is None
    assert header_int({"x-generated-tokens": "7"}, "x-generated-tokens") == 7
    tally = Tally(stop=Stop(), watch=FailureWatch(None))
    tally.count(RowResult(0, "a", {}, answer, 0.1, 1))
    tally.count(RowResult(1, "b", {}, {**answer, "completion_tokens": 5}, 0.1, 1))
    assert tally.output_tokens == 5
    assert optional_int(0) == 0 and optional_int(12) == 12


# -- a shard whose pages changed after it was published --------------------------------------------


def _corrupt_a_page(path: Path) -> None:
    """Overwrite bytes just after the magic number (the first page header): the footer still reads."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(b"\xff" * 64)
    assert path.stat().st_size == size
    assert pq.ParquetFile(path).metadata.num_rows > 0  # the footer reads...
    with pytest.raises(OSError):
        pq.read_table(path)  # ...the pages do not


def test_a_shard_whose_pages_are_corrupt_is_not_counted_and_is_redone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = _input(tmp_path / "in" / "a.parquet", 30)
    out = tmp_path / "out" / "job"
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=source,
                          output={"shard_rows": 10})
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        shards = sorted((out / "data").glob("*.parquet"))
        assert len(shards) == 3
        _corrupt_a_page(shards[1])
        assert read_status(out).ok == 20  # what status counts: the two shards that read
        capsys.readouterr()
        assert main(["status", str(spec)]) == 0
        assert "ok: 20 rows" in capsys.readouterr().out
        again, lines = run(spec)  # the resume redoes the corrupt shard's 10 rows, and only those
        assert data_requests(emu) == 40
    assert again.exit_code == 0, lines
    assert again.summary["rows"]["ok"] == 10 and again.summary["rows"]["total_ok"] == 30
    ids = read_ids(out / "data")
    assert Counter(ids) == Counter(f"row-{i:03d}" for i in range(30))  # each once, every file readable
    assert not shards[1].exists() and list((out / "state" / "orphans").glob("*.parquet"))


def test_a_shard_copied_elsewhere_keeps_counting(tmp_path, monkeypatch):
    """A new modification time alone (a copy) costs a checksum read, not the rows."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = _input(tmp_path / "in" / "a.parquet", 20)
    out = tmp_path / "out" / "job"
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=source,
                          output={"shard_rows": 10})
        run(spec)
        for shard in (out / "data").glob("*.parquet"):
            os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
        assert read_status(out).ok == 20
        again, _ = run(spec)
        assert data_requests(emu) == 20
    assert again.exit_code == 0 and again.summary["rows"]["total_ok"] == 20
