"""Who holds something (an output folder, an endpoint's saved settings), and whether it still runs.

A :class:`Holder` names a process: its pid, its host, and its start time, which tells a live process
from a later one that reuses the pid (Linux: field 22 of ``/proc/PID/stat``; elsewhere unknown, and
the pid alone is trusted). Only a holder on this host can be checked; one on another host cannot.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["Holder", "process_alive", "process_started", "utc_now"]


def utc_now() -> str:
    """The time now, as ISO 8601 in UTC to the second: ``2026-11-30T00:12:03Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux); None elsewhere or if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_started(pid: int) -> str | None:
    """The process's start time (Linux), to tell a live process from a reused pid; None elsewhere."""
    fields = _proc_stat(pid)
    # Field 22 of the whole line; the fields after the command name start at field 3.
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_alive(pid: int, started: str | None) -> bool:
    """True when process ``pid`` still runs and (where it can be told) is the one that started at ``started``."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass
    except OSError:  # ProcessLookupError: gone
        return False
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: trust the signal check
    if fields[0] in ("Z", "X"):  # killed, not yet reaped
        return False
    return started is None or len(fields) <= 19 or fields[19] == started


@dataclass(frozen=True, slots=True)
class Holder:
    """A process that holds something: ``since`` is when it took it (ISO 8601, UTC)."""

    pid: int
    host: str
    started: str | None
    since: str

    @classmethod
    def current(cls) -> Holder:
        """This process, holding from now on."""
        pid = os.getpid()
        return cls(pid=pid, host=socket.gethostname(), started=process_started(pid), since=utc_now())

    @classmethod
    def from_dict(cls, raw: Any) -> Holder | None:
        """The holder a record describes, or None when it does not describe one."""
        if not isinstance(raw, dict):
            return None
        pid, host, started, since = raw.get("pid"), raw.get("host"), raw.get("started"), raw.get("since")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(host, str):
            return None
        return cls(
            pid=pid,
            host=host,
            started=started if isinstance(started, str) else None,
            since=since if isinstance(since, str) else "an unknown time",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_this_process(self) -> bool:
        return self.on_this_host() and self.pid == os.getpid() and self.started == process_started(os.getpid())

    def alive(self) -> bool:
        """Whether the holder still runs. A holder on another host cannot be checked and counts as alive."""
        if not self.on_this_host():
            return True
        return process_alive(self.pid, self.started)

    def describe(self) -> str:
        """``pid 1234 on host X, since 2026-11-30T00:12:03Z``."""
        return f"pid {self.pid} on host {self.host}, since {self.since}"
