"""The output's record of every batch: what each holds and how far it got, written before anything waits on it.

    state/batches/journal.jsonl        one fsynced JSON line per step of a batch, in order:
                                         intent    its rows are chosen (their members file is written first)
                                         uploaded  the input file's id
                                         created   the batch's id
                                         ended     its answers are committed to the output (or it never ran)
    state/batches/<intent>.members     its rows: position, id, sample, input values, the request, attempts

A crash between two steps leaves the last one written, and a rerun takes it from there
(:meth:`BatchLedger.open_intents`): an intent without a file was never paid for and is dropped; a file
without a batch is looked for among the provider's batches (its ``metadata`` names the intent) and
created only if none is found; a batch is polled and collected.
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

from batchrun.output.files import fsync_dir, write_durably

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
            if kind == "intent":
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
        self.intents[intent.id] = intent
        return intent

    def uploaded(self, intent: Intent, file_id: str) -> None:
        self._append({"event": "uploaded", "intent": intent.id, "file_id": file_id})
        intent.file_id = file_id

    def created(self, intent: Intent, batch_id: str) -> None:
        self._append({"event": "created", "intent": intent.id, "batch_id": batch_id})
        intent.batch_id = batch_id

    def ended(self, intent: Intent, status: str) -> None:
        """The batch's answers are committed (or it never ran): its rows are no longer held."""
        self._append({"event": "ended", "intent": intent.id, "batch_id": intent.batch_id, "status": status})
        intent.ended, intent.status = True, status

    # ------------------------------------------------------------------ reading

    def members(self, intent: Intent) -> list[Member]:
        members: list[Member] = pickle.loads(self._members_path(intent.id).read_bytes())
        return members

    def open_intents(self) -> list[Intent]:
        """Every batch whose answers are not committed yet, oldest first."""
        return [intent for intent in self.intents.values() if not intent.ended]

    def held_positions(self) -> set[int]:
        """The rows in batches not ended: pending neither online nor for another batch."""
        return {m.position for intent in self.open_intents() for m in self.members(intent)}

    def _members_path(self, intent_id: str) -> Path:
        return self.folder / f"{intent_id}.members"
