"""An endpoint shared by the shards of one job: no shard puts it down under another, the last one out does.

Each shard of a split job (shards.py) is a process of its own, often on a machine of its own, and all
of them send to the same managed endpoint. They agree through files in the job's output folder, which
the shards share anyway (docs/shards.md)::

    OUTPUT/state/endpoints/<namespace>__<name>-<hash>/
        users/shard-00001-of-00004.json   one per shard using the endpoint: pid, host, heartbeat
        users/bracket.json                `batchrun endpoint up JOB.yaml` until `... down JOB.yaml`
        settings.json                     the user's settings, saved by the first user before any change
        guard                             an exclusive lock (flock): one user at a time joins or leaves

- **Joining** (under the guard): the shard writes its user file, then reads the endpoint, saves or adopts
  the user's settings, applies its scaling and asks for the resume. Waiting until ready happens after.
- **Leaving** (under the guard, once the shard's traffic has stopped): the shard removes its file and
  looks at the others. While one is alive, it leaves the endpoint as it is. The last one applies
  ``on_finish`` and puts the user's settings back, still under the guard, so a shard that starts at
  that moment joins after the pause and resumes the endpoint: nothing is sent to a paused endpoint.
- **Alive** means: on this host, the process still runs; on another host, its heartbeat (rewritten
  every ``HEARTBEAT_S``) is younger than ``STALE_AFTER_S``. A shard killed with SIGKILL therefore stops
  counting at once on this host, and after ``STALE_AFTER_S`` elsewhere. A bracket never goes stale.
- **A shard that dies last** puts nothing down: the endpoint's idle backstop (``scale_to_zero_timeout``,
  set by the first user) scales it to zero that long after its last request, or
  `batchrun endpoint down JOB.yaml` does it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from batchrun.endpoints.saved_settings import endpoint_state_path
from batchrun.errors import EndpointError
from batchrun.holder import Holder, utc_now

__all__ = ["BRACKET", "SharedUse", "shared_folder"]

log = logging.getLogger("batchrun.endpoint")

HEARTBEAT_S = 20.0
#: A user file on another host whose heartbeat is older than this is a dead shard's.
STALE_AFTER_S = 180.0
#: The user `batchrun endpoint up JOB.yaml` registers; `... down JOB.yaml` removes it.
BRACKET = "bracket"
_GUARD_POLL_S = 0.05
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def shared_folder(output: str | Path, api_url: str | None, namespace: str, name: str) -> Path:
    """Where the users of one endpoint meet, in a job's output folder."""
    return Path(output) / "state" / "endpoints" / endpoint_state_path(api_url, namespace, name).stem


class SharedUse:
    """One user's (a shard's, or the bracket's) side of an endpoint shared through ``folder``."""

    def __init__(self, folder: str | Path, user: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        if not _NAME.match(user):
            raise ValueError(f"not a user name: {user!r}")
        self.folder = Path(folder)
        self.user = user
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.joined = False
        self._me = Holder.current()
        self._stop_beating = threading.Event()
        self._beating: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SharedUse({str(self.folder)!r}, user={self.user!r})"

    @property
    def settings_path(self) -> Path:
        """The user's settings while the shards have the endpoint changed (see saved_settings.py)."""
        return self.folder / "settings.json"

    @property
    def users_dir(self) -> Path:
        return self.folder / "users"

    # ------------------------------------------------------------------ the guard

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Hold the folder's exclusive lock: joins and leaves (with their control-plane calls) take turns.

        flock is freed by the kernel when its holder dies, and Linux NFS clients carry it to the server
        as a POSIX lock, so a guard is never left behind by a killed shard.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / "guard", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise EndpointError(f"cannot share the endpoint through {self.folder}: {exc}. The shards of a "
                                "job need their output folder on storage they all can write") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise EndpointError(f"cannot lock {self.folder / 'guard'}: {exc}") from None
                await asyncio.sleep(_GUARD_POLL_S)
            yield
        finally:
            os.close(fd)  # also frees the lock

    # ------------------------------------------------------------------ users

    def join(self, *, beat: bool = True) -> None:
        """Register as a user (call under the guard). ``beat``: keep the heartbeat fresh until :meth:`leave`."""
        self.users_dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self.joined = True
        if beat and self._beating is None:
            self._stop_beating.clear()
            self._beating = threading.Thread(target=self._beat, name=f"endpoint-user-{self.user}", daemon=True)
            self._beating.start()

    def leave(self) -> list[str]:
        """Remove this user (call under the guard); returns the users still alive, described for people."""
        self._stop_beating.set()
        if self._beating is not None:
            self._beating.join()  # a beat caught in a slow write must not put the file back after the unlink
            self._beating = None
        with contextlib.suppress(FileNotFoundError):
            (self.users_dir / f"{self.user}.json").unlink()
        self.joined = False
        return self.others()

    def others(self) -> list[str]:
        """The other users that are alive: ``shard-00002-of-00004 (pid 41 on host b)``."""
        alive = []
        for path in sorted(self.users_dir.glob("*.json")) if self.users_dir.is_dir() else []:
            name = path.stem
            if name == self.user:
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                holder = Holder.from_dict(record)
            except (OSError, ValueError):
                record, holder = {}, None
            if holder is None:
                # Being replaced this instant (ESTALE on NFS), or torn: a user it cannot read is taken as
                # alive while the file itself is fresh, never as gone, so nothing is paused under it.
                if self._fresh_file(path):
                    alive.append(f"{name} (its record could not be read)")
                continue
            if name == BRACKET or self._alive(holder, record.get("heartbeat_at")):
                alive.append(f"{name} ({holder.describe()})")
        return alive

    def _alive(self, holder: Holder, heartbeat_at: str | None) -> bool:
        if holder.on_this_host():
            return holder.alive()
        try:
            beat = datetime.strptime(str(heartbeat_at), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return False
        return (datetime.now(UTC) - beat).total_seconds() < self.stale_after_s

    def _fresh_file(self, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False  # gone: it left
        return age < self.stale_after_s

    def _write(self) -> None:
        from batchrun.output.files import json_bytes, replace_atomically  # loaded with the output, not before

        record = {**self._me.to_dict(), "user": self.user, "heartbeat_at": utc_now()}
        # Its temp file ends in .tmp, which others() does not read.
        replace_atomically(self.users_dir / f"{self.user}.json", json_bytes(record), self.users_dir)

    def _beat(self) -> None:
        while not self._stop_beating.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError as exc:  # a hiccup of the shared storage: the next beat tries again
                log.warning("endpoint_heartbeat_failed %s", exc)
