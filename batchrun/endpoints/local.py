"""The built-in emulator playing a Dedicated Inference Endpoint (`endpoint: {local: ...}`).

It starts an emulator on loopback for the length of the job and then drives it through exactly the
code a real endpoint gets (:class:`~batchrun.endpoints.dedicated.DedicatedEndpoint` over huggingface_hub):
there is no demo-mode branch, only another control-plane base.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from batchrun.cost import CostMeter
from batchrun.endpoints.base import Bracketed, BracketResult, DataPlane, EndpointCheck, LifecycleRecord
from batchrun.endpoints.control_plane import HfControlPlane
from batchrun.endpoints.dedicated import DedicatedEndpoint, LifecycleSettings
from batchrun.errors import RequestFailed, SpecError, register_secret
from batchrun.stop import Stop

if TYPE_CHECKING:
    from batchrun.emulator import Emulator, EndpointConfig

__all__ = ["LOCAL_NAMESPACE", "LocalEndpoint", "local_endpoint_config", "local_router", "start_local_router"]

LOCAL_NAMESPACE = "batchrun-local"
_NOTHING_TO_BRACKET = ("the built-in emulator is started and stopped by each run of the job itself, so there is "
                       "nothing to bracket")


def local_endpoint_config(
    local: Mapping[str, Any], *, job_name: str, task: str, file: str | None = None
) -> EndpointConfig:
    """The emulator endpoint that `endpoint: {local: ...}` describes (a SpecError for a bad key).

    ``task`` is what the emulated endpoint serves unless the spec says otherwise.
    """
    from batchrun.emulator.config import EndpointConfig

    values = dict(local)
    values.setdefault("name", "local-" + job_name.lower().replace("_", "-")[:24])
    values.setdefault("namespace", LOCAL_NAMESPACE)
    values.setdefault("task", task)
    try:
        return EndpointConfig.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise SpecError(file, "endpoint.local", str(exc)) from None


def local_router(provider: str, model: str, *, price_input: float | None, price_output: float | None,
                 images: bool = False, price_image: float | None = None) -> Any:
    """The emulator's router for `router_url: local`: one provider (``provider``) serving ``model``, at the
    given price (USD per 1M tokens; the emulator's default where None), with every task it plays; with
    ``images``, text-to-image on the provider's own route, under the Hub's id, at ``price_image`` per image."""
    from batchrun.emulator import ProviderConfig, RouterConfig

    if images:
        return RouterConfig(providers=(ProviderConfig(
            name=provider, image_models=((model, model),),
            price_image=ProviderConfig.price_image if price_image is None else price_image),))
    return RouterConfig(providers=(ProviderConfig(
        name=provider, models=(model,), completions=True, supports_structured_output=True, cached_tokens=True,
        price_input=ProviderConfig.price_input if price_input is None else price_input,
        price_output=ProviderConfig.price_output if price_output is None else price_output),))


async def start_local_router(router: Any) -> tuple[Emulator, str]:
    """Start an emulator serving ``router`` alone on loopback, with a fresh token (registered as a secret)."""
    from batchrun.emulator import Emulator, EmulatorConfig

    token = "local-" + secrets.token_hex(16)
    register_secret(token)
    emulator = Emulator(EmulatorConfig(token=token, endpoints=[], router=router))
    await emulator.start()
    return emulator, token


class LocalEndpoint:
    """An emulated endpoint, started on entry and stopped after its release."""

    def __init__(
        self,
        config: EndpointConfig,
        settings: LifecycleSettings,
        *,
        stop: Stop,
        on_event: Callable[[str], None],
        price_per_replica_hour: float | None = None,
    ) -> None:
        self.config = config
        self.ref = f"{config.namespace}/{config.name}"
        # The emulator ends with this process: no server-side backstop is needed, nor advice about it,
        # and the user's settings need no file that outlives the job.
        state_file = os.path.join(tempfile.gettempdir(), f"batchrun-local-{os.getpid()}-{secrets.token_hex(4)}.json")
        self._settings = replace(settings, idle_backstop_s=None, state_file=state_file)
        self._stop = stop
        self._on_event = on_event
        self._price = price_per_replica_hour
        self._emulator: Emulator | None = None
        self._inner: DedicatedEndpoint | None = None
        self._record = LifecycleRecord()
        self._telemetry = False
        self._meter = CostMeter(price_per_replica_hour)

    @property
    def record(self) -> LifecycleRecord:
        return self._inner.record if self._inner is not None else self._record

    @property
    def meter(self) -> CostMeter:
        return self._inner.meter if self._inner is not None else self._meter

    async def check(self) -> EndpointCheck:
        # What the emulator's control plane will report for it (model.revision, compute, image).
        cfg = self.config
        return EndpointCheck(note=f"the built-in emulator ({self.ref}, model {cfg.model_id})",
                             model=cfg.model_id, revision=cfg.model_sha,
                             details={"instance": f"{cfg.instance_type} {cfg.instance_size}"})

    async def __aenter__(self) -> DataPlane:
        from huggingface_hub import constants

        from batchrun.emulator import Emulator, EmulatorConfig

        # A local run needs nothing from the internet: huggingface_hub's first call otherwise fetches
        # its agent registry from the Hub (a 3 s timeout where the Hub cannot be reached). The setting is
        # read at call time and put back when the emulator stops; a real endpoint's path is unchanged.
        self._telemetry = constants.HF_HUB_DISABLE_TELEMETRY
        constants.HF_HUB_DISABLE_TELEMETRY = True
        token = "local-" + secrets.token_hex(16)
        register_secret(token)
        emulator = Emulator(EmulatorConfig(token=token, endpoints=[self.config]))
        try:
            await emulator.start()
        except BaseException:
            constants.HF_HUB_DISABLE_TELEMETRY = self._telemetry
            raise
        self._emulator = emulator
        self._on_event(f"started the built-in emulator (control plane {emulator.api_url})")
        control = HfControlPlane(
            name=self.config.name, namespace=self.config.namespace, token=token, api_url=emulator.api_url
        )
        self._inner = DedicatedEndpoint(
            control, self._settings, token=token, stop=self._stop, on_event=self._on_event,
            price_per_replica_hour=self._price,
        )
        try:
            return await self._inner.__aenter__()
        except BaseException:
            await emulator.stop()
            constants.HF_HUB_DISABLE_TELEMETRY = self._telemetry
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        from huggingface_hub import constants

        try:
            if self._inner is not None:
                await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            if self._emulator is not None:
                await self._emulator.stop()
            constants.HF_HUB_DISABLE_TELEMETRY = self._telemetry

    def excuses(self, failure: RequestFailed) -> bool:
        return self._inner is not None and self._inner.excuses(failure)

    async def up(self) -> BracketResult:
        """Nothing to hold up: each run starts the emulator for itself, and it ends with that run."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_NOTHING_TO_BRACKET)

    async def down(self) -> BracketResult:
        """Nothing to put down: the emulator of each run ended with that run."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_NOTHING_TO_BRACKET)
