"""Several samples per prompt: N answers per row keyed by (id, sample), each with its own stored seed."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from jobkit import (
    NS,
    TOKEN,
    cli,
    emulator,
    read_rows,
    run,
    running_endpoint,
    start_run,
    wait_for_committed,
    write_spec,
    write_topics,
)

from batchrun.errors import SpecError
from batchrun.spec import parse_spec

LOCAL = {"latency_base_s": 0.001, "pending_s": 0.01, "initializing_s": 0.01}


def keys(rows: list[dict[str, Any]]) -> Counter:
    return Counter((r["id"], r["sample"]) for r in rows)


def sampled_job(tmp_path: Path, n_rows: int = 20, **overrides: Any) -> Path:
    input_path = write_topics(tmp_path / "in" / "t.parquet", n_rows, empty_every=overrides.pop("empty_every", None))
    overrides.setdefault("samples", 3)
    return write_spec(tmp_path, endpoint={"local": LOCAL}, input_path=input_path, **overrides)


def base(**top: Any) -> dict[str, Any]:
    return {"task": "chat-completion", "input": {"parquet": "x.parquet"}, "prompt": {"column": "p"},
            "endpoint": {"url": "http://127.0.0.1:1"}, **top}


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"samples": 0}, "samples"),
        ({"samples": 2, "task": "text-to-image", "image": {"seed_column": "s"}}, "image.seed_column"),
    ],
)
def test_samples_that_cannot_work_are_refused(top: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(base(**top))


def test_the_sample_count_is_part_of_the_identity_only_when_above_one() -> None:
    assert "samples" not in parse_spec(base()).identity()
    assert parse_spec(base(samples=4)).identity()["samples"] == 4


def test_each_row_yields_n_samples_each_with_its_own_seed_and_answer(tmp_path: Path) -> None:
    outcome, _ = run(sampled_job(tmp_path))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert keys(rows) == Counter({(f"row-{i:05d}", k): 1 for i in range(20) for k in range(3)})
    for i in range(20):
        mine = [r for r in rows if r["id"] == f"row-{i:05d}"]
        assert len({r["seed"] for r in mine}) == 3  # a seed per sample, stored
        assert len({r["generated_text"] for r in mine}) == 3  # and so an answer per sample


def test_a_sample_is_drawn_again_identically_from_its_stored_seed(tmp_path: Path) -> None:
    run(sampled_job(tmp_path / "a"))
    run(sampled_job(tmp_path / "b"))
    first = {(r["id"], r["sample"]): (r["seed"], r["generated_text"]) for r in read_rows(tmp_path / "a/out/job/data")}
    again = {(r["id"], r["sample"]): (r["seed"], r["generated_text"]) for r in read_rows(tmp_path / "b/out/job/data")}
    assert first == again


def test_a_failing_row_fails_once_per_sample_and_each_failure_names_its_sample(tmp_path: Path) -> None:
    outcome, _ = run(sampled_job(tmp_path, n_rows=10, empty_every=5, input={"keep_columns": ["topic"]}))
    failed = read_rows(tmp_path / "out" / "job" / "failed")
    assert keys(failed) == Counter({(f"row-{i:05d}", k): 1 for i in (0, 5) for k in range(3)})
    assert {r["error_type"] for r in failed} == {"template"}  # a null {topic}
    assert len(read_rows(tmp_path / "out" / "job" / "data")) == 8 * 3
    assert outcome.exit_code == 1


def test_changing_the_sample_count_of_an_output_is_refused(tmp_path: Path) -> None:
    run(sampled_job(tmp_path))
    changed = sampled_job(tmp_path, samples=5)
    result = cli("validate", str(changed))
    assert result.returncode == 2 and "samples" in result.stderr and "--fresh" in result.stderr


def test_a_job_killed_in_the_middle_of_rows_samples_resumes_only_the_missing_ones(tmp_path: Path) -> None:
    rows, n = 120, 4
    endpoint = running_endpoint(latency_base_s=0.03)
    with emulator(endpoint) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", rows)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          samples=n, concurrency={"max": 6, "initial": 6}, output={"shard_rows": 10})
        out = tmp_path / "out" / "job"
        log = tmp_path / "killed.stderr"
        proc = start_run(spec, log=log)
        try:
            wait_for_committed(out, 30, proc, log=log)  # 30 is not a multiple of 4: some row is cut mid-samples
            assert proc.poll() is None, "the job finished before its kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        before = keys(read_rows(out / "data"))
        assert 0 < sum(before.values()) < rows * n
        sent_before = emu.stats()["endpoints"][f"{NS}/gen"]["requests"]
        finished = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert finished.returncode == 0, finished.stderr
        sent_after = emu.stats()["endpoints"][f"{NS}/gen"]["requests"]
    after = keys(read_rows(out / "data"))
    assert after == Counter({(f"row-{i:05d}", k): 1 for i in range(rows) for k in range(n)})
    # The resumed run sent only what was missing (plus what was in flight at the kill, at most 6).
    assert sent_after - sent_before <= rows * n - sum(before.values()) + 6


def test_status_and_the_summary_say_that_counts_are_samples(tmp_path: Path) -> None:
    spec = sampled_job(tmp_path, n_rows=5)
    _, lines = run(spec)
    assert any("3 samples per row" in line for line in lines)
    result = cli("status", str(spec))
    assert result.returncode == 0
    assert "3 samples per row" in result.stdout and "ok: 15 samples" in result.stdout
    assert "remaining: 0 of 15" in result.stdout


def test_text_to_image_draws_each_sample_with_its_own_seed() -> None:
    from batchrun.records import Row
    from batchrun.tasks import make_task

    task = make_task(parse_spec(base(task="text-to-image", samples=2, image={"seed": 7})))
    first, second = (task.prepare(Row(0, "a", {"p": "a fox"}, sample=k)) for k in (0, 1))
    assert first.payload["parameters"]["seed"] != second.payload["parameters"]["seed"]
    assert first.outputs == {"seed": first.payload["parameters"]["seed"], "sample": 0}
    assert task.output_schema.names[-2:] == ["seed", "sample"]


def test_only_the_samples_not_done_are_read_again_and_wholly_done_rows_are_left_out(tmp_path: Path) -> None:
    import random

    from batchrun.output.done import DoneSet
    from batchrun.samples import SampledSource
    from batchrun.sources import open_source
    from batchrun.spec import InputSpec

    path = write_topics(tmp_path / "t.parquet", 50)
    source = SampledSource(open_source(InputSpec(kind="parquet", path=str(path), id_column="id")), 3)
    done = DoneSet()
    rng = random.Random(0)
    finished = {unit for unit in range(150) if rng.random() < 0.6} | {0, 1, 2}  # row 0 wholly done
    for unit in finished:
        done.add(unit)
    seen, left_out = [], 0
    for skipped, units in source.pending_batches(batch_size=16, done=done):
        left_out += skipped
        seen.extend(units)
    assert [u.position for u in seen] == sorted(set(range(150)) - finished)
    assert all(u.position == int(u.id[4:]) * 3 + u.sample for u in seen)
    assert left_out == len(finished)
