"""Which process holds something: pid, host and start time, and whether that process still runs.

Used for the output folder's lock and for an endpoint's saved settings: both must tell a live holder
from one that was killed (SIGKILL leaves its files behind) and from a pid the system has reused.
"""

from __future__ import annotations

import os

__all__ = ["process_alive", "process_started"]


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
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_alive(pid: int, started: str | None) -> bool:
    """True when process ``pid`` still runs and (where it can be told) is the one that ``started``."""
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
