"""Endpoints: the alternatives a job can send to, behind one interface.

    base.py            Endpoint (the interface, with the bracket up/down), DataPlane, EndpointCheck, LifecycleRecord
    url.py             UrlEndpoint: a plain url, no lifecycle
    providers.py       ServerlessEndpoint: the Inference Providers router or an OpenAI-compatible API, per token
    dedicated.py       DedicatedEndpoint: a Dedicated Inference Endpoint through huggingface_hub
    ready.py           its ready wait: running, every target replica ready, the health route answers
    settings_ledger.py its settings: what the user had, what the job changed, what the release puts back
    local.py           LocalEndpoint: the built-in emulator, driven as a Dedicated endpoint
    control_plane.py   the control plane through huggingface_hub (the production path)
    saved_settings.py  the user's settings, kept on disk while a job has changed them
    cold_start.py      when a 503 is the endpoint starting, not a row's fault
    pool.py            EndpointPool: the job's endpoints (one or several) started, drained and released together
    shared_endpoint.py one managed endpoint shared by the shards of a job: the last one out puts it down
    endpoint_shares.py each endpoint's share of a job with several: rows, 429s, latency, cost, drained

:func:`open_endpoint` is the one place that maps a spec's `endpoint:` to one of them; :func:`open_endpoints`
makes the pool of all of them that a job runs with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchrun.endpoints.base import DataPlane, Endpoint, EndpointCheck, LifecycleRecord
from batchrun.endpoints.control_plane import HfControlPlane
from batchrun.endpoints.dedicated import DedicatedEndpoint, LifecycleSettings
from batchrun.endpoints.local import LocalEndpoint, local_endpoint_config
from batchrun.endpoints.pool import EndpointPool, Member
from batchrun.endpoints.providers import ServerlessEndpoint
from batchrun.endpoints.url import UrlEndpoint
from batchrun.facts import POLL_INTERVAL_S
from batchrun.rate import RateLimits
from batchrun.stop import Stop

if TYPE_CHECKING:
    from batchrun.spec import EndpointSpec, JobSpec

__all__ = [
    "DataPlane",
    "DedicatedEndpoint",
    "Endpoint",
    "EndpointCheck",
    "EndpointPool",
    "LifecycleRecord",
    "LifecycleSettings",
    "LocalEndpoint",
    "ServerlessEndpoint",
    "UrlEndpoint",
    "open_endpoint",
    "open_endpoints",
]


def open_endpoints(
    spec: JobSpec,
    *,
    token: str | None,
    stop: Stop,
    echo: Callable[[str], None],
    poll_interval_s: float = POLL_INTERVAL_S,
    run_number: int = 1,
) -> EndpointPool:
    """Every endpoint the spec names, as the pool a job runs with (a pool of one for the mapping form).

    Each endpoint gets a stop of its own (see pool.py): its trouble drains it alone while others remain.
    """
    members = []
    for index, each in enumerate(spec.all_endpoints):
        own = Stop()
        name = each.label or f"endpoint-{index}"
        prefix = f"endpoint {name}: " if spec.endpoints else ""

        def said(message: str, prefix: str = prefix) -> None:
            echo(prefix + message)

        endpoint = open_endpoint(spec, token=token, stop=own, echo=said, poll_interval_s=poll_interval_s,
                                 run_number=run_number, endpoint=each)
        members.append(Member(name=name, endpoint=endpoint, stop=own))
    return EndpointPool(members, stop=stop, mixed_models=spec.mixed_models, echo=echo)


def open_endpoint(
    spec: JobSpec,
    *,
    token: str | None,
    stop: Stop,
    echo: Callable[[str], None],
    poll_interval_s: float = POLL_INTERVAL_S,
    run_number: int = 1,
    endpoint: EndpointSpec | None = None,
    user: str | None = None,
) -> Endpoint:
    """The endpoint the spec names, ready to be checked and entered. Raises SpecError for a bad `local:`.

    ``run_number`` (the how-manieth run of this job) seeds the built-in emulator's fault draws, so each
    run of a job meets other faults while one run stays reproducible. A managed endpoint is shared
    with the job's other users (shared_endpoint.py) as ``user``: by default the job's shard, when it is one.
    """
    from batchrun.task_kinds import task_kind

    e = endpoint or spec.endpoint
    if e.per_token:
        max_tokens = spec.parameters.get("max_tokens")
        made = ServerlessEndpoint.router if e.provider is not None else ServerlessEndpoint.api
        if e.provider is not None and spec.task == "text-to-image":  # the provider's own image route
            return ServerlessEndpoint.router(e, token=token, images=True)
        return made(e, token=token, max_tokens=max_tokens if isinstance(max_tokens, int) else None,
                    structured=spec.output_schema is not None or spec.prompt.schema_column is not None)
    if e.url is not None:
        limits = RateLimits(rpm=e.limits.rpm, tpm=e.limits.tpm) if e.limits is not None else None
        return UrlEndpoint(e.url, token=token, send_token=e.send_token, limits=limits)
    kind = task_kind(spec.task)
    settings = LifecycleSettings(
        scale_min=e.scale.min_replica if e.scale else None,
        scale_max=e.scale.max_replica if e.scale else None,
        ready_timeout_s=e.ready_timeout,
        on_finish=e.on_finish,
        idle_backstop_s=e.idle_backstop,
        poll_interval_s=poll_interval_s,
        supported_tasks=kind.endpoint_tasks,
    )

    def on_event(message: str) -> None:
        echo(f"endpoint: {message}")

    if e.local is not None:
        config = local_endpoint_config(e.local, job_name=spec.name, task=kind.emulator_task, file=spec.file)
        if "fault_seed" not in e.local:
            config = dataclasses.replace(config, fault_seed=run_number)
        return LocalEndpoint(config, settings, stop=stop, on_event=on_event,
                             price_per_replica_hour=e.price_per_replica_hour)
    assert e.name is not None and e.namespace is not None  # the spec parser guarantees one of the three
    shard = getattr(spec, "shard", None)
    user = user or (shard.folder if shard is not None else None)
    if user is not None:  # the shards of a split job: the last one out puts the endpoint down
        from batchrun.endpoints.shared_endpoint import SharedUse, shared_folder
        from batchrun.output.stores.base import is_store_url

        if is_store_url(spec.output.path):  # no shared file system: the agreement is kept in the store
            from batchrun.endpoints.shared_in_store import StoreSharedUse

            shared: Any = StoreSharedUse(spec.output.path, e.api_url, e.namespace, e.name, user)
        else:
            shared = SharedUse(shared_folder(spec.output.path, e.api_url, e.namespace, e.name), user)
        settings = dataclasses.replace(settings, shared=shared)
    control = HfControlPlane(name=e.name, namespace=e.namespace, token=token, api_url=e.api_url)
    return DedicatedEndpoint(control, settings, token=token, stop=stop, on_event=on_event,
                             price_per_replica_hour=e.price_per_replica_hour, send_token=e.send_token)
