"""A target in ``mode: batch`` on the emulated batch API: whole jobs, kills at observed moments, expiry, and
switching between batch and online, each ending with every input id exactly once and no batch paid twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from jobkit import cli, read_ids, read_rows, run, start_run, wait_until, write_spec, write_topics

from batchrun.emulator import BatchConfig, EmulatorConfig, EmulatorThread, ProviderConfig, RouterConfig

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
KEY_VARIABLE = "BATCHRUN_TEST_BATCH_KEY"
KEY = "sk-batch-test-key-not-real-0001"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)


def batch_emulator(*, latency_s: float = 0.0, token: str = KEY, **batch: Any) -> EmulatorThread:
    provider = ProviderConfig(name="together", models=(LLAMA,), price_input=1.0, price_output=2.0, latency_s=latency_s)
    return EmulatorThread(EmulatorConfig(token=token, endpoints=[], router=RouterConfig(
        providers=(provider,), batch=BatchConfig(**{"completion_s": 0.3, **batch}))))


def target(emu: EmulatorThread, *, mode: str = "batch", **batch: Any) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"url": emu.router_url, "model": LLAMA, "api_key_env": KEY_VARIABLE, "mode": mode,
                                "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    if mode == "batch":
        endpoint["batch"] = {"max_requests": 10, "poll_every": "0.05s", **batch}
    return endpoint


def api(emu: EmulatorThread, path: str) -> bytes:
    """A GET to the emulated batch API, with the key."""
    request = urllib.request.Request(emu.router_url + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return bytes(answer.read())


def batches(emu: EmulatorThread) -> list[dict[str, Any]]:
    """Every batch the emulator holds, newest first."""
    return list(json.loads(api(emu, "/batches?limit=100"))["data"])


def submitted_ids(emu: EmulatorThread) -> list[list[str]]:
    """Each batch's custom_ids, from its input file, oldest batch first."""
    out = []
    for batch in reversed(batches(emu)):
        content = api(emu, f"/files/{batch['input_file_id']}/content")
        out.append([json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()])
    return out


def assert_every_id_once(out: Path, n: int) -> None:
    ids = read_ids(out / "data") + read_ids(out / "failed")
    assert sorted(ids) == [f"row-{i:05d}" for i in range(n)]


def assert_nothing_of_ended_batches_is_kept(out: Path) -> None:
    """state/batches holds no request and no step of an ended batch: at most a journal of their counts."""
    folder = out / "state" / "batches"
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert left in ([], ["journal.jsonl"]), left
    if left:
        events = [json.loads(line) for line in (folder / "journal.jsonl").read_bytes().splitlines()]
        assert [event["event"] for event in events] == ["ended_batches"], events


def test_a_job_of_five_batches_completes_with_every_id_once_at_the_batch_price(tmp_path: Path) -> None:
    with batch_emulator() as emu:
        spec = write_spec(tmp_path, endpoint=target(emu), input_path=write_topics(tmp_path / "in.parquet", 50))
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert [len(ids) for ids in submitted_ids(emu)] == [10] * 5
        billed = emu.router_stats()["batches"]
    out = tmp_path / "out" / "job"
    assert_every_id_once(out, 50)
    rows = read_rows(out / "data")
    assert {row["mode"] for row in rows} == {"batch"}
    paid = sum(b["cost_usd"] for b in billed.values())
    assert sum(row["cost_usd"] for row in rows) == pytest.approx(paid)
    assert outcome.summary["cost"]["saved_usd"] == pytest.approx(paid)  # half off: saved as much as paid
    assert outcome.summary["batches"]["submitted"] == 5
    assert "  saved by batch/flex mode: " in "\n".join(lines)
    spend = json.loads((out / "state" / "spend.json").read_text())
    assert spend["saved_usd"] == pytest.approx(paid)  # per job, for the dataset card
    assert_nothing_of_ended_batches_is_kept(out)
    journal = (out / "state" / "batches" / "journal.jsonl").read_bytes()
    assert json.loads(journal)["counts"] == {"completed": [5, 50]}  # what `batchrun status` says of them


def test_flex_mode_asks_the_flex_tier_online_and_marks_and_prices_its_rows(tmp_path: Path) -> None:
    with batch_emulator() as emu:
        spec = write_spec(tmp_path, endpoint=target(emu, mode="flex"), input_path=write_topics(tmp_path / "in.parquet", 6))
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert batches(emu) == []
        online = emu.router_stats()["providers"]["together"]
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert {row["mode"] for row in rows} == {"flex"}
    assert sum(row["cost_usd"] for row in rows) == pytest.approx(online["cost_usd"] / 2)


def test_the_dataset_card_says_what_batch_mode_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hubkit import REPO_ID, card_of, point_at_hub

    monkeypatch.setenv("HF_TOKEN", KEY)  # the emulated Hub takes the emulator's one token
    with batch_emulator() as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        spec = write_spec(tmp_path, endpoint=target(emu), input_path=write_topics(tmp_path / "in.parquet", 12),
                          output={"push_to_hub": {"repo": REPO_ID, "endpoint": emu.hub_url}})
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        files = emu.hub.files(REPO_ID)
    _, body = card_of(files)
    saved = outcome.summary["cost"]["saved_usd"]
    assert f"${saved:.4f} less than the online price (batch mode)" in body


def test_rerunning_a_finished_batch_job_submits_nothing(tmp_path: Path) -> None:
    with batch_emulator() as emu:
        spec = write_spec(tmp_path, endpoint=target(emu), input_path=write_topics(tmp_path / "in.parquet", 12))
        assert run(spec)[0].exit_code == 0
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert len(batches(emu)) == 2


def test_an_expired_batchs_rows_go_into_a_later_batch_and_online_near_the_deadline(tmp_path: Path) -> None:
    # The emulator finishes a batch's requests evenly over completion_s, so each batch expires with its
    # last third undone: later batches answer most of the rest, and the deadline's fallback the remainder.
    with batch_emulator(expire_after_s=0.25, completion_s=0.3) as emu:
        spec = write_spec(tmp_path, endpoint=target(emu, max_requests=20, fallback_online_after="28s"),
                          input_path=write_topics(tmp_path / "in.parquet", 20), budget={"deadline": "30s"},
                          retries={"max_attempts": 50})
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        statuses = [b["status"] for b in reversed(batches(emu))]
        sent = submitted_ids(emu)
    assert statuses[0] == "expired" and len(statuses) > 1
    assert len(sent[1]) < 20  # only what expired went again
    out = tmp_path / "out" / "job"
    assert_every_id_once(out, 20)
    modes = [row["mode"] for row in read_rows(out / "data")]
    assert len(modes) == 20
    assert modes.count("batch") > len(sent[0]) - len(sent[1])  # a later batch answered some
    assert "online" in modes


def test_rows_still_in_batches_near_the_deadline_are_cancelled_and_answered_online(tmp_path: Path) -> None:
    with batch_emulator(completion_s=60.0) as emu:
        spec = write_spec(tmp_path, endpoint=target(emu, fallback_online_after="59s"),
                          input_path=write_topics(tmp_path / "in.parquet", 15), budget={"deadline": "60s"})
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert {b["status"] for b in batches(emu)} == {"cancelled"}
    out = tmp_path / "out" / "job"
    assert_every_id_once(out, 15)
    assert {row["mode"] for row in read_rows(out / "data")} == {"online"}


def _write_job(tmp_path: Path, emu: EmulatorThread, n: int, *, mode: str = "batch", **batch: Any) -> Path:
    source = tmp_path / "in.parquet"
    return write_spec(tmp_path, endpoint=target(emu, mode=mode, **batch),
                      input_path=source if source.exists() else write_topics(source, n),
                      concurrency={"max": 2, "initial": 2})


def test_switching_modes_midway_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Online, stopped; then batch, stopped with its batch running; then online again: every id once."""
    with batch_emulator(completion_s=3.0, latency_s=0.1) as emu:
        out = tmp_path / "out" / "job"
        proc = start_run(_write_job(tmp_path, emu, 40, mode="online"), log=tmp_path / "online.log")
        wait_until(lambda: emu.router_stats()["providers"]["together"]["requests"] >= 6, proc=proc, timeout=60)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 3
        online_ids = set(read_ids(out / "data"))
        assert 0 < len(online_ids) < 40
        proc = start_run(_write_job(tmp_path, emu, 40), log=tmp_path / "batch.log")
        wait_until(lambda: batches(emu), proc=proc, timeout=60)  # the batch is created: the event observed
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 3
        assert [b["status"] for b in batches(emu)] != ["completed"]
        outcome, lines = run(_write_job(tmp_path, emu, 40, mode="online"))
        assert outcome.exit_code == 0, lines
        sent = [cid for ids in submitted_ids(emu) for cid in ids]
        online_requests = emu.router_stats()["providers"]["together"]["requests"]
        assert {b["status"] for b in batches(emu)} == {"cancelled"}  # what they finished is kept
    assert not online_ids & set(sent)  # only pending rows were submitted, each to one batch
    assert len(sent) == len(set(sent))
    assert_every_id_once(out, 40)
    modes = [row["mode"] for row in read_rows(out / "data")]
    assert len(modes) == 40
    assert modes.count("online") == online_requests  # no row was paid twice


# ------------------------------------------------------------------------------------- kills

#: A job run in a process of its own whose transport SIGKILLs it the moment a POST to the path ending in
#: argv[2] is answered (/batches: the batch exists on the provider, and its id was never saved).
KILLED_AFTER = """
import asyncio, os, signal, sys
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec
from batchrun.transport import AiohttpTransport

class KilledAfter(AiohttpTransport):
    async def send(self, request):
        response = await super().send(request)
        if request.method == "POST" and request.url.endswith(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return response

asyncio.run(run_job(load_spec(sys.argv[1]), RunOptions(progress="off", handle_signals=False,
                                                       transport=KilledAfter())))
"""


def assert_no_row_in_two_batches_and_none_paid_twice(emu: EmulatorThread, n: int) -> None:
    sent = [cid for ids in submitted_ids(emu) for cid in ids]
    assert sorted(sent) == sorted(set(sent)) and len(sent) == n
    billed = emu.router_stats()["batches"].values()
    assert sum(b["request_counts"]["completed"] for b in billed) == n


def test_a_sigkill_after_a_batch_is_created_before_its_id_is_saved_then_a_rerun_finds_it(tmp_path: Path) -> None:
    with batch_emulator() as emu:
        spec = _write_job(tmp_path, emu, 50)
        killed = subprocess.run([sys.executable, "-c", KILLED_AFTER, str(spec), "/batches"], env=dict(os.environ),
                                capture_output=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert len(batches(emu)) == 1  # created, and its id never reached the output's state
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert outcome.summary["batches"]["found_after_a_crash"] == 1
        assert len(batches(emu)) == 5
        assert_no_row_in_two_batches_and_none_paid_twice(emu, 50)
    assert_every_id_once(tmp_path / "out" / "job", 50)


def test_a_batch_found_after_a_sigkill_by_an_online_rerun_is_cancelled_and_kept(tmp_path: Path) -> None:
    with batch_emulator(completion_s=2.0) as emu:
        spec = _write_job(tmp_path, emu, 30)
        killed = subprocess.run([sys.executable, "-c", KILLED_AFTER, str(spec), "/batches"], env=dict(os.environ),
                                capture_output=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        outcome, lines = run(_write_job(tmp_path, emu, 30, mode="online"))
        assert outcome.exit_code == 0, lines
        assert outcome.summary["batches"]["found_after_a_crash"] == 1
        assert [b["status"] for b in batches(emu)] == ["cancelled"]
        online_requests = emu.router_stats()["providers"]["together"]["requests"]
        in_batch = emu.router_stats()["batches"]
    out = tmp_path / "out" / "job"
    assert_every_id_once(out, 30)
    modes = [row["mode"] for row in read_rows(out / "data")]
    assert modes.count("online") == online_requests  # none paid twice
    assert modes.count("batch") == sum(b["request_counts"]["completed"] for b in in_batch.values())
    assert_nothing_of_ended_batches_is_kept(out)


@pytest.mark.parametrize("then", ["batch", "online"])
def test_a_sigkill_after_an_upload_before_its_id_is_saved_then_a_rerun_sends_each_row_once(tmp_path: Path,
                                                                                           then: str) -> None:
    with batch_emulator() as emu:
        spec = _write_job(tmp_path, emu, 30)
        killed = subprocess.run([sys.executable, "-c", KILLED_AFTER, str(spec), "/files"], env=dict(os.environ),
                                capture_output=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert batches(emu) == []  # a file was uploaded, never used: nothing was paid for
        outcome, lines = run(_write_job(tmp_path, emu, 30, mode=then))
        assert outcome.exit_code == 0, lines
        sent = [cid for ids in submitted_ids(emu) for cid in ids]
        online_requests = emu.router_stats()["providers"]["together"]["requests"]
    assert len(sent) == len(set(sent)) == (30 if then == "batch" else 0)
    assert online_requests == (0 if then == "batch" else 30)
    assert_every_id_once(tmp_path / "out" / "job", 30)


@pytest.mark.parametrize("moment", ["one batch created", "every batch created", "a batch completed"])
def test_a_sigkill_while_batches_run_then_a_rerun_collects_every_answer_once(tmp_path: Path, moment: str) -> None:
    with batch_emulator(completion_s=1.0) as emu:
        spec = _write_job(tmp_path, emu, 50)
        proc = start_run(spec, log=tmp_path / "run.log")
        seen = {
            "one batch created": lambda: len(batches(emu)) >= 1,
            "every batch created": lambda: len(batches(emu)) == 5,
            "a batch completed": lambda: any(b["status"] == "completed" for b in batches(emu)),
        }[moment]
        wait_until(seen, proc=proc, timeout=60)
        proc.kill()
        proc.wait(timeout=60)
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert_no_row_in_two_batches_and_none_paid_twice(emu, 50)
    assert_every_id_once(tmp_path / "out" / "job", 50)
    assert_nothing_of_ended_batches_is_kept(tmp_path / "out" / "job")


def test_status_shows_batches_in_progress_and_completed_with_their_rows(tmp_path: Path) -> None:
    with batch_emulator(completion_s=3.0) as emu:
        spec = _write_job(tmp_path, emu, 25)
        proc = start_run(spec, log=tmp_path / "run.log")
        wait_until(lambda: len(batches(emu)) == 3, proc=proc, timeout=60)
        wait_until(lambda: "3 in progress" in cli("status", str(spec)).stdout, proc=proc, timeout=60)
        proc.send_signal(signal.SIGTERM)  # polling stops; the batches run on, paid for
        assert proc.wait(timeout=60) == 3
        said = cli("status", str(spec)).stdout
        assert "batches: 3 submitted (25 rows), 3 in progress (25 rows)" in said
        assert {b["status"] for b in batches(emu)} <= {"validating", "in_progress", "finalizing", "completed"}
        assert run(spec)[0].exit_code == 0
        said = cli("status", str(spec)).stdout
        assert "batches: 3 submitted (25 rows), 0 in progress (0 rows), 3 completed (25 rows)" in said
        assert len(batches(emu)) == 3


# ------------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(("endpoint", "key", "said"), [
    ({"url": "http://127.0.0.1:9/v1", "model": "m", "batch": {"max_requests": 5}}, "endpoint.batch",
     "only applies with mode: batch (or flex"),
    ({"url": "http://127.0.0.1:9", "mode": "batch"}, "endpoint.mode", "only applies with endpoint.model"),
    ({"url": "http://127.0.0.1:9/v1", "model": "m", "mode": "offline"}, "endpoint.mode", "online, batch, flex"),
    ({"url": "http://127.0.0.1:9/v1", "model": "m", "mode": "batch", "batch": {"poll_every": "soon"}},
     "endpoint.batch.poll_every", "expected"),
])
def test_a_misplaced_or_wrong_mode_is_refused_naming_the_key(tmp_path: Path, endpoint: dict[str, Any], key: str,
                                                             said: str) -> None:
    from batchrun.errors import SpecError
    from batchrun.spec import load_spec

    spec = write_spec(tmp_path, endpoint=endpoint, input_path=write_topics(tmp_path / "in.parquet", 1))
    with pytest.raises(SpecError) as refused:
        load_spec(spec)
    assert key in str(refused.value) and said in str(refused.value)


def test_batch_mode_with_an_object_store_output_is_refused_since_its_journal_would_stay_on_this_machine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchrun.errors import SpecError
    from batchrun.spec import load_spec

    monkeypatch.setenv("BATCH_TEST_KEY", "not-a-real-key")
    endpoint = {"url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "BATCH_TEST_KEY", "mode": "batch"}
    spec = write_spec(tmp_path, endpoint=endpoint, input_path=write_topics(tmp_path / "in.parquet", 1),
                      output={"path": "s3://bucket/jobs/batch"})
    with pytest.raises(SpecError) as refused:
        load_spec(spec)
    assert "endpoint.mode" in str(refused.value) and "journal of paid batches" in str(refused.value)


# ------------------------------------------------------------------------------------- failures inside batches


def test_a_batch_that_fails_validation_has_its_rows_sent_in_a_later_batch(tmp_path: Path) -> None:
    with batch_emulator(fail_first=1) as emu:
        spec = _write_job(tmp_path, emu, 20)
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        statuses = [b["status"] for b in reversed(batches(emu))]
        sent = submitted_ids(emu)
    assert statuses[0] == "failed" and statuses[1:] == ["completed"] * 2
    assert sorted(sent[1] + sent[2]) == [f"row-{i:05d}" for i in range(20)]
    assert_every_id_once(tmp_path / "out" / "job", 20)


def test_requests_that_fail_in_every_batch_end_as_retryable_failure_rows_after_max_attempts(tmp_path: Path) -> None:
    with batch_emulator(error_rate=0.3) as emu:  # the emulator's errors are drawn per custom_id: they recur
        spec = write_spec(tmp_path, endpoint=target(emu), input_path=write_topics(tmp_path / "in.parquet", 20),
                          retries={"max_attempts": 2})
        outcome, lines = run(spec)
        assert outcome.exit_code == 1, lines
        sent = submitted_ids(emu)
    out = tmp_path / "out" / "job"
    assert_every_id_once(out, 20)
    failed = read_rows(out / "failed")
    assert failed and {(row["error_type"], row["attempts"], row["retryable"]) for row in failed} == {
        ("http_500", 2, True)}
    # Only the failed went again, each once more (the retries may be split over several batches when the
    # first ones end in different polls).
    times_sent = Counter(custom_id for batch in sent for custom_id in batch)
    assert {i for i, n in times_sent.items() if n > 1} == {row["id"] for row in failed}
    assert set(times_sent.values()) <= {1, 2}


def test_max_bytes_splits_the_input_files(tmp_path: Path) -> None:
    with batch_emulator() as emu:
        spec = _write_job(tmp_path, emu, 20, max_requests=1000, max_bytes="2KB")
        assert run(spec)[0].exit_code == 0
        sizes = [len(api(emu, f"/files/{b['input_file_id']}/content")) for b in batches(emu)]
    assert len(sizes) > 1 and max(sizes) <= 2000


def test_sigkills_at_random_moments_then_a_rerun_lose_and_repeat_nothing(tmp_path: Path) -> None:
    rng = random.Random(7)
    with batch_emulator(completion_s=1.5) as emu:
        spec = _write_job(tmp_path, emu, 60)
        for turn in range(5):
            proc = start_run(spec, log=tmp_path / f"run-{turn}.log")
            if turn == 0:  # the first run is killed once it has submitted; the others at any moment of theirs
                wait_until(lambda: len(batches(emu)) > 0, proc=proc, timeout=60)
            time.sleep(rng.uniform(0.0, 1.0) if turn == 0 else rng.uniform(0.5, 2.5))
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        assert_no_row_in_two_batches_and_none_paid_twice(emu, 60)
    out = tmp_path / "out" / "job"
    assert_every_id_once(out, 60)
    for shard in (out / "data").glob("*.parquet"):
        pq.read_table(shard)  # every published file is readable
    assert_nothing_of_ended_batches_is_kept(out)


def test_several_samples_per_row_each_get_their_own_line_and_record(tmp_path: Path) -> None:
    with batch_emulator() as emu:
        spec = write_spec(tmp_path, endpoint=target(emu), input_path=write_topics(tmp_path / "in.parquet", 6),
                          samples=3)
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        sent = sorted(cid for ids in submitted_ids(emu) for cid in ids)
    assert sent == sorted(f"row-{i:05d}" + (f"#{s}" if s else "") for i in range(6) for s in range(3))
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert sorted((row["id"], row["sample"]) for row in rows) == [(f"row-{i:05d}", s) for i in range(6)
                                                                  for s in range(3)]


def test_an_api_without_a_batch_api_stops_the_job_saying_so_with_nothing_paid(tmp_path: Path) -> None:
    from batchrun.transport import MockTransport, Response

    def handler(request: Any) -> Response:
        if request.url.endswith("/models"):
            return Response(200, {}, json.dumps({"data": [{"id": LLAMA}]}).encode())
        return Response(404, {}, b'{"error": {"message": "not found"}}')

    endpoint = {"url": "http://127.0.0.1:9/v1", "model": LLAMA, "api_key_env": KEY_VARIABLE, "mode": "batch"}
    spec = write_spec(tmp_path, endpoint=endpoint, input_path=write_topics(tmp_path / "in.parquet", 3))
    outcome, lines = run(spec, transport=MockTransport(handler))
    assert outcome.exit_code == 3
    assert "has no batch API (POST /files answered 404)" in outcome.summary["stop_reason"]
