"""The output's record of its batches: each step durable and read back, a torn last line harmless, and the
rows of batches not ended held out of the pending rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchrun.batches import BatchLedger, HeldRows, Member
from batchrun.output import DoneSet


def member(position: int, *, sample: int = 0) -> Member:
    return Member(position=position, id=f"row-{position}", sample=sample, columns={"topic": "t"},
                  path="/v1/chat/completions", payload={"messages": []}, outputs={}, answer_schema=None, attempts=0)


def test_each_step_of_a_batch_is_read_back_by_the_next_run(tmp_path: Path) -> None:
    ledger = BatchLedger(tmp_path)
    uploaded = ledger.begin([member(0), member(1)])
    ledger.uploaded(uploaded, "file-1")
    created = ledger.begin([member(2)])
    ledger.uploaded(created, "file-2")
    ledger.created(created, "batch-2")
    ended = ledger.begin([member(3)])
    ledger.uploaded(ended, "file-3")
    ledger.created(ended, "batch-3")
    ledger.ended(ended, "completed")

    again = BatchLedger(tmp_path)
    assert [(i.id, i.file_id, i.batch_id) for i in again.open_intents()] == [
        (uploaded.id, "file-1", None), (created.id, "file-2", "batch-2")]
    assert ended.id not in again.intents and again.ended_counts() == {"completed": (1, 1)}
    assert again.held_positions() == {0, 1, 2}
    assert [m.custom_id for m in again.members(again.intents[uploaded.id])] == ["row-0", "row-1"]


def test_a_line_cut_by_a_crash_counts_as_a_step_not_taken(tmp_path: Path) -> None:
    ledger = BatchLedger(tmp_path)
    intent = ledger.begin([member(0)])
    ledger.uploaded(intent, "file-1")
    with open(ledger.folder / "journal.jsonl", "ab") as journal:
        journal.write(b'{"event": "created", "intent": "' + intent.id.encode())  # no end: the write was cut
    again = BatchLedger(tmp_path)
    assert again.intents[intent.id].file_id == "file-1" and again.intents[intent.id].batch_id is None


def test_a_rows_samples_have_their_own_custom_ids() -> None:
    assert [member(5, sample=s).custom_id for s in range(3)] == ["row-5", "row-5#1", "row-5#2"]


def test_held_rows_are_pending_for_nothing_else() -> None:
    done = DoneSet()
    done.add(1)
    held = HeldRows(done, {3, 4, 9})
    assert held.pending_mask(0, 8).tolist() == [True, False, True, False, False, True, True, True]
    assert 9 in held and 1 in held and 2 not in held
    assert len(held) == 3
    assert HeldRows(done, set()).pending_mask(0, 3).tolist() == np.array([True, False, True]).tolist()


def _files(ledger: BatchLedger) -> set[str]:
    return {path.name for path in ledger.folder.iterdir()}


def _journal(ledger: BatchLedger) -> list[dict]:
    return [json.loads(line) for line in (ledger.folder / "journal.jsonl").read_bytes().splitlines()]


def test_an_ended_batch_leaves_only_its_count_and_the_open_ones_are_kept_whole(tmp_path: Path) -> None:
    ledger = BatchLedger(tmp_path)
    running = ledger.begin([member(0), member(1)])
    ledger.uploaded(running, "file-1")
    ledger.created(running, "batch-1")
    done = ledger.begin([member(2), member(3), member(4)])
    ledger.uploaded(done, "file-2")
    ledger.created(done, "batch-2")
    ledger.ended(done, "completed")
    assert _files(ledger) == {"journal.jsonl", f"{running.id}.members"}
    assert done.id not in (ledger.folder / "journal.jsonl").read_text() and "batch-2" not in (
        ledger.folder / "journal.jsonl").read_text()
    again = BatchLedger(tmp_path)
    assert [(i.id, i.rows, i.file_id, i.batch_id, i.created_at) for i in again.open_intents()] == [
        (running.id, 2, "file-1", "batch-1", running.created_at)]
    assert again.ended_counts() == {"completed": (1, 3)}
    assert again.held_positions() == {0, 1}
    again.ended(again.open_intents()[0], "expired")
    assert _files(again) == {"journal.jsonl"}
    assert _journal(again) == [{"event": "ended_batches", "counts": {"completed": [1, 3], "expired": [1, 2]}}]
    assert BatchLedger(tmp_path).ended_counts() == {"completed": (1, 3), "expired": (1, 2)}


def test_batches_that_never_ran_leave_nothing_at_all(tmp_path: Path) -> None:
    ledger = BatchLedger(tmp_path)
    intent = ledger.begin([member(0)])
    ledger.ended(intent, "never uploaded")  # not submitted: not counted either
    assert _files(ledger) == set()
    assert BatchLedger(tmp_path).ended_counts() == {} and BatchLedger(tmp_path).open_intents() == []


def test_the_sweep_removes_what_a_kill_left_of_ended_batches_and_keeps_the_open_ones(tmp_path: Path) -> None:
    ledger = BatchLedger(tmp_path)
    running = ledger.begin([member(0)])
    ledger.uploaded(running, "file-1")
    done = ledger.begin([member(1), member(2)])
    ledger.uploaded(done, "file-2")
    ledger.created(done, "batch-2")
    # A journal written before batches were removed (an "ended" line, its members kept), a members file
    # whose intent a kill kept from the journal, and a journal's temp file a kill left before its replace.
    with open(ledger.folder / "journal.jsonl", "ab") as journal:
        journal.write(json.dumps({"event": "ended", "intent": done.id, "status": "completed"}).encode() + b"\n")
    (ledger.folder / "intent-0000000000000000.members").write_bytes(b"never journaled")
    (ledger.folder / "journal.jsonl.123.tmp").write_bytes(b"cut")
    again = BatchLedger(tmp_path)
    assert again.ended_counts() == {"completed": (1, 2)}  # an old journal reads as it did
    again.sweep()
    assert _files(again) == {"journal.jsonl", f"{running.id}.members"}
    after = BatchLedger(tmp_path)
    assert [(i.id, i.file_id) for i in after.open_intents()] == [(running.id, "file-1")]
    assert after.ended_counts() == {"completed": (1, 2)}
    assert [m.custom_id for m in after.members(after.open_intents()[0])] == ["row-0"]


def test_the_sweep_of_an_output_without_batches_writes_nothing(tmp_path: Path) -> None:
    BatchLedger(tmp_path).sweep()
    assert not (tmp_path / "batches").exists()


def test_a_batch_whose_end_could_not_be_written_stays_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = BatchLedger(tmp_path)
    intent = ledger.begin([member(0)])
    ledger.uploaded(intent, "file-1")
    ledger.created(intent, "batch-1")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("batchrun.batches.ledger.replace_atomically", full)
    with pytest.raises(OSError, match="No space"):
        ledger.ended(intent, "completed")
    assert ledger.open_intents() == [intent] and ledger.held_positions() == {0}
    assert ledger.ended_counts() == {}
    assert [i.batch_id for i in BatchLedger(tmp_path).open_intents()] == ["batch-1"]
