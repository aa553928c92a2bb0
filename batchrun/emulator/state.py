"""The lifecycle of one emulated endpoint: its state machine, its replicas and its bill.

States are those of Inference Endpoints: ``pending``, ``initializing``, ``updating``,
``updateFailed``, ``running``, ``paused``, ``failed``, ``scaledToZero``.

- resume from ``paused``: ``pending`` (pending_s) -> ``initializing`` (initializing_s, one replica
  starting) -> ``running`` with one ready replica; further replicas up to the target start one
  after the other, replica_start_s each, while the endpoint stays ``running`` (assumed).
- update raising the replica target: ``updating`` while replicas start one by one, then ``running``.
  Lowering it drops replicas at once.
- pause: ``paused``, url null, 0 replicas. scale-to-zero: ``scaledToZero``, url kept, 0 replicas;
  ``wake()`` (a data-plane request) goes ``initializing`` -> ``running`` without ``pending``.
- ``fail_on_deploy`` ends a deploy in ``failed``; a failed endpoint cannot be resumed.
- With min_replica 0 and a scale_to_zero_timeout, an idle running endpoint scales to zero.

Billing: replica-seconds of ready replicas plus the one replica starting, measured on a
monotonic clock. Pending, paused, scaled-to-zero and failed endpoints cost nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from batchrun.emulator.config import EndpointConfig

ACTIVE_STATES = ("running", "updating")


class TransitionRefused(Exception):
    """A control-plane call that the endpoint's state does not allow; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def iso_now() -> str:
    """Wall-clock time in the API's format, e.g. 2026-11-25T08:00:00.000Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class EndpointState:
    """The live state of one endpoint. All methods run on the emulator's event loop."""

    def __init__(self, config: EndpointConfig, base_url: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.namespace = config.namespace
        self.name = config.name
        self.base_url = base_url
        self._clock = clock
        # What the control plane shows and PUT changes.
        self.min_replica = config.min_replica
        self.max_replica = config.max_replica
        self.scale_to_zero_timeout = config.scale_to_zero_timeout
        self.compute = {"accelerator": config.accelerator, "instanceType": config.instance_type,
                        "instanceSize": config.instance_size}
        self.model = {"repository": config.model_id, "revision": config.model_sha, "task": config.task,
                      "framework": config.framework,
                      "image": {"tgi": {"url": "ghcr.io/huggingface/text-generation-inference:latest"}}, "env": {}}
        self.extra: dict = {}  # other PUT fields (route, tags, ...), kept and echoed
        self.created_at = iso_now()
        self.updated_at = self.created_at
        # The machine.
        self.state = "paused"
        self.message = "Endpoint is paused"
        self.ready_replicas = 0
        self.starting_replicas = 0
        self.target_replicas = 0
        self._url_assigned = False
        self.last_activity = clock()
        self._lifecycle: asyncio.Task | None = None
        self._restarts: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        # The bill.
        self._billed_s = 0.0
        self._billing_since = clock()
        self._set_initial(config.initial_state)

    # ----- what callers read

    @property
    def url(self) -> str | None:
        """The data-plane url as the control plane shows it: null until first running, and when paused/failed."""
        return self.base_url if self._url_assigned else None

    def billable_seconds(self) -> float:
        """Replica-seconds billed so far (ready replicas plus the replica starting)."""
        return self._billed_s + (self._clock() - self._billing_since) * (self.ready_replicas + self.starting_replicas)

    def desired_replicas(self) -> int:
        """How many replicas an active endpoint runs: min_replica, at least 1 (no load-based autoscaling)."""
        return max(1, min(self.min_replica, self.max_replica))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some state change, or ``timeout`` seconds; return whether it holds."""
        deadline = self._clock() + timeout
        while not predicate():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    # ----- control-plane transitions

    def resume(self) -> None:
        """Start a paused endpoint, or wake a scaled-to-zero one."""
        if self.state in ACTIVE_STATES:
            raise TransitionRefused(400, "Bad Request: Endpoint is already running")
        if self.state in ("failed", "updateFailed"):
            raise TransitionRefused(400, f"Bad Request: Endpoint is {self.state}; it cannot be resumed, recreate it")
        if self.state == "scaledToZero":
            self.wake()
        elif self.state == "paused":
            self._set(state="pending", message="Endpoint is waiting for capacity", ready=0, starting=0,
                      target=self.desired_replicas())
            self._start(self._deploy(from_pending=True))
        # pending / initializing: already on its way up; nothing to do.

    def pause(self) -> None:
        """Stop every replica and forget the url."""
        self._stop_machines()
        self._set(state="paused", message="Endpoint is paused", ready=0, starting=0, target=0, url=False)

    def scale_to_zero(self) -> None:
        """Stop every replica but keep the url; the next data-plane request wakes the endpoint."""
        if self.state in ("failed", "paused"):
            raise TransitionRefused(400, f"Bad Request: Endpoint is {self.state}; it cannot be scaled to zero")
        self._stop_machines()
        self._set(state="scaledToZero", message="Endpoint is scaled to zero", ready=0, starting=0, target=0)

    def update(self, body: dict) -> None:
        """Apply a partial PUT body; a higher replica target in an active state starts new replicas."""
        scaling = body.get("compute", {}).get("scaling", {})
        if "minReplica" in scaling:
            self.min_replica = int(scaling["minReplica"])
        if "maxReplica" in scaling:
            self.max_replica = int(scaling["maxReplica"])
        if "scaleToZeroTimeout" in scaling:
            self.scale_to_zero_timeout = float(scaling["scaleToZeroTimeout"])
        for key in ("accelerator", "instanceType", "instanceSize"):
            if key in body.get("compute", {}):
                self.compute[key] = body["compute"][key]
        for key, value in body.get("model", {}).items():
            self.model[key] = value
        for key, value in body.items():
            if key not in ("compute", "model"):
                self.extra[key] = value
        self.updated_at = iso_now()
        if self.state in ("pending", "initializing"):
            self._set(target=self.desired_replicas())  # the deploy under way scales to the new target
            return
        if self.state not in ACTIVE_STATES:
            return
        desired = self.desired_replicas()
        if desired > self.ready_replicas + self.starting_replicas:
            self._set(state="updating", message="Endpoint is updating", target=desired)
            self._start(self._scale_up(updating=True))
        elif desired < self.ready_replicas:
            self._set(ready=desired, target=desired)
        else:
            self._set(target=desired)

    # ----- data-plane and episode transitions

    def wake(self) -> None:
        """A request reached a scaled-to-zero endpoint: start a replica (no ``pending`` step)."""
        if self.state == "scaledToZero":
            self._set(state="initializing", message="Endpoint is initializing", starting=1,
                      target=self.desired_replicas())
            self._start(self._deploy(from_pending=False))

    def fail(self, message: str = "Endpoint failed") -> None:
        """The endpoint breaks: ``failed``, no replicas, no url."""
        self._stop_machines()
        self._set(state="failed", message=message, ready=0, starting=0, target=0, url=False)

    def lose_replica(self) -> None:
        """One ready replica disappears; it restarts, ready again after replica_start_s."""
        if self.ready_replicas == 0:
            return
        self._set(ready=self.ready_replicas - 1, starting=self.starting_replicas + 1)
        task = asyncio.get_running_loop().create_task(self._restart_replica())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    def note_activity(self) -> None:
        """A data-plane request arrived: the idle clock for scale-to-zero restarts."""
        self.last_activity = self._clock()

    def idle_check(self, in_flight: int) -> None:
        """Scale to zero if min_replica is 0 and the endpoint was idle for scale_to_zero_timeout minutes."""
        if (self.state == "running" and self.min_replica == 0 and self.scale_to_zero_timeout > 0
                and in_flight == 0 and self._clock() - self.last_activity >= self.scale_to_zero_timeout * 60):
            self.scale_to_zero()

    def poke(self) -> None:
        """Wake the waiters of wait_until without changing anything (a replica became free)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Cancel background work (emulator shutdown)."""
        self._stop_machines()
        self._account()

    # ----- internals

    def _set_initial(self, initial: str) -> None:
        if initial == "running":
            target = self.desired_replicas()
            self._set(state="running", message="Endpoint is ready", ready=target, target=target, url=True)
        elif initial == "scaledToZero":
            self._set(state="scaledToZero", message="Endpoint is scaled to zero", url=True)
        elif initial == "failed":
            self._set(state="failed", message="Endpoint failed to deploy")

    def _start(self, coroutine) -> None:
        if self._lifecycle is not None:
            self._lifecycle.cancel()
        self._lifecycle = asyncio.get_running_loop().create_task(coroutine)

    def _stop_machines(self) -> None:
        if self._lifecycle is not None:
            self._lifecycle.cancel()
            self._lifecycle = None
        for task in list(self._restarts):
            task.cancel()
        self._restarts.clear()

    async def _deploy(self, *, from_pending: bool) -> None:
        cfg = self.config
        # The caller already set the first state synchronously, so the API answer shows it.
        if from_pending:
            await asyncio.sleep(cfg.pending_s)
            self._set(state="initializing", message="Endpoint is initializing", starting=1)
        await asyncio.sleep(cfg.initializing_s)
        if cfg.fail_on_deploy:
            self._set(state="failed", message="Endpoint failed to deploy: the container exited with code 1",
                      ready=0, starting=0, target=0, url=False)
            return
        self.last_activity = self._clock()
        self._set(state="running", message="Endpoint is ready", ready=1, starting=0, url=True)
        await self._scale_up(updating=False)

    async def _scale_up(self, *, updating: bool) -> None:
        while self.ready_replicas < self.target_replicas:
            if updating:
                self._set(state="updating", message="Endpoint is updating")
            self._set(starting=1)
            await asyncio.sleep(self.config.replica_start_s)
            self._set(ready=self.ready_replicas + 1, starting=0)
        self._set(state="running", message="Endpoint is ready")

    async def _restart_replica(self) -> None:
        await asyncio.sleep(self.config.replica_start_s)
        if self.state in ACTIVE_STATES:
            self._set(ready=self.ready_replicas + 1, starting=max(0, self.starting_replicas - 1))

    def _account(self) -> None:
        now = self._clock()
        self._billed_s += (now - self._billing_since) * (self.ready_replicas + self.starting_replicas)
        self._billing_since = now

    def _set(self, *, state: str | None = None, message: str | None = None, ready: int | None = None,
             starting: int | None = None, target: int | None = None, url: bool | None = None) -> None:
        # Close the billing interval before the replica count changes.
        self._account()
        if state is not None and state != self.state:
            self.state = state
            self.updated_at = iso_now()
        if message is not None:
            self.message = message
        if ready is not None:
            self.ready_replicas = ready
        if starting is not None:
            self.starting_replicas = starting
        if target is not None:
            self.target_replicas = target
        if url is not None:
            self._url_assigned = url
        # Wake everyone waiting for a change, then arm a fresh event for the next one.
        self._changed.set()
        self._changed = asyncio.Event()

    def to_api(self) -> dict:
        """The endpoint object as the Inference Endpoints API returns it."""
        return {
            "name": self.name,
            "type": self.config.type,
            "accountId": None,
            "healthRoute": "/health",
            "provider": {"vendor": self.config.vendor, "region": self.config.region},
            "compute": {**self.compute,
                        "id": f"{self.config.vendor}-{self.config.region}-{self.compute['instanceType']}",
                        "scaling": {"minReplica": self.min_replica, "maxReplica": self.max_replica,
                                    "scaleToZeroTimeout": _whole_if_integral(self.scale_to_zero_timeout)}},
            "model": dict(self.model),
            "status": {"state": self.state, "message": self.message, "url": self.url,
                       "createdAt": self.created_at, "updatedAt": self.updated_at,
                       "readyReplica": self.ready_replicas, "targetReplica": self.target_replicas,
                       "private": None},
            **self.extra,
        }


def _whole_if_integral(value: float) -> int | float:
    # The API speaks whole minutes; fractions exist only so tests can use tiny timeouts.
    return int(value) if float(value).is_integer() else value
