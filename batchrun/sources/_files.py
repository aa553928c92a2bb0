"""Input files: resolving a path, folder or glob, and the content digests a fingerprint is made of."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from batchrun.errors import InputError

# Files up to this size are hashed whole for the fingerprint; larger ones by their head and tail.
FULL_DIGEST_MAX_BYTES = 64 * 2**20
SAMPLE_DIGEST_BYTES = 2**20

def _resolve_files(pattern: str, key: str, suffixes: tuple[str, ...]) -> tuple[list[Path], Path]:
    """The files ``pattern`` names, in sorted order, and the root their names are relative to."""
    cwd = os.getcwd()
    if glob.has_magic(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{key}: {pattern!r} matches no files (relative to {cwd})")
        return [Path(p) for p in matches], _glob_root(pattern)
    path = Path(pattern)
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not _is_hidden(p, path)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise InputError(f"{key}: folder {pattern!r} holds no {'/'.join(suffixes)} files (relative to {cwd})")
        return files, path
    if path.is_file():
        return [path], path.parent
    raise InputError(f"{key}: no such file or folder: {pattern!r} (relative to {cwd})")


def _is_hidden(path: Path, root: Path) -> bool:
    # Spark and Hadoop leave _SUCCESS, _metadata and .crc files next to their data.
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _file_digest(path: Path) -> str:
    """A hash of the file's content: all of it when small, its first and last MiB when large."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_MAX_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(f.read(SAMPLE_DIGEST_BYTES))
            f.seek(size - SAMPLE_DIGEST_BYTES)
            digest.update(f.read(SAMPLE_DIGEST_BYTES))
    return digest.hexdigest()


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
