"""batchrun from Python: `run` in a script, in a running loop (a notebook), on rows from memory; an
interrupt that stops as safely as Ctrl-C on the command line."""

from __future__ import annotations

import _thread
import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from jobkit import (
    NS,
    TOKEN,
    cli,
    committed_rows,
    data_requests,
    emulator,
    read_ids,
    running_endpoint,
    wait_until,
    write_spec,
    write_topics,
)

import batchrun
from batchrun.errors import ConfigMismatchError, InputError, SpecError


def _spec(emu: Any, tmp_path: Path, name: str = "py", **overrides: Any) -> dict[str, Any]:
    """A chat job as a dict whose rows come from Python: its input section names only the id column."""
    spec: dict[str, Any] = {
        "name": name,
        "input": {"id_column": "id"},
        "task": "chat-completion",
        "prompt": {"template": "Write about {topic}."},
        "parameters": {"max_tokens": 8, "seed": 1},
        "endpoint": {"url": emu.endpoint_url(NS, "gen")},
        "concurrency": {"max": 16, "initial": 8},
        "retries": {"max_attempts": 3, "backoff_base": 0.01, "backoff_cap": 0.05},
        "output": {"path": str(tmp_path / "out" / name), "shard_rows": 20},
    }
    spec.update(overrides)
    return spec


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"row-{i:03d}", "topic": f"topic {i}"} for i in range(n)]


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def test_run_from_a_plain_script_returns_every_row_in_input_order_as_a_dataset(tmp_path, token):
    input_path = write_topics(tmp_path / "in" / "t.parquet", 50)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path, name="script",
                          output={"shard_rows": 7})
        lines: list[str] = []
        result = batchrun.run(spec, progress=False, echo=lines.append)
    assert result.exit_code == 0
    assert result.output_path == tmp_path / "out" / "script"
    assert result.dataset["id"] == [f"row-{i:05d}" for i in range(50)]  # shards in completion order, rows in input order
    assert all(result.dataset["generated_text"])
    assert len(result.failed) == 0
    frame = result.to_pandas()
    assert list(frame["id"]) == result.dataset["id"] and "topic" in frame.columns
    assert result.summary["rows"]["total_ok"] == 50
    assert any("this run: 50 ok, 0 failed" in line for line in lines), lines
    again = batchrun.Result.from_output(result.output_path)
    assert again.exit_code == 0 and again.dataset["id"] == result.dataset["id"]


def test_the_cli_reads_an_output_written_from_python(tmp_path, token):
    with emulator(running_endpoint()) as emu:
        result = batchrun.run(_spec(emu, tmp_path), input=_rows(30), progress=False, echo=lambda _: None)
    status = cli("status", str(result.output_path))
    assert status.returncode == 0, status.stderr
    assert "30" in status.stdout


def test_run_works_while_an_event_loop_is_running_in_the_calling_thread(tmp_path, token):
    with emulator(running_endpoint()) as emu:

        async def notebook_cell() -> batchrun.Result:
            asyncio.get_running_loop()  # as in Jupyter: a loop is running here
            return batchrun.run(_spec(emu, tmp_path), input=_rows(25), progress=False, echo=lambda _: None)

        result = asyncio.run(notebook_cell())
    assert result.exit_code == 0
    assert result.dataset["id"] == [f"row-{i:03d}" for i in range(25)]


def test_arun_runs_the_job_on_the_callers_loop(tmp_path, token):
    with emulator(running_endpoint()) as emu:

        async def main() -> batchrun.Result:
            return await batchrun.arun(_spec(emu, tmp_path), input=_rows(25), progress=False, echo=lambda _: None)

        result = asyncio.run(main())
    assert result.exit_code == 0 and len(result.dataset) == 25


@pytest.mark.parametrize("kind", ["list", "dataframe", "dataset"])
def test_rows_from_memory_run_with_no_input_key_and_keep_their_ids(tmp_path, token, kind):
    import datasets
    import pandas as pd

    rows = _rows(40)
    data: Any = {"list": rows, "dataframe": pd.DataFrame(rows), "dataset": datasets.Dataset.from_list(rows)}[kind]
    with emulator(running_endpoint()) as emu:
        spec = _spec(emu, tmp_path, name=kind)
        result = batchrun.run(spec, input=data, progress=False, echo=lambda _: None)
        assert data_requests(emu) == 40
        rerun = batchrun.run(spec, input=data, progress=False, echo=lambda _: None)
        assert data_requests(emu) == 40  # the same rows again: resumed, nothing sent
    assert result.exit_code == 0 and rerun.exit_code == 0
    assert result.dataset["id"] == [row["id"] for row in rows]
    assert result.dataset["topic"] == [row["topic"] for row in rows]


def test_a_dataset_selection_is_read_as_selected(tmp_path, token):
    import datasets

    selected = datasets.Dataset.from_list(_rows(40)).shuffle(seed=3).select(range(10))
    with emulator(running_endpoint()) as emu:
        result = batchrun.run(_spec(emu, tmp_path), input=selected, progress=False,
                              echo=lambda _: None)
    assert result.dataset["id"] == selected["id"]


def test_a_resume_with_other_rows_from_memory_is_refused(tmp_path, token):
    with emulator(running_endpoint()) as emu:
        spec = _spec(emu, tmp_path)
        batchrun.run(spec, input=_rows(10), progress=False, echo=lambda _: None)
        changed = _rows(10)
        changed[3]["topic"] = "something else"
        with pytest.raises(ConfigMismatchError):
            batchrun.run(spec, input=changed, progress=False, echo=lambda _: None)
        assert data_requests(emu) == 10


def test_bad_inputs_and_specs_are_refused_before_anything_is_sent(tmp_path, token):
    with emulator(running_endpoint()) as emu:
        with pytest.raises(InputError, match="list of dicts"):
            batchrun.run(_spec(emu, tmp_path), input="not rows", progress=False)
        with pytest.raises(SpecError, match=r"input\.parquet"):
            batchrun.run(_spec(emu, tmp_path, input={"parquet": "x.parquet"}), input=_rows(3), progress=False)
        no_input = _spec(emu, tmp_path)
        del no_input["input"]
        with pytest.raises(SpecError, match="input"):
            batchrun.run(no_input, progress=False)  # no rows at all
        assert data_requests(emu) == 0


def test_an_interrupt_pauses_the_endpoint_and_the_rerun_finishes_every_row_once(tmp_path, token):
    with emulator(running_endpoint(initial_state="paused", latency_base_s=0.05)) as emu:
        out = tmp_path / "out" / "int"
        spec = _spec(emu, tmp_path, name="int", concurrency={"max": 4, "initial": 4},
                     endpoint={"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": "10s"},
                     output={"path": str(out), "shard_rows": 10})
        rows = _rows(300)

        def interrupt_when_rows_are_committed() -> None:
            wait_until(lambda: committed_rows(out) >= 20, what="20 committed rows")
            _thread.interrupt_main()  # what the kernel's interrupt button does: KeyboardInterrupt in the main thread

        interrupter = threading.Thread(target=interrupt_when_rows_are_committed, daemon=True)
        interrupter.start()
        lines: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            batchrun.run(spec, input=rows, progress=False, echo=lines.append)
        interrupter.join()
        assert emu.state(NS, "gen").state == "paused"
        assert any("interrupted" in line for line in lines)
        partial = read_ids(out / "data")
        assert 0 < len(partial) < 300
        stopped = batchrun.Result.from_output(out)
        assert stopped.exit_code == 3
        result = batchrun.run(spec, input=rows, progress=False, echo=lambda _: None)
    assert result.exit_code == 0
    assert sorted(read_ids(out / "data")) == [row["id"] for row in rows]  # none lost, none twice
    assert result.dataset["id"] == [row["id"] for row in rows]


def test_images_come_back_as_image_features(tmp_path):
    import datasets

    spec = {
        "name": "img",
        "task": "text-to-image",
        "input": {"id_column": "id"},
        "prompt": {"column": "prompt"},
        "parameters": {"width": 32, "height": 32},
        "image": {"format": "png", "seed": 0},
        "endpoint": {"local": {"task": "text-to-image", "image_latency_s": 0.0}},
        "output": {"path": str(tmp_path / "out" / "img")},
    }
    rows = [{"id": i, "prompt": f"a red square number {i}"} for i in range(4)]
    result = batchrun.run(spec, input=rows, progress=False, echo=lambda _: None)
    assert result.exit_code == 0
    image_columns = [name for name, feature in result.dataset.features.items() if isinstance(feature, datasets.Image)]
    assert image_columns
    assert result.dataset[0][image_columns[0]].size == (32, 32)  # decoded to PIL


def test_progress_is_tqdms_automatic_bar(tmp_path, token, capsys):
    with emulator(running_endpoint()) as emu:
        batchrun.run(_spec(emu, tmp_path), input=_rows(10), echo=lambda _: None)
    bar = capsys.readouterr().err
    assert "10/10" in bar and "row" in bar


def test_run_from_a_script_file(tmp_path, token):
    import subprocess
    import sys

    from jobkit import REPO

    with emulator(running_endpoint()) as emu:
        script = tmp_path / "script.py"
        script.write_text(
            "import batchrun\n"
            f"spec = {_spec(emu, tmp_path)!r}\n"
            "rows = [{'id': f'r{i}', 'topic': f't{i}'} for i in range(7)]\n"
            "result = batchrun.run(spec, input=rows, progress=False)\n"
            "print('ROWS', len(result.dataset), result.exit_code)\n"
        )
        done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "HF_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert "ROWS 7 0" in done.stdout


def test_cancelling_arun_stops_the_job_pauses_the_endpoint_and_the_rerun_finishes(tmp_path, token):
    from jobkit import wait_until_async

    with emulator(running_endpoint(initial_state="paused", latency_base_s=0.05)) as emu:
        out = tmp_path / "out" / "cancel"
        spec = _spec(emu, tmp_path, name="cancel", concurrency={"max": 4, "initial": 4},
                     endpoint={"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": "10s"},
                     output={"path": str(out), "shard_rows": 10})
        rows = _rows(300)

        async def cell() -> None:
            job = asyncio.create_task(batchrun.arun(spec, input=rows, progress=False, echo=lambda _: None))
            await wait_until_async(lambda: committed_rows(out) >= 20, limit_s=60, what="20 committed rows")
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job

        asyncio.run(cell())
        assert emu.state(NS, "gen").state == "paused"
        assert batchrun.Result.from_output(out).exit_code == 3
        result = batchrun.run(spec, input=rows, progress=False, echo=lambda _: None)
    assert result.exit_code == 0
    assert sorted(read_ids(out / "data")) == [row["id"] for row in rows]
