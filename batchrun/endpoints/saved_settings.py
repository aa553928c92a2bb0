"""The user's endpoint settings, kept on disk while a job has changed them.

A job that scales an endpoint or sets its idle backstop writes what the user had to one file per
endpoint (control plane + namespace + name) in batchrun's state folder, outside any output folder.
Its release puts those values back and deletes the file. A job killed with SIGKILL never releases,
so the next run on that endpoint (from any job, after ``--fresh``, into another output) finds the file
and restores the user's values rather than the killed run's. A file held by a run that is still alive
is left to that run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun.endpoints.control_plane import DEFAULT_API_URL, EndpointSnapshot
from batchrun.errors import EndpointError
from batchrun.holder import process_alive, process_started

__all__ = ["SavedSettings", "UserSettings", "endpoint_state_path", "state_dir"]

#: State files held by endpoints alive in this process (between saving or adopting one and release).
_HELD: set[str] = set()


def state_dir() -> Path:
    """batchrun's own state folder: $BATCHRUN_STATE_DIR, else $XDG_CACHE_HOME/batchrun, else ~/.cache/batchrun."""
    explicit = os.environ.get("BATCHRUN_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "batchrun"


def endpoint_state_path(api_url: str | None, namespace: str, name: str) -> Path:
    """The file for one endpoint: readable (``ns__name``) and unique (a hash of base, namespace, name)."""
    api = (api_url or DEFAULT_API_URL).rstrip("/")
    digest = hashlib.sha256(f"{api}/{namespace}/{name}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{namespace}__{name}")[:96]
    return state_dir() / "endpoints" / f"{readable}-{digest}.json"


@dataclass(frozen=True, slots=True)
class UserSettings:
    """What the user had before a job changed the endpoint."""

    initial_state: str
    min_replica: int
    max_replica: int
    scale_to_zero_timeout: int | None


class SavedSettings:
    """One endpoint's saved-settings file: load what a dead run left, save before changing, forget after."""

    def __init__(self, path: str | Path, ref: str, api_url: str | None, *, shared: bool = False) -> None:
        self.path = str(path)
        # The shards of a job keep one file in their output (shared_endpoint.py): every shard adopts it, whoever
        # wrote it, and only the last one out deletes it; who is alive is told by their user files.
        self.shared = shared
        self.ref = ref
        self.api_url = api_url
        self.owned = False  # this run wrote (or took over) the file: it deletes it after the release
        self.foreign_owner: str | None = None  # a live process that holds the file

    def load(self) -> UserSettings | None:
        """The settings an earlier run saved and never put back, or None.

        A file held by a run that is still alive (another job on the same endpoint) is not taken over:
        that run will put the endpoint back itself (``foreign_owner`` then says who).
        """
        try:
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("endpoint") != self.ref:
            return None
        pid, host = saved.get("pid"), saved.get("host")
        if not self.shared and isinstance(pid, int) and host == socket.gethostname():
            alive = self.path in _HELD if pid == os.getpid() else process_alive(pid, saved.get("process_started"))
            if alive:
                self.foreign_owner = f"pid {pid}"
                return None
        self.owned = True  # left by a dead run: now this run's to put back and delete
        _HELD.add(self.path)
        try:
            return UserSettings(
                initial_state=str(saved.get("initial_state", "")),
                min_replica=int(saved["min_replica"]),
                max_replica=int(saved["max_replica"]),
                scale_to_zero_timeout=saved.get("scale_to_zero_timeout"),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, original: EndpointSnapshot) -> None:
        """Write the user's settings before the first change; an error here stops the job before it."""
        if self.foreign_owner is not None or self.owned:
            return
        record: dict[str, Any] = {
            "endpoint": self.ref,
            "api_url": self.api_url,
            "initial_state": original.state,
            "min_replica": original.min_replica,
            "max_replica": original.max_replica,
            "scale_to_zero_timeout": original.scale_to_zero_timeout,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "process_started": process_started(os.getpid()),
            "host": socket.gethostname(),
        }
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            # Before any change: without this record a SIGKILL would leave the next run unable to restore.
            raise EndpointError(
                f"cannot save {self.ref}'s settings to {self.path} before changing them ({exc}); "
                "set BATCHRUN_STATE_DIR to a writable folder"
            ) from None
        self.owned = True
        _HELD.add(self.path)

    def release(self, *, forget: bool) -> None:
        """The job is done with the endpoint: delete the file if it was put back (``forget``) and ours."""
        if self.owned and forget:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        _HELD.discard(self.path)
