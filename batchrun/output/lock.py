"""One writer per output folder: ``state/lock``.

Two runs writing one output would publish every row twice, so a run takes the lock before it writes
anything and releases it at the end. Belt and braces:

* ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the open lock file, held for the whole run. The kernel frees
  it when the holder dies, SIGKILL included; Linux NFS clients emulate it with POSIX locks, which
  the server sees across hosts.
* The file holds a JSON record of the holder (pid, host, process start time, ``since``) and a
  ``heartbeat_at`` that a daemon thread refreshes every 15 s. Where the filesystem does not carry
  the lock across hosts, the record still does: a record from another host whose heartbeat is fresh
  (younger than ``stale_after_s``) is a live run, and the lock is refused.
* Within one process the kernel lets a second ``flock`` on another descriptor of the same file fail
  too, but tests run jobs in-process, so the folders held by this process are also kept in a set.

The lock obtained over a record left on this host means its holder died (the kernel freed the lock):
the lock is taken over and the dead holder returned, so that the run can say so. The record is
emptied on release; a record found at acquisition is always a dead (or other-host) holder's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from batchrun.errors import OutputError, OutputLockedError
from batchrun.holder import Holder
from batchrun.output.files import write_error
from batchrun.output.layout import OutputStore

__all__ = ["LockState", "OutputLock", "read_lock"]

logger = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
STALE_AFTER_S = 90.0

#: Records are padded to this size, so that a heartbeat rewrites the file in one write of one length.
_RECORD_BYTES = 512
#: A ``batchrun status`` probe holds the lock for an instant; an acquirer retries this long before refusing.
_CONTENDED_RETRIES = 5
_CONTENDED_WAIT_S = 0.02
#: flock errors that mean the filesystem does not support it: then the record alone decides.
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

#: The lock files held in this process: lock path -> the OutputLock holding it.
_HELD: dict[str, OutputLock] = {}
_HELD_GUARD = threading.Lock()


@dataclass(frozen=True, slots=True)
class LockState:
    """What ``state/lock`` says: whether a live run holds it, who (None: unreadable), and its last heartbeat."""

    running: bool
    holder: Holder | None
    heartbeat_at: str | None


def _heartbeat_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age_s(stamp: str | None) -> float | None:
    """Seconds since ``stamp`` (ISO 8601), or None when it is missing or unreadable."""
    if not stamp:
        return None
    try:
        then = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (datetime.now(UTC) - then).total_seconds()


def _fresh(heartbeat_at: str | None, stale_after_s: float) -> bool:
    age = _age_s(heartbeat_at)
    return age is not None and age < stale_after_s


def _read_record(fd: int) -> tuple[Holder | None, str | None]:
    """The holder and heartbeat in the lock file open as ``fd``; (None, None) for an empty or unreadable one."""
    try:
        raw = json.loads(os.pread(fd, 64 * 1024, 0).decode("utf-8").strip() or "null")
    except (OSError, ValueError):
        return None, None
    holder = Holder.from_dict(raw)
    heartbeat = raw.get("heartbeat_at") if holder is not None else None
    return holder, heartbeat if isinstance(heartbeat, str) else None


def _try_flock(fd: int, operation: int, *, retries: int) -> bool | None:
    """Take ``operation`` (with LOCK_NB) on ``fd``: True when taken, False when held, None when unsupported."""
    for attempt in range(retries + 1):
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt == retries:
                return False
            # A bounded wait for a momentary holder (a status probe), not a synchronisation.
            time.sleep(_CONTENDED_WAIT_S)
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return None
            raise
    return False


class OutputLock:
    """The lock of one output folder. ``acquire()`` or ``with OutputLock(root):``; release is idempotent."""

    def __init__(
        self, root: str | Path | OutputStore, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        store = root if isinstance(root, OutputStore) else OutputStore(root)  # a shard's store: its own lock
        self.root = store.root
        self.path = store.lock_path
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        #: This process, once the lock is held.
        self.holder: Holder | None = None
        #: The dead (or long silent) holder whose lock :meth:`acquire` took over, if any.
        self.took_over: Holder | None = None
        self._fd: int | None = None
        self._key: str | None = None
        self._io = threading.Lock()  # the heartbeat thread and release() both use the descriptor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"OutputLock({str(self.root)!r}, held={self._fd is not None})"

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Holder | None:
        """Take the lock, or raise :class:`OutputLockedError` naming the run that holds it.

        Returns the holder whose lock was taken over (it is no longer running), or None.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already held")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.root, "state/lock", exc, resumable=False) from exc
        key = os.path.realpath(self.path)
        me = Holder.current()
        with _HELD_GUARD:
            other = _HELD.get(key)
            if other is not None:
                raise OutputLockedError(str(self.root), other.holder)
            _HELD[key] = self
            self.holder = me
        try:
            fd = self._take_file(me)
        except BaseException:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            self.holder = None
            raise
        self._fd, self._key = fd, key
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"batchrun-lock-{self.root.name}", daemon=True)
        self._thread.start()
        stale = self.took_over
        if stale is not None:
            logger.warning(
                "output.lock_taken_over output=%s (taking over the lock of pid %d on %s, which is no longer running)",
                self.root, stale.pid, stale.host,
            )  # fmt: skip
        return stale

    def _take_file(self, me: Holder) -> int:
        """Open and lock the file, judge the record found there, and write this process's record."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = _try_flock(fd, fcntl.LOCK_EX, retries=_CONTENDED_RETRIES)
            found, heartbeat = _read_record(fd)
            if locked is False:
                raise OutputLockedError(str(self.root), found)
            self.took_over = None
            if found is not None:
                if found.on_this_host():
                    # With the lock obtained, the kernel says its holder is gone; without flock, ask /proc.
                    if locked is None and found.alive() and not found.is_this_process():
                        raise OutputLockedError(str(self.root), found)
                elif _fresh(heartbeat, self.stale_after_s):
                    # The filesystem did not carry the lock across hosts, but the record did.
                    raise OutputLockedError(str(self.root), found)
                self.took_over = found
            self._write_record(fd, me)
        except BaseException:
            os.close(fd)  # releases the flock, if it was taken
            raise
        return fd

    def _write_record(self, fd: int, me: Holder) -> None:
        record = json.dumps({**me.to_dict(), "heartbeat_at": _heartbeat_now()}, sort_keys=True)
        data = record.encode().ljust(_RECORD_BYTES - 1) + b"\n"
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        except OSError as exc:
            raise write_error(self.root, "state/lock", exc, resumable=False) from exc

    def _beat(self) -> None:
        """Refresh ``heartbeat_at`` until released; a failed refresh is logged, and tried again next time."""
        while not self._stop.wait(self.heartbeat_s):
            with self._io:
                if self._fd is None or self.holder is None:
                    return
                try:
                    self._write_record(self._fd, self.holder)
                except Exception as exc:
                    logger.warning("output.lock_heartbeat_failed output=%s problem=%s", self.root, exc)

    def release(self) -> None:
        """Empty the record and release the lock. Does nothing when not held."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._io:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                # Emptied while still locked: a record found later is always a dead holder's.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)
        with _HELD_GUARD:
            if self._key is not None and _HELD.get(self._key) is self:
                del _HELD[self._key]
        self._key = None
        self.holder = None


def read_lock(root: str | Path | OutputStore, *, stale_after_s: float = STALE_AFTER_S) -> LockState | None:
    """Whether a live run holds ``root``'s lock, and who; None when no run has left a record there.

    Read-only: the probe takes a shared flock on a fresh descriptor and releases it at once.
    """
    store = root if isinstance(root, OutputStore) else OutputStore.parts(root)[0] if "://" in str(root) else None
    if store is not None and hasattr(store, "lease_state"):  # an object store: the writer's lease
        return store.lease_state()
    path = (root if isinstance(root, OutputStore) else OutputStore(root)).lock_path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    try:
        holder, heartbeat = _read_record(fd)
        with _HELD_GUARD:
            held_here = _HELD.get(os.path.realpath(path))
        free = _try_flock(fd, fcntl.LOCK_SH, retries=0)
        if free:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if held_here is not None:
        return LockState(running=True, holder=held_here.holder, heartbeat_at=heartbeat)
    if free is False:
        return LockState(running=True, holder=holder, heartbeat_at=heartbeat)
    if holder is None:
        return None
    # Free and on this host: dead (unless flock is unsupported here); on another host: its heartbeat says.
    running = (free is None and holder.alive()) if holder.on_this_host() else _fresh(heartbeat, stale_after_s)
    return LockState(running=running, holder=holder, heartbeat_at=heartbeat)
