"""The output's record of its batches: each step durable and read back, a torn last line harmless, and the
rows of batches not ended held out of the pending rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    assert again.intents[ended.id].status == "completed"
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
