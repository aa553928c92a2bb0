"""The shards' shared endpoint when their output is in an object store: the same bracket without flock.

The shards of a job whose output is ``s3://`` or ``gs://`` share no file system, so the agreement of
endpoints/shared_endpoint.py (first in resumes, last out puts down and restores the user's settings) is kept in
the store, under the output's prefix, with conditional writes::

    URL/state/endpoints/<namespace>__<name>-<hash>/
        guard.json                      who holds the guard now: taken with create-if-absent, removed on the
                                        way out; a dead holder's (its process gone on this host, or older
                                        than GUARD_STALE_S elsewhere) is taken over with replace-if-unchanged
        users/shard-00001-of-00004.json one per shard using the endpoint: pid, host, heartbeat
        users/bracket.json              `batchrun endpoint up JOB.yaml` until `... down JOB.yaml`
        settings.json                   the user's settings, saved by the first user before any change

While a user holds the guard, ``settings.json`` is copied to a local file (``settings_path``, what the
settings ledger reads and writes) and copied back when the guard is let go, so the ledger works as it
does on a shared folder. A store without conditional writes cannot make the guard exclusive: there,
bracket the shards with `batchrun endpoint up/down` from the launcher (docs/object-storage.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from batchrun.endpoints.saved_settings import endpoint_state_path
from batchrun.endpoints.shared_endpoint import BRACKET, HEARTBEAT_S, STALE_AFTER_S
from batchrun.errors import EndpointError, ObjectStoreError, PreconditionFailed
from batchrun.holder import Holder, utc_now

if TYPE_CHECKING:
    from batchrun.output.stores import ObjectStore

__all__ = ["GUARD_STALE_S", "StoreSharedUse"]

log = logging.getLogger("batchrun.endpoint")

#: A guard held longer than this by a process on another host is a dead one's (a join or a leave takes seconds).
GUARD_STALE_S = 300.0
_GUARD_POLL_S = 0.1


def _age_s(stamp: object) -> float | None:
    try:
        then = datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return (datetime.now(UTC) - then).total_seconds()


def _prefix(api_url: str | None, namespace: str, name: str) -> str:
    """Where, under the output's root, the users of one endpoint are recorded."""
    return f"state/endpoints/{endpoint_state_path(api_url, namespace, name).stem}/"


def bracket_registered(objects: ObjectStore, api_url: str | None, namespace: str, name: str) -> bool:
    """Whether ``batchrun endpoint up`` has bracketed this endpoint in the store (``users/bracket.json``)."""
    return any(Path(info.key).stem == BRACKET for info in objects.list(_prefix(api_url, namespace, name) + "users"))


class StoreSharedUse:
    """One user's (a shard's, or the bracket's) side of an endpoint shared through an object store."""

    def __init__(self, url: str, api_url: str | None, namespace: str, name: str, user: str, *,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        from batchrun.output.remote import cache_root
        from batchrun.output.stores import open_store

        self.url = url.rstrip("/")
        self.objects = open_store(self.url)
        self.prefix = _prefix(api_url, namespace, name)
        self.user = user
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.joined = False
        local = hashlib.sha256(f"{self.url}/{self.prefix}".encode()).hexdigest()[:20]
        #: The local copy of ``settings.json`` while this user holds the guard (see the module docstring).
        self.settings_path = cache_root() / "endpoints" / local / user / "settings.json"
        self._me = Holder.current()
        self._stop_beating = threading.Event()
        self._beating: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"StoreSharedUse({self.url}/{self.prefix}, user={self.user!r})"

    def _record(self) -> bytes:
        return json.dumps({**self._me.to_dict(), "user": self.user, "heartbeat_at": utc_now()}).encode()

    # ------------------------------------------------------------------ the guard

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Hold the guard object: joins and leaves (with their control-plane calls) take turns."""
        key = self.prefix + "guard.json"
        try:
            while not await asyncio.to_thread(self._take_guard, key):
                await asyncio.sleep(_GUARD_POLL_S)
            await asyncio.to_thread(self._settings_down)
        except ObjectStoreError as exc:
            raise EndpointError(f"cannot share the endpoint through {self.url}/{self.prefix}: {exc}") from None
        try:
            yield
        finally:
            try:
                await asyncio.to_thread(self._settings_up)
            finally:
                with contextlib.suppress(ObjectStoreError):
                    await asyncio.to_thread(self.objects.delete, key)

    def _take_guard(self, key: str) -> bool:
        try:
            self.objects.put_if_absent(key, self._record())
            return True
        except PreconditionFailed:
            pass
        try:
            data, version = self.objects.get(key)
        except ObjectStoreError as exc:
            if exc.missing:  # let go between our two requests: try again at once
                return False
            raise
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        holder = Holder.from_dict(record)
        # A record with no readable heartbeat (torn, or from elsewhere) cannot say its holder lives: it is
        # taken over like a stale one, as a shard's lease is, or every shard would wait on it for ever.
        age = _age_s(record.get("heartbeat_at"))
        dead = (not holder.alive()) if holder is not None and holder.on_this_host() else (
            age is None or age >= GUARD_STALE_S)
        if not dead:
            return False
        try:
            self.objects.put_if_match(key, self._record(), version)
        except PreconditionFailed:
            return False
        log.warning("endpoint_guard_taken_over from=%s", holder.describe() if holder else "an unreadable record")
        return True

    def _settings_down(self) -> None:
        try:
            data, _ = self.objects.get(self.prefix + "settings.json")
        except ObjectStoreError as exc:
            if not exc.missing:
                raise
            with contextlib.suppress(FileNotFoundError):
                self.settings_path.unlink()
            return
        self.settings_path.parent.mkdir(parents=True, exist_ok=True)
        self.settings_path.write_bytes(data)

    def _settings_up(self) -> None:
        try:
            data = self.settings_path.read_bytes()
        except FileNotFoundError:
            self.objects.delete(self.prefix + "settings.json")
            return
        self.objects.put(self.prefix + "settings.json", data)

    # ------------------------------------------------------------------ users

    def join(self, *, beat: bool = True) -> None:
        """Register as a user (call under the guard). ``beat``: keep the heartbeat fresh until :meth:`leave`."""
        self.objects.put(f"{self.prefix}users/{self.user}.json", self._record())
        self.joined = True
        if beat and self._beating is None:
            self._stop_beating.clear()
            self._beating = threading.Thread(target=self._beat, name=f"endpoint-user-{self.user}", daemon=True)
            self._beating.start()

    def leave(self) -> list[str]:
        """Remove this user (call under the guard); returns the users still alive, described for people."""
        self._stop_beating.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
        self.objects.delete(f"{self.prefix}users/{self.user}.json")
        self.joined = False
        return self.others()

    def others(self) -> list[str]:
        """The other users that are alive: ``shard-00002-of-00004 (pid 41 on host b)``."""
        alive = []
        for info in self.objects.list(self.prefix + "users"):
            name = Path(info.key).stem
            if name == self.user:
                continue
            try:
                record = json.loads(self.objects.get(info.key)[0])
            except ObjectStoreError:
                continue  # gone: it left
            except ValueError:
                record = {}
            holder = Holder.from_dict(record)
            if holder is None:
                alive.append(f"{name} (its record could not be read)")  # never taken as gone
                continue
            if name == BRACKET:
                alive.append(f"{name} ({holder.describe()})")
            elif holder.on_this_host():
                if holder.alive():
                    alive.append(f"{name} ({holder.describe()})")
            elif (age := _age_s(record.get("heartbeat_at"))) is not None and age < self.stale_after_s:
                alive.append(f"{name} ({holder.describe()})")
        return alive

    def _beat(self) -> None:
        while not self._stop_beating.wait(self.heartbeat_s):
            try:
                self.objects.put(f"{self.prefix}users/{self.user}.json", self._record())
            except ObjectStoreError as exc:  # a hiccup of the store: the next beat tries again
                log.warning("endpoint_heartbeat_failed %s", exc)
