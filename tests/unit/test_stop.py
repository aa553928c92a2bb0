"""One Stop for the whole job: the first reason wins, waits end at once, requests in flight get the grace."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from batchrun.stop import Stop, StopReason, catch_signals, forward_signals


def test_the_first_reason_wins_and_the_later_ones_are_ignored():
    async def main() -> Stop:
        stop = Stop(grace_s=30)
        assert stop.request(StopReason.BUDGET, "the budget is spent")
        assert not stop.request(StopReason.SIGNAL, "interrupted by SIGTERM")
        return stop

    stop = asyncio.run(main())
    assert stop.cause is not None and stop.cause.reason is StopReason.BUDGET and stop.early


def test_done_is_not_an_early_stop():
    async def main() -> Stop:
        stop = Stop()
        stop.request(StopReason.DONE, "every row has its record")
        return stop

    assert not asyncio.run(main()).early


def test_a_wait_in_until_requested_ends_as_soon_as_a_stop_is_requested():
    async def main() -> tuple[bool, bool]:
        stop = Stop(grace_s=30)
        never = asyncio.Event()

        async def waiter() -> bool:
            async with stop.until_requested() as scope:
                await never.wait()
            return scope.cancelled

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        stop.request(StopReason.SIGNAL, "test")
        cancelled = await asyncio.wait_for(task, 5)  # a limit against a hang
        async with stop.until_requested() as late:  # entered after the stop: cancelled at its first wait
            await never.wait()
        return cancelled, late.cancelled

    assert asyncio.run(main()) == (True, True)


def test_work_in_until_aborted_finishes_within_the_grace_and_is_cut_when_it_ends():
    async def main() -> tuple[bool, bool]:
        stop = Stop(grace_s=30)
        async with stop.until_aborted() as quick:
            stop.request(StopReason.SIGNAL, "test")
            await asyncio.sleep(0.01)  # work that ends well within the grace
        slow_started = asyncio.Event()

        async def slow() -> bool:
            async with stop.until_aborted() as scope:
                slow_started.set()
                await asyncio.Event().wait()
            return scope.cancelled

        task = asyncio.create_task(slow())
        await slow_started.wait()
        stop.abort()  # the grace is over
        return quick.cancelled, await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) == (False, True)


def test_a_cancellation_that_is_not_the_stops_goes_on():
    async def main() -> None:
        stop = Stop()

        async def body() -> None:
            async with stop.until_requested():
                await asyncio.Event().wait()

        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


@pytest.mark.parametrize(("signame", "aborted"), [("SIGHUP", False), ("SIGTERM", False), ("SIGQUIT", True)])
def test_signals_reach_the_stop_in_one_place(signame, aborted):
    async def main() -> Stop:
        stop = Stop(grace_s=30)
        lines: list[str] = []
        with catch_signals(stop, echo=lines.append):
            os.kill(os.getpid(), getattr(signal, signame))
            await stop.wait()
        return stop

    stop = asyncio.run(main())
    assert stop.cause is not None and stop.cause.detail == f"interrupted by {signame}"
    assert stop.aborted is aborted


@pytest.fixture
def own_handlers():
    """The test's changes to SIGTERM's and SIGHUP's handlers are undone after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_forwarded_signals_reach_the_job_then_the_handler_the_script_had(own_handlers):
    # batchrun.run's job runs on a thread of its own: the main thread takes the signal and hands it on.
    had: list[int] = []

    def scripts_own(signum: int, frame: object) -> None:
        had.append(signum)

    signal.signal(signal.SIGTERM, scripts_own)
    handed_on: list[str] = []
    with forward_signals(handed_on.append):
        signal.raise_signal(signal.SIGTERM)
        assert (handed_on, had) == (["SIGTERM"], [])  # the job stops first
    assert had == [signal.SIGTERM]  # then the script's own handler has it, put back
    assert signal.getsignal(signal.SIGTERM) is scripts_own


def test_a_signal_the_process_ignores_stays_ignored(own_handlers):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    handed_on: list[str] = []
    with forward_signals(handed_on.append):
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)
    assert handed_on == []


def test_a_borrowed_loop_leaves_a_handled_signal_to_its_owner(own_handlers):
    # batchrun.arun on the caller's loop takes only the signals nobody handles.
    had: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: had.append(signum))

    async def main() -> Stop:
        stop = Stop(grace_s=30)
        with catch_signals(stop, echo=lambda line: None, borrowed=True):
            signal.raise_signal(signal.SIGTERM)
            await asyncio.sleep(0)
        return stop

    stop = asyncio.run(main())
    assert had == [signal.SIGTERM] and not stop.requested


def test_the_command_leaves_a_signal_the_process_ignores_ignored(own_handlers):
    # `nohup batchrun run job.yaml &`: closing the terminal (SIGHUP) must not stop the job; SIGTERM still does.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def main() -> tuple[object, Stop]:
        stop = Stop(grace_s=30)
        with catch_signals(stop, echo=lambda line: None):
            during = signal.getsignal(signal.SIGHUP)
            signal.raise_signal(signal.SIGHUP)
            await asyncio.sleep(0)
            assert not stop.requested
            signal.raise_signal(signal.SIGTERM)
            for _ in range(100):  # the loop reads the signal from its wakeup pipe on a later turn
                if stop.requested:
                    break
                await asyncio.sleep(0.001)
        return during, stop

    during, stop = asyncio.run(main())
    assert during is signal.SIG_IGN and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert stop.requested and stop.cause is not None and "SIGTERM" in stop.cause.detail
