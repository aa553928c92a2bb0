"""Committed rows are found again by every reader, whatever path the user typed; a URL batchrun cannot commit to is refused.

reliability.md: "the path written and the path read are the same path, whatever the user typed (a
URL, a relative path, a symlink)". An early stop always says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobkit import NS, TOKEN, data_requests, emulator, run, running_endpoint, write_spec, write_topics

from batchrun.cli import main
from batchrun.errors import SpecError
from batchrun.output import read_status
from batchrun.runs import read_shards
from batchrun.stop import StopCause, StopReason
from batchrun.summary import build_summary, format_summary

N = 30


@pytest.mark.parametrize("url", ["s3://bucket", "gs:///x", "hf://datasets/org/name", "hf://buckets/o/n", "file:///tmp/x"])
def test_an_output_url_is_refused_by_validate_and_run_before_anything_is_sent(tmp_path, monkeypatch, capsys, url):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", N), output={"path": url})
        assert main(["validate", str(spec)]) == 2
        said = capsys.readouterr().err
        assert "output.path" in said and "s3://BUCKET/PREFIX" in said and url in said
        with pytest.raises(SpecError, match="are not written to"):
            run(spec)
        assert main(["run", str(spec), "--output", "hf://buckets/other/place", "--progress", "off"]) == 2  # no prefix
        assert data_requests(emu) == 0
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()


def _path_forms(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    """Path forms a user may type (relative to the working directory tmp_path), with the folder each names."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    return {
        "colon": ("s3:/bucket/prefix", tmp_path / "s3:" / "bucket" / "prefix"),  # what Path() made of s3://
        "relative": ("out/job", tmp_path / "out" / "job"),
        "dots_and_slashes": ("./out//dotted/./job", tmp_path / "out" / "dotted" / "job"),
        "symlink": ("link/out", tmp_path / "real" / "out"),
    }


@pytest.mark.parametrize("form", ["colon", "relative", "dots_and_slashes", "symlink"])
def test_committed_rows_are_read_back_whatever_form_the_path_takes(tmp_path, monkeypatch, capsys, form):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    typed, folder = _path_forms(tmp_path)[form]
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", N), output={"path": typed, "shard_rows": 7})
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert outcome.summary["rows"]["total_ok"] == N and outcome.summary["rows"]["pending"] == 0
        assert data_requests(emu) == N
        # A rerun finds every row: it sends nothing.
        again, _ = run(spec)
        assert again.exit_code == 0 and again.summary["rows"]["skipped"] == N
        assert data_requests(emu) == N
    assert len(list((folder / "data").glob("*.parquet"))) == 5  # the rows are where the path says
    # Every reader, by the path as typed and by the real folder.
    for path in (typed, str(folder)):
        assert read_status(path).ok == N
        assert sum(t.num_rows for t in read_shards(path, "data")) == N
        out = tmp_path / f"export-{form}.jsonl"
        assert main(["export", path, "--to", str(out)]) == 0
        assert len(out.read_text().splitlines()) == N
    capsys.readouterr()
    assert main(["status", str(spec)]) == 0
    assert f"ok: {N} rows" in capsys.readouterr().out


def test_an_early_stop_with_rows_left_says_why(tmp_path):
    """Exit 3 because rows are left without a record, though the run itself ran out of rows: a reason is shown."""
    summary = build_summary(job="j", started_wall=0.0, wall_s=1.0,
                            rows={"ok": 5, "failed": 0, "skipped": 0, "pending": 5, "total_ok": 0, "total_failed": 0},
                            dispatch={}, endpoint={}, cost={}, output=str(tmp_path),
                            cause=StopCause(StopReason.DONE, "every pending row has its record"))
    assert summary["exit_code"] == 3
    assert summary["stop_reason"] and "5 row(s)" in summary["stop_reason"]
    assert "stopped: 5 row(s)" in format_summary(summary)
    json.dumps(summary)


def test_a_summary_that_cannot_be_written_gives_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from batchrun.errors import OutputError
    from batchrun.output import OutputStore

    def disk_full(self, summary):
        raise OutputError("No space left on the disk holding OUT: could not write state/summary.json")

    monkeypatch.setattr(OutputStore, "write_summary", disk_full)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 5))
        outcome, lines = run(spec)
    assert outcome.exit_code == 3
    assert "No space left" in outcome.summary["stop_reason"]
    assert any("stopped: No space left" in line for line in lines)
