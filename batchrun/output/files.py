"""Durable-file helpers: fsync a folder, write a file durably, replace one atomically, move one aside.

Every writer here removes what it leaves half-written when it fails (a full disk, a failing device),
so that a failed write never leaves a temp file behind. :func:`write_error` turns the ``OSError``
into the :class:`OutputError` a user reads: it names what was being written, and says plainly when
the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from batchrun.errors import OutputError, redact

__all__ = [
    "fsync_dir",
    "json_bytes",
    "move_aside",
    "read_json",
    "replace_atomically",
    "write_durably",
    "write_error",
    "write_file_durably",
]

#: The errors that mean "the disk (or the user's share of it) is full".
_FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT})


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive power loss (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_durably(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create ``path``, let ``write`` fill it, then flush and fsync it.

    Not atomic: only for files that are not yet trusted (temp files, sidecars). If anything fails,
    the partial file is removed before the error propagates.
    """
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (see :func:`write_file_durably`)."""
    write_file_durably(path, lambda f: f.write(data))


def replace_atomically(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one, never half.

    The temp file is removed if the write or the rename fails.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.tmp"
    write_durably(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def move_aside(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` under a name that does not overwrite anything already there."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{path.stem}.{n}{path.suffix}"
    os.replace(path, target)
    fsync_dir(folder)
    fsync_dir(path.parent)
    return target


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path} is not valid JSON ({exc}); restore it or pass --fresh") from exc


def json_bytes(value: dict) -> bytes:
    """``value`` as the bytes of a state file."""
    # redact(): state files must never hold the token, wherever a value in them came from.
    return redact(json.dumps(value, indent=2, sort_keys=True, default=str)).encode() + b"\n"


def write_error(root: Path, what: str, exc: OSError, *, resumable: bool = True) -> OutputError:
    """The error to raise when writing ``what`` (a path relative to ``root``, or a description) failed.

    A full disk is said plainly, with what to do about it; any other error keeps the system's words.
    """
    if exc.errno in _FULL_DISK:
        then = "free space and run again to resume" if resumable else "free space and try again"
        return OutputError(f"No space left on the disk holding {root}: could not write {what}; {then}")
    return OutputError(f"cannot write {what} in {root}: {exc}")
