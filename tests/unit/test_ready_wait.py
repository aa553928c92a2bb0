"""The ready wait alone (endpoints/ready.py): scripted control-plane answers, a clock that moves only when
the wait sleeps, and a health check that answers what the test says."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from batchrun.endpoints.control_plane import EndpointSnapshot
from batchrun.endpoints.ready import FAST_POLL_S, ReadyWait
from batchrun.errors import EndpointError, EndpointNotReadyError


def snap(state: str, ready: int = 0, *, message: str = "") -> EndpointSnapshot:
    return EndpointSnapshot(
        name="gen", namespace="ns", state=state, url="http://gen.local" if state == "running" else None,
        message=message, task="text-generation", repository="org/model", revision=None, health_route="/health",
        ready_replicas=ready, target_replicas=2, min_replica=2, max_replica=2, scale_to_zero_timeout=None,
    )


class Script:
    """The control plane's answers in order (None: the read failed), the time, and what the wait said."""

    def __init__(self, answers: Iterable[EndpointSnapshot | None], health: Iterable[bool] = ()) -> None:
        self.answers = list(answers)
        self.health = list(health)
        self.now = 100.0
        self.sleeps: list[float] = []
        self.events: list[str] = []
        self.health_asked: list[str] = []
        self.last: EndpointSnapshot | None = None

    async def poll(self) -> EndpointSnapshot | None:
        answer = self.answers.pop(0) if self.answers else self.last
        self.last = answer if answer is not None else self.last  # a failed read keeps the last one (as _poll)
        return self.last

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def healthy(self, snapshot: EndpointSnapshot) -> bool:
        self.health_asked.append(snapshot.state)
        return self.health.pop(0) if self.health else True

    def wait(self, *, target: int = 2, timeout_s: float = 60.0, poll_interval_s: float = 2.0) -> ReadyWait:
        return ReadyWait("ns/gen", target=target, timeout_s=timeout_s, poll_interval_s=poll_interval_s, token=None,
                         poll=self.poll, on_event=self.events.append, clock=lambda: self.now, sleep=self.sleep)

    def until_ready(self, wait: ReadyWait) -> EndpointSnapshot:
        return asyncio.run(wait.until_ready(self.healthy))


def test_waits_for_every_target_replica_and_a_healthy_answer_polling_fast_once_running():
    script = Script([snap("paused"), snap("initializing"), snap("initializing"), snap("running", 1),
                     snap("running", 2), snap("running", 2)], health=[False, True])
    ready = script.until_ready(script.wait())
    assert (ready.state, ready.ready_replicas) == ("running", 2)
    # One line per change of state, not per poll.
    assert script.events == ["ns/gen: paused, replicas 0/2", "ns/gen: initializing, replicas 0/2",
                             "ns/gen: running, replicas 1/2", "ns/gen: running, replicas 2/2"]
    # The health route is asked only with every target replica ready; a refusal means one more poll.
    assert script.health_asked == ["running", "running"]
    assert script.sleeps == [2.0, 2.0, 2.0, FAST_POLL_S, FAST_POLL_S]


def test_a_control_plane_hiccup_does_not_end_the_wait():
    script = Script([None, None, snap("initializing"), None, snap("running", 1)])
    ready = script.until_ready(script.wait(target=1))
    assert ready.ready_replicas == 1
    assert script.events == ["ns/gen: initializing, replicas 0/1", "ns/gen: running, replicas 1/1"]


@pytest.mark.parametrize("state", ["failed", "updateFailed"])
def test_a_failed_state_ends_the_wait_at_once(state):
    script = Script([snap("initializing"), snap(state, message="out of memory")])
    with pytest.raises(EndpointError) as raised:
        script.until_ready(script.wait())
    assert not isinstance(raised.value, EndpointNotReadyError)
    assert raised.value.state == state
    assert str(raised.value) == f"endpoint ns/gen became {state} while starting: out of memory"
    assert script.sleeps == [2.0]


def test_the_timeout_ends_the_wait_on_time_with_the_last_state_seen():
    script = Script([snap("initializing")] * 3 + [snap("running", 1)] * 100)
    with pytest.raises(EndpointNotReadyError) as raised:
        script.until_ready(script.wait(timeout_s=6.25))
    assert str(raised.value) == ("endpoint ns/gen was not ready after 6s (last state running, replicas 1/2); "
                                 "raise endpoint.ready_timeout or check the endpoint's logs")
    assert raised.value.state == "running"
    # The last sleep is cut to the deadline: the wait ends at 6.25 s, not at the next whole poll interval.
    assert script.sleeps == [2.0, 2.0, 2.0, 0.25]
    assert script.now == 106.25


def test_a_timeout_with_nothing_read_says_so():
    script = Script([None] * 10)
    with pytest.raises(EndpointNotReadyError) as raised:
        script.until_ready(script.wait(timeout_s=3.0, poll_interval_s=2.0))
    assert "(last state unknown, replicas 0/2)" in str(raised.value)
    assert raised.value.state == "unknown"
    assert script.events == [] and script.sleeps == [2.0, 1.0]
