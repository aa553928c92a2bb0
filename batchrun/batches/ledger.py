"""The output's record of every batch: what each holds and how far it got, written before anything waits on it.

    state/batches/journal.jsonl        one fsynced JSON line per step of a batch, in order:
                                         intent    its rows are chosen (their members file is written first)
                                         uploaded  the input file's id
                                         created   the batch's id
                                       and first, a count of the batches ended (``ended_batches``)
    state/batches/<intent>.members     its rows: position, id, sample, input values, the request, attempts

A crash between two steps leaves the last one written, and a rerun takes it from there
(:meth:`BatchLedger.open_intents`): an intent without a file was never paid for and is dropped; a file
without a batch is looked for among the provider's batches (its ``metadata`` names the intent) and
created only if none is found; a batch is polled and collected.

A batch ends once its answers are committed to the output (or it never ran): the journal is then
replaced, at once, by one without its steps (its count kept for ``batchrun status``), and its members
file is removed. A crash before the replace leaves it open (collected again, its committed rows
skipped); one after it leaves a members file that the next run's :meth:`BatchLedger.sweep` removes.
Journals that still hold ``ended`` lines (written before batches were removed) are read as well.
"""

from __future__ import annotations

import os
import pickle
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchrun.output.files import fsync_dir, replace_atomically, write_durably

__all__ = ["BatchLedger", "Intent", "Member"]

JOURNAL = "journal.jsonl"


@dataclass(frozen=True, slots=True)
class Member:
    """One row in a batch: where it is in the source, its id and sample, what it keeps, and its request."""

    position: int
    id: Any
    sample: int
    columns: dict[str, Any]  # the input row's values: what the prompt is made of and the output keeps
    path: str
    payload: dict[str, Any]
    outputs: dict[str, Any]
    answer_schema: dict[str, Any] | None
    attempts: int  # sent in earlier batches already

    @property
    def custom_id(self) -> str:
        """The line's ``custom_id``: the row's id, and its sample when there are several."""
        return f"{self.id}" if self.sample == 0 else f"{self.id}#{self.sample}"


@dataclass(slots=True)
class Intent:
    """One batch, as far as the journal knows it."""

    id: str
    rows: int
    file_id: str | None = None
    batch_id: str | None = None
    ended: bool = False
    status: str | None = None
    created_at: float = field(default_factory=time.time)


class BatchLedger:
    """``state/batches/``: the journal and the members of every batch (see the module's docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = Path(state_dir) / "batches"
        self.intents: dict[str, Intent] = {}
        #: The submitted batches ended and gone from the journal: status -> (batches, rows).
        self.tally: dict[str, tuple[int, int]] = {}
        self._load()

    def _load(self) -> None:
        path = self.folder / JOURNAL
        if not path.exists():
            return
        for line in path.read_bytes().splitlines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut by a crash: the step it records did not finish
            intent = self.intents.get(event.get("intent", ""))
            kind = event.get("event")
            if kind == "ended_batches":
                self.tally = {str(k): (int(v[0]), int(v[1])) for k, v in event["counts"].items()}
            elif kind == "intent":
                self.intents[event["intent"]] = Intent(event["intent"], int(event["rows"]),
                                                       created_at=float(event.get("at", 0.0)))
            elif intent is None:
                continue
            elif kind == "uploaded":
                intent.file_id = event["file_id"]
            elif kind == "created":
                intent.batch_id = event["batch_id"]
            elif kind == "ended":
                intent.ended, intent.status = True, event.get("status")

    def _append(self, event: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / JOURNAL
        new = not path.exists()
        with open(path, "ab") as journal:
            journal.write(orjson.dumps({**event, "at": time.time()}) + b"\n")
            journal.flush()
            os.fsync(journal.fileno())
        if new:
            fsync_dir(self.folder)

    # ------------------------------------------------------------------ the steps, each durable

    def begin(self, members: list[Member]) -> Intent:
        """A new batch's rows, written (and fsynced) before anything is uploaded."""
        intent = Intent("intent-" + secrets.token_hex(8), len(members))
        self.folder.mkdir(parents=True, exist_ok=True)
        write_durably(self._members_path(intent.id), pickle.dumps(members, protocol=pickle.HIGHEST_PROTOCOL))
        fsync_dir(self.folder)
        self._append({"event": "intent", "intent": intent.id, "rows": intent.rows})
        # Replaced, not added to: this runs on a worker thread while the loop may be iterating the intents.
        self.intents = {**self.intents, intent.id: intent}
        return intent

    def uploaded(self, intent: Intent, file_id: str) -> None:
        self._append({"event": "uploaded", "intent": intent.id, "file_id": file_id})
        intent.file_id = file_id

    def created(self, intent: Intent, batch_id: str) -> None:
        self._append({"event": "created", "intent": intent.id, "batch_id": batch_id})
        intent.batch_id = batch_id

    def ended(self, intent: Intent, status: str) -> None:
        """The batch's answers are committed (or it never ran): its rows are no longer held, and nothing of
        it stays on disk but its count."""
        intent.ended, intent.status = True, status
        try:
            self._compact()
        except BaseException:  # not written: the batch is still open, here as in the journal
            intent.ended, intent.status = False, None
            raise

    def sweep(self) -> None:
        """Remove what a run killed mid-way left of batches ended (or of an intent never journaled): their
        journal lines and members files. For the output's writer only, before it submits anything."""
        if not self.folder.is_dir():
            return
        if any(intent.ended for intent in self.intents.values()):
            self._compact()
        kept = {JOURNAL, *(self._members_path(i.id).name for i in self.open_intents())}
        for path in self.folder.iterdir():
            if path.name not in kept and path.is_file():
                path.unlink(missing_ok=True)

    def _compact(self) -> None:
        """Replace the journal, atomically, by the open batches' steps and the count of the ended ones;
        then remove the ended ones' members files. With nothing open nor counted, the journal goes too."""
        ended = [intent for intent in self.intents.values() if intent.ended]
        tally = dict(self.tally)
        for intent in ended:
            if intent.batch_id is not None:  # submitted: `batchrun status` counts it
                batches, rows = tally.get(str(intent.status), (0, 0))
                tally[str(intent.status)] = (batches + 1, rows + intent.rows)
        lines: list[dict[str, Any]] = [{"event": "ended_batches", "counts": tally}] if tally else []
        for intent in self.open_intents():
            lines.append({"event": "intent", "intent": intent.id, "rows": intent.rows, "at": intent.created_at})
            if intent.file_id is not None:
                lines.append({"event": "uploaded", "intent": intent.id, "file_id": intent.file_id})
            if intent.batch_id is not None:
                lines.append({"event": "created", "intent": intent.id, "batch_id": intent.batch_id})
        journal = self.folder / JOURNAL
        if lines:
            replace_atomically(journal, b"".join(orjson.dumps(line) + b"\n" for line in lines), self.folder)
        else:
            journal.unlink(missing_ok=True)
            fsync_dir(self.folder)
        self.tally = tally
        # A new dict, not deletions: this runs in a worker thread while the event loop may be reading it.
        self.intents = {key: intent for key, intent in self.intents.items() if not intent.ended}
        for intent in ended:
            self._members_path(intent.id).unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading

    def members(self, intent: Intent) -> list[Member]:
        members: list[Member] = pickle.loads(self._members_path(intent.id).read_bytes())
        return members

    def ended_counts(self) -> dict[str, tuple[int, int]]:
        """The submitted batches ended, by status: (batches, rows)."""
        counts = dict(self.tally)
        for intent in self.intents.values():
            if intent.ended and intent.batch_id is not None:
                batches, rows = counts.get(str(intent.status), (0, 0))
                counts[str(intent.status)] = (batches + 1, rows + intent.rows)
        return counts

    def open_intents(self) -> list[Intent]:
        """Every batch whose answers are not committed yet, oldest first."""
        return [intent for intent in self.intents.values() if not intent.ended]

    def held_positions(self) -> set[int]:
        """The rows in batches not ended: pending neither online nor for another batch."""
        return {m.position for intent in self.open_intents() for m in self.members(intent)}

    def _members_path(self, intent_id: str) -> Path:
        return self.folder / f"{intent_id}.members"
