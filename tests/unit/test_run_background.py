"""The runner's background work and hooks: a TaskGroup that ends before the endpoint is released, a failed
commit that stops the job, and the extras called in their order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from batchrun import run_record
from batchrun.errors import OutputError
from batchrun.runner import RunOptions, _hooks, _in_background, _stop_on_error, _warn_on_error
from batchrun.stop import Stop, StopReason


async def _forever(log: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        log.append(f"{name} ended")


def test_background_tasks_are_cancelled_and_awaited_before_the_body_goes_on():
    log: list[str] = []

    async def main() -> None:
        async with _in_background({"a": _forever(log, "a"), "b": _forever(log, "b")}):
            await asyncio.sleep(0)
            log.append("body done")
        log.append("after")  # the release of the endpoint comes here: nothing runs in the background then

    asyncio.run(main())
    assert log == ["body done", "a ended", "b ended", "after"]


def test_the_bodys_error_comes_out_as_it_was_not_in_an_exception_group():
    log: list[str] = []

    async def main() -> None:
        async with _in_background({"a": _forever(log, "a")}):
            await asyncio.sleep(0)
            raise OutputError("disk full")

    with pytest.raises(OutputError, match="disk full"):
        asyncio.run(main())
    assert log == ["a ended"]


def test_a_failed_commit_in_the_background_stops_the_job_and_the_rest_goes_on():
    async def failing_commit() -> None:
        raise OutputError("committing shard 3 failed: no space left on device")

    async def main() -> Stop:
        stop = Stop(grace_s=1.0, echo=lambda _: None)
        async with _in_background({"committer": _stop_on_error(failing_commit(), stop)}):
            await asyncio.sleep(0.01)  # the body is not cancelled by the failure: the stop ends the sending
        return stop

    stop = asyncio.run(main())
    assert stop.cause is not None
    assert stop.cause.reason is StopReason.ERROR
    assert "no space left" in stop.cause.detail


def test_a_failing_progress_ledger_or_push_step_ends_only_itself_and_says_once_what_stopped(caplog):
    async def broken() -> None:
        raise RuntimeError("a bug in the progress line")

    async def main() -> str:
        async with _in_background({"progress": _warn_on_error(broken(), "the progress display"),
                                   "other": _forever([], "other")}):
            await asyncio.sleep(0.01)
        return "sent"

    with caplog.at_level("WARNING", logger="batchrun.runner"):
        assert asyncio.run(main()) == "sent"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["background_step_failed: the progress display stopped working "
                        "(RuntimeError: a bug in the progress line); the job goes on"]


def test_a_failed_budget_guard_stops_the_job_and_says_why():
    # The guard watches money: once it is gone, nothing may be sent unwatched.
    async def broken_guard() -> None:
        raise ZeroDivisionError("float division by zero")

    async def main() -> Stop:
        stop = Stop(grace_s=1.0, echo=lambda _: None)
        async with _in_background({"budget": _stop_on_error(broken_guard(), stop, what="the budget guard")}):
            await stop.wait()  # the body ends once the stop is requested, as the dispatcher does
        return stop

    stop = asyncio.run(main())
    assert stop.cause is not None and stop.cause.reason is StopReason.ERROR
    assert stop.cause.detail == "the budget guard failed, so sending stops: ZeroDivisionError: float division by zero"


def test_the_extras_are_called_record_then_comparison_then_notification_then_push():
    notify = SimpleNamespace(url=lambda: "https://hooks.example/x")
    pusher = SimpleNamespace(every_s=None)
    hooks = _hooks(SimpleNamespace(notify=notify), "run-1", RunOptions(compare_with="previous"), pusher)  # type: ignore[arg-type]
    assert [type(hook).__name__ for hook in hooks] == ["RunRecord", "Comparison", "Notification", "SimpleNamespace"]
    comparison, notification = hooks[1], hooks[2]
    assert isinstance(notification, run_record.Notification)
    assert notification.comparison is comparison  # the webhook carries the comparison's verdict


def test_without_notify_or_push_only_the_record_and_the_comparison_are_called():
    hooks = _hooks(SimpleNamespace(notify=None), "run-1", RunOptions(), None)  # type: ignore[arg-type]
    assert [type(hook).__name__ for hook in hooks] == ["RunRecord", "Comparison"]
