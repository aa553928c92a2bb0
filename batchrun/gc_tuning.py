"""The garbage collector while a job sends: what exists before is frozen, and young collections are rarer.

A job allocates a few container objects a row (the row's columns, the request, the answer, its record)
and holds them until they are committed. With CPython's default first threshold (700 allocations) that
is a collection every hundred rows or so, and each full collection walks every object the imports made
(pyarrow, pandas, datasets, aiohttp: over 100,000). While the rows are sent, :func:`fewer_collections`
freezes what exists (``gc.freeze``: the imports, the spec, the preflight's objects) so that no
collection walks it again, and raises the first threshold to 20,000 allocations. Both are put back
when the block ends, so a notebook or script that calls ``batchrun.run`` gets its collector back as it
was. Cyclic garbage still goes: only later and in larger batches.

Measured on the client ceiling's job with no socket (benchmarks/own_cost.py's method, in one
interpreter): the collector's time for 20,000 rows fell from 13-87 ms to 3-4 ms, and batchrun's own CPU
for them from 0.53 s to 0.42 s.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["fewer_collections"]

#: Container allocations between two young collections while a job sends (CPython's default is 700).
FIRST_THRESHOLD = 20_000

_lock = threading.Lock()
_depth = 0  # nested jobs (the steps of one run): only the outermost block changes and restores the collector
_saved: tuple[int, int, int] | None = None


@contextmanager
def fewer_collections() -> Iterator[None]:
    """While the block runs: objects that exist now are frozen, and young collections come less often."""
    global _depth, _saved
    with _lock:
        _depth += 1
        if _depth == 1:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(FIRST_THRESHOLD, _saved[0]), _saved[1], _saved[2])
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                gc.unfreeze()
                _saved = None
