"""The resume state: which source positions already have their final record."""

from __future__ import annotations

import numpy as np

__all__ = ["DoneSet"]


class DoneSet:
    """The source positions that already have their final record, as a growable bitmap.

    One bit per position: 100 million rows take 12.5 MB, however long their ids are. The runner
    skips a row iff its position is in the set. ``ok``, ``failed`` and ``retried_failures`` are the
    figures found at :meth:`~batchrun.output.ParquetSink.open`.
    """

    def __init__(self) -> None:
        self._bits = bytearray()
        self.ok = 0
        self.failed = 0
        self.retried_failures = 0

    def __repr__(self) -> str:
        return f"DoneSet(ok={self.ok}, failed={self.failed}, retried_failures={self.retried_failures})"

    def __contains__(self, position: int) -> bool:
        byte = position >> 3
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << (position & 7)))

    def pending_mask(self, start: int, count: int) -> np.ndarray:
        """A bool per position ``start .. start+count-1``, True where it is *not* done.

        The reader asks this once per stretch of input rather than once per row, so that a resume
        after 900,000 done rows leaves them out in milliseconds. The bytes are copied (a slice of the
        bytearray) because the sink may grow the bitmap meanwhile, which a view would forbid.
        """
        if start < 0 or count < 0:
            raise ValueError(f"positions are never negative, got start {start}, count {count}")
        first = start >> 3
        raw = bytes(self._bits[first : (start + count + 7) // 8 + 1])
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        done = bits[start - first * 8 : start - first * 8 + count].astype(bool)
        pending = np.ones(count, dtype=bool)
        pending[: len(done)] = ~done
        return pending

    @property
    def nbytes(self) -> int:
        """The memory held by the bitmap."""
        return len(self._bits)

    def _grow_to(self, byte_count: int) -> None:
        if byte_count > len(self._bits):
            # Grow by an eighth so that adding positions in order costs amortised O(1) while the
            # bitmap never holds much more than one bit per position seen.
            new_size = max(byte_count, len(self._bits) + len(self._bits) // 8, 4096)
            self._bits.extend(bytes(new_size - len(self._bits)))

    def add(self, position: int) -> bool:
        """Mark ``position`` done. Returns False if it already was."""
        if position < 0:
            raise ValueError(f"a position is never negative, got {position}")
        byte, mask = position >> 3, 1 << (position & 7)
        if byte >= len(self._bits):
            self._grow_to(byte + 1)
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        return True

    def add_many(self, positions: np.ndarray) -> None:
        """Mark every position of an array done (used when loading a shard's sidecar)."""
        if positions.size == 0:
            return
        positions = positions.astype(np.uint64, copy=False)
        self._grow_to(int(positions.max() >> np.uint64(3)) + 1)
        view = np.frombuffer(self._bits, dtype=np.uint8)
        try:
            bits = np.left_shift(np.uint8(1), (positions & np.uint64(7)).astype(np.uint8))
            np.bitwise_or.at(view, (positions >> np.uint64(3)).astype(np.intp), bits)
        finally:
            # The bytearray cannot grow while a numpy view of it is alive.
            del view
