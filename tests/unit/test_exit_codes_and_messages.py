"""Exit codes and messages a new user meets: a closed pipe, a missing folder, a damaged run, a token refused mid-run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from jobkit import NS, TOKEN, emulator, run, running_endpoint, write_spec, write_topics

from batchrun.cli import main
from batchrun.runs import find_runs, format_runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    input_path = write_topics(tmp / "in" / "topics.parquet", 5)
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = TOKEN
    try:
        with emulator(running_endpoint()) as emu:
            for name in ("a", "b"):
                spec = write_spec(tmp, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                                  name=name, output={"path": str(tmp / "runs" / name)})
                assert run(spec)[0].exit_code == 0
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old
    return tmp / "runs" / "a", tmp / "runs" / "b"


def _copy_run(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to)
    return to


# --------------------------------------------------------------------------- a reader that went away


def _closed_pipe():
    """A stdout whose reader has gone, as `batchrun status | head` leaves it once head has its lines."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return open(write_end, "w", buffering=1, encoding="utf-8")  # line-buffered: the first line breaks


@pytest.mark.parametrize("command", [["runs"], ["compare"]])
def test_a_closed_pipe_ends_the_command_quietly_with_its_own_exit_code(two_runs, monkeypatch, capsys, command):
    a, b = two_runs
    argv = ["runs", str(a.parent)] if command == ["runs"] else ["compare", str(a), str(b), "--fail-if", "changed>0.5"]
    pipe = _closed_pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        code = main(argv)
    finally:
        monkeypatch.undo()
        pipe.close()  # what was still buffered went to /dev/null: closing raises nothing
    err = capsys.readouterr().err
    assert code == 0
    assert "Traceback" not in err and "BrokenPipe" not in err and "resume" not in err


def test_validate_into_a_closed_pipe_exits_0_without_a_traceback(tmp_path, monkeypatch, capsys):
    input_path = write_topics(tmp_path / "topics.parquet", 3)
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path)
    pipe = _closed_pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        code = main(["validate", str(spec)])
    finally:
        monkeypatch.undo()
        pipe.close()
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and "resume" not in err


# --------------------------------------------------------------------------- compare


def test_compare_html_into_a_missing_folder_is_a_clear_error_exit_2(two_runs, tmp_path, capsys):
    a, b = two_runs
    code = main(["compare", str(a), str(b), "--html", str(tmp_path / "no" / "such" / "r.html")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no such folder" in err and "Traceback" not in err and "resume" not in err


@pytest.mark.parametrize("content", ["[1, 2]", '{"spec": "x", "identity": 3}', "{not json"])
def test_compare_on_a_malformed_job_json_is_a_clear_error_exit_2(two_runs, tmp_path, capsys, content):
    a, b = two_runs
    broken = _copy_run(b, tmp_path / "broken")
    (broken / "state" / "job.json").write_text(content)
    code = main(["compare", str(a), str(broken)])
    err = capsys.readouterr().err
    assert code == 2
    assert "job.json" in err and "Traceback" not in err and "resume" not in err


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize(("file", "content"), [("job.json", "{not json"), ("job.json", "[1]"),
                                               ("summary.json", "[1]"), ("summary.json", '{"rows": 5}')])
def test_one_unreadable_run_is_listed_as_such_and_the_others_still_are(two_runs, tmp_path, capsys, file, content):
    a, b = two_runs
    root = tmp_path / "runs"
    for run_dir in (a, b):
        _copy_run(run_dir, root / run_dir.name)
    _copy_run(b, root / "c")
    (root / "c" / "state" / file).write_text(content)
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[-1] if "unreadable" not in line else "c": line for line in out.splitlines()[1:]}
    assert set(lines) == {"a", "b", "c"}
    assert "unreadable" in lines["c"] and "0" in lines["a"].split()
    listed = find_runs(root)
    assert [line.problem is not None for line in listed].count(True) == 1
    assert "unreadable" in format_runs(listed, root)


# --------------------------------------------------------------------------- export


def test_export_refuses_the_same_file_for_results_and_errors(two_runs, tmp_path, capsys, monkeypatch):
    a, _ = two_runs
    target = tmp_path / "all.jsonl"
    monkeypatch.chdir(tmp_path)
    code = main(["export", str(a), "--to", str(target), "--errors", "./all.jsonl"])
    assert code == 2 and "--errors" in capsys.readouterr().err
    assert not target.exists()  # nothing written
    assert main(["export", str(a), "--to", str(target)]) == 0
    assert len(target.read_text().splitlines()) == 5
