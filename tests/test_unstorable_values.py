"""A value the output cannot store fails (or is mended in) its own row, never the commit; a commit
that fails anyway stops dispatch at once, and the job still ends with its summary and its reason.

A lone UTF-16 surrogate (JSON's ``"\\ud83d"``, what JavaScript writes when it cuts an emoji in half)
is valid JSON, yet UTF-8, and so Parquet, has no encoding for it: batchrun stores U+FFFD in its place.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from jobkit import NS, TOKEN, data_requests, emulator, read_rows, run, running_endpoint, write_spec, write_topics

from batchrun.cli import main
from batchrun.emulator import textgen
from batchrun.emulator.replies import tgi_error
from batchrun.emulator.tgi import Invalid, TgiModel
from batchrun.output import ParquetSink

HALF_EMOJI = "\ud83d"  # a lone high surrogate
FFFD = "\ufffd"


def _jsonl_with_half_emoji(path: Path, n: int, bad: set[int]) -> Path:
    """A JSONL input of ``n`` rows whose ``topic`` in the ``bad`` rows ends with an escaped lone surrogate."""
    lines = []
    for i in range(n):
        topic = f"topic number {i}" + (HALF_EMOJI if i in bad else "")
        lines.append(json.dumps({"id": f"row-{i:03d}", "topic": topic}))  # ensure_ascii: "\ud83d" as an escape
    path.write_text("\n".join(lines) + "\n")
    assert "\\ud83d" in path.read_text()
    return path


def test_an_input_row_with_a_lone_surrogate_is_reported_by_validate_and_kept_with_fffd(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = _jsonl_with_half_emoji(tmp_path / "in.jsonl", 12, bad={3, 8})
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=source,
                          input={"parquet": None, "jsonl": str(source), "id_column": "id", "keep_columns": ["topic"]},
                          output={"path": str(tmp_path / "out"), "shard_rows": 40})
        assert main(["validate", str(spec)]) == 0
        said = capsys.readouterr().out
        assert "2 input row(s) hold strings UTF-8 cannot store" in said
        assert f"id 'row-003' ({source}, line 4)" in said and f"id 'row-008' ({source}, line 9)" in said
        outcome, lines = run(spec)
    assert outcome.exit_code == 0, lines
    assert any("2 input row(s)" in line for line in lines)
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "data")}
    assert len(rows) == 12 and outcome.summary["rows"]["total_failed"] == 0
    assert rows["row-003"]["topic"] == f"topic number 3{FFFD}"
    assert rows["row-004"]["topic"] == "topic number 4"


def test_an_answer_with_a_lone_surrogate_is_kept_with_fffd_and_the_job_ends_normally(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    real = textgen.generate

    def half_emoji_at_the_end(*args, **kwargs):  # what a server that cut an emoji in half sends
        g = real(*args, **kwargs)
        return textgen.Generation(g.text + HALF_EMOJI, [*g.tokens, HALF_EMOJI], g.finish_reason)

    monkeypatch.setattr(textgen, "generate", half_emoji_at_the_end)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 30))
        outcome, lines = run(spec, commit_interval_s=0.0)
        sent = data_requests(emu)
    assert outcome.exit_code == 0, lines
    assert sent == 30
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 30  # every paid answer kept
    assert all(r["generated_text"].endswith(FFFD) and len(r["generated_text"]) > 1 for r in rows)
    assert outcome.summary["rows"]["total_ok"] == 30 and outcome.summary["rows"]["total_failed"] == 0
    # A rerun finds every row done and sends nothing.
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=tmp_path / "in.parquet")
        again, _ = run(spec)
        assert data_requests(emu) == 0
    assert again.exit_code == 0


def test_a_server_error_text_with_a_lone_surrogate_becomes_a_failure_row(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    real = TgiModel.prepare_chat

    async def refuse_some(self, payload):
        if "topic number 7." in json.dumps(payload):
            raise Invalid(tgi_error(422, "validation", f"Input validation error: bad emoji {HALF_EMOJI}"))
        return await real(self, payload)

    monkeypatch.setattr(TgiModel, "prepare_chat", refuse_some)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 20))
        outcome, lines = run(spec, commit_interval_s=0.0)
    assert outcome.exit_code == 1, lines  # finished, with one failed row
    failed = read_rows(tmp_path / "out" / "job" / "failed")
    assert [r["id"] for r in failed] == ["row-00007"]
    assert failed[0]["status"] == 422 and f"bad emoji {FFFD}" in failed[0]["error"]
    assert len(read_rows(tmp_path / "out" / "job" / "data")) == 19


def test_a_commit_that_fails_stops_dispatch_at_once_and_the_summary_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    seen_at_failure: list[int] = []
    emu_ref: list = []

    def broken_commit(self):
        if not seen_at_failure:
            seen_at_failure.append(data_requests(emu_ref[0]))
        raise RuntimeError("the sink broke")  # not a batchrun error: what a bug raises

    monkeypatch.setattr(ParquetSink, "commit", broken_commit)
    n = 400
    with emulator(running_endpoint(latency_base_s=0.02)) as emu:
        emu_ref.append(emu)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", n),
                          concurrency={"max": 2, "initial": 2}, output={"shard_rows": 10_000})
        outcome, lines = run(spec, commit_interval_s=0.0)
        sent = data_requests(emu)
    assert seen_at_failure, "the commit was never attempted"
    # Only requests already on the wire when the commit failed were answered afterwards.
    assert sent <= seen_at_failure[0] + 2 * 2, (sent, seen_at_failure)
    assert sent < n
    assert outcome.exit_code == 3
    summary = outcome.summary
    assert summary["stop_kind"] == "error" and "the sink broke" in summary["stop_reason"]
    assert any("stopped: " in line and "the sink broke" in line for line in lines)
    on_disk = json.loads((tmp_path / "out" / "job" / "state" / "summary.json").read_text())
    assert on_disk["exit_code"] == 3 and "the sink broke" in on_disk["stop_reason"]


def test_the_sink_stores_lone_surrogates_in_every_column_as_fffd(tmp_path):
    """The class, at the sink: kept values, nested values, ids and error texts alike."""
    import pyarrow as pa

    from batchrun.output import OutputStore, build_data_schema
    from batchrun.records import RowFailure, RowResult

    source_schema = pa.schema([("id", pa.string()), ("topic", pa.string()), ("tags", pa.list_(pa.string()))])
    schema = build_data_schema(source_schema, id_column="id", keep_columns=("topic", "tags"),
                               output_schema=pa.schema([("generated_text", pa.string())]))
    store = OutputStore(tmp_path / "out")
    sink = ParquetSink(store, data_schema=schema, id_column="id", kept_columns=("topic", "tags"))
    sink.open()
    sink.add(RowResult(0, f"a{HALF_EMOJI}", {"topic": f"t{HALF_EMOJI}", "tags": [f"x{HALF_EMOJI}", "y"]},
                       {"generated_text": f"answer {HALF_EMOJI}"}, 0.1, 1))
    sink.add(RowFailure(1, "b", "http", f"oops {HALF_EMOJI}", 500, 3, False, {"topic": HALF_EMOJI}))
    sink.close()
    data = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet"))).to_pylist()
    failed = pq.read_table(next((tmp_path / "out" / "failed").glob("*.parquet"))).to_pylist()
    assert data[0]["id"] == f"a{FFFD}" and data[0]["topic"] == f"t{FFFD}" and data[0]["tags"] == [f"x{FFFD}", "y"]
    assert data[0]["generated_text"] == f"answer {FFFD}"
    assert failed[0]["error"] == f"oops {FFFD}" and failed[0]["topic"] == FFFD


def test_a_lone_surrogate_beside_an_unconvertible_value_in_one_column_is_mended_not_failed(tmp_path):
    """Surrogates are replaced only in a column that fails to convert; a column that also holds a value
    of the wrong type diverts that row alone, and the row with the surrogate is still stored with U+FFFD."""
    import pyarrow as pa

    from batchrun.output import OutputStore, build_data_schema
    from batchrun.records import RowResult

    source_schema = pa.schema([("id", pa.string())])
    schema = build_data_schema(source_schema, id_column="id", keep_columns=(),
                               output_schema=pa.schema([("score", pa.int64()), ("generated_text", pa.string())]))
    sink = ParquetSink(OutputStore(tmp_path / "out"), data_schema=schema, id_column="id", kept_columns=())
    sink.open()
    # Row 0: a value of the wrong type comes first in the column; row 1: a lone surrogate after it.
    sink.add(RowResult(0, "a", {}, {"score": 1, "generated_text": ["not", "text"]}, 0.1, 1))
    sink.add(RowResult(1, "b", {}, {"score": 2, "generated_text": f"half {HALF_EMOJI}"}, 0.1, 1))
    sink.close()
    data = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet"))).to_pylist()
    failed = pq.read_table(next((tmp_path / "out" / "failed").glob("*.parquet"))).to_pylist()
    assert [(r["id"], r["generated_text"]) for r in data] == [("b", f"half {FFFD}")]
    assert [r["id"] for r in failed] == ["a"] and failed[0]["error_type"] == "output_schema"
