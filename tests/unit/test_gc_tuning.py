"""The collector while a job sends: frozen and quieter inside the block, exactly as it was after it."""

from __future__ import annotations

import gc

import pytest

from batchrun.gc_tuning import FIRST_THRESHOLD, fewer_collections


def test_the_block_freezes_what_exists_and_raises_the_first_threshold_then_puts_both_back():
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with fewer_collections():
        assert gc.get_threshold() == (max(FIRST_THRESHOLD, before[0]), before[1], before[2])
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_nested_blocks_restore_once_the_outermost_ends_and_an_error_restores_too():
    before = gc.get_threshold()
    seen: list[tuple[int, int]] = []

    def job() -> None:
        with fewer_collections():
            with fewer_collections():  # a step of a run of several steps
                pass
            seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
            raise RuntimeError("the job failed")

    with pytest.raises(RuntimeError):
        job()
    assert seen[0][0] == max(FIRST_THRESHOLD, before[0]) and seen[0][1] > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_cyclic_garbage_made_inside_the_block_is_still_collected():
    class Node:
        def __init__(self) -> None:
            self.me = self

    with fewer_collections():
        import weakref

        ref = weakref.ref(Node())
        gc.collect()
        assert ref() is None
