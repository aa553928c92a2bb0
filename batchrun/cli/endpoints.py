"""The commands that act on endpoints: `endpoint` (look at, pause, resume; bracket a job's shards) and
`emulate` (the local emulator)."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from batchrun.errors import redact

from .terminal import echo

if TYPE_CHECKING:
    from batchrun.emulator import Emulator
    from batchrun.endpoints.base import BracketResult
    from batchrun.endpoints.control_plane import EndpointSnapshot


def cmd_endpoint(args: argparse.Namespace) -> int:
    from huggingface_hub import get_token

    from batchrun.endpoints.control_plane import HfControlPlane
    from batchrun.errors import SpecError, register_secret

    if args.action in ("up", "down"):
        return _endpoint_bracket(args)
    if args.namespace is None:
        raise SpecError(None, "--namespace", f"`batchrun endpoint {args.action} NAME` needs --namespace NS (the user "
                        "or organization that owns the endpoint)")
    token = get_token()
    register_secret(token)

    async def act() -> EndpointSnapshot:
        control = HfControlPlane(name=args.name, namespace=args.namespace, token=token, api_url=args.api_url)
        if args.action == "pause":
            return await control.pause()
        if args.action == "resume":
            return await control.resume()
        if args.action == "scale-to-zero":
            return await control.scale_to_zero()
        return await control.get()

    snap = asyncio.run(act())
    print(f"{snap.namespace}/{snap.name}: {snap.state}" + (f" ({snap.message})" if snap.message else ""))
    print(f"  url: {snap.url or '-'}")
    print(f"  replicas: {snap.ready_replicas}/{snap.target_replicas} ready "
          f"(min {snap.min_replica}, max {snap.max_replica})")
    print(f"  scale-to-zero timeout: {snap.scale_to_zero_timeout} min")
    print(f"  model: {snap.repository} ({snap.task})")
    return 0


def _endpoint_bracket(args: argparse.Namespace) -> int:
    """`batchrun endpoint up|down JOB.yaml`: bracket the shards of a job by hand (docs/shards.md)."""
    from batchrun.endpoints import open_endpoint
    from batchrun.endpoints.shared_endpoint import BRACKET
    from batchrun.errors import SpecError
    from batchrun.preflight import _resolve_token
    from batchrun.spec import load_spec
    from batchrun.stop import Stop

    spec = load_spec(args.name, output_override=args.output)
    managed = [e for e in spec.all_endpoints if e.name is not None]
    if not managed:
        raise SpecError(spec.file, "endpoint", f"`batchrun endpoint {args.action} JOB.yaml` brackets a Dedicated "
                        "endpoint that the job manages (endpoint: {name, namespace}); this job sends to a url or to "
                        "the built-in emulator (local:), which each run starts and stops itself: nothing to bracket")
    token = _resolve_token(spec)

    async def bracket() -> list[BracketResult | BaseException]:
        opened = [open_endpoint(spec, token=token, stop=Stop(), echo=echo, endpoint=e, user=BRACKET)
                  for e in managed]
        # Each endpoint to its end, whatever another one does: one failing must not cut the others short.
        return list(await asyncio.gather(*(e.up() if args.action == "up" else e.down() for e in opened),
                                         return_exceptions=True))

    failures = []
    for result in asyncio.run(bracket()):
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            print(_bracket_line(result, args.name))
    if failures:
        for failure in failures[1:]:
            echo(f"error: {redact(str(failure))}")
        raise failures[0]
    return 0


def _bracket_line(result: BracketResult, job: str) -> str:
    """What `batchrun endpoint up|down JOB.yaml` says of one endpoint."""
    from batchrun.endpoints.base import Bracketed

    if result.outcome is Bracketed.UP:
        return f"{result.ref}: ready; the job's shards share it until `batchrun endpoint down {job}`"
    if result.outcome is Bracketed.IN_USE:
        return f"{result.ref}: still in use, left to the last shard to put down: {result.note}"
    if result.outcome is Bracketed.NOT_BRACKETED:
        return f"{result.ref}: nothing to bracket ({result.note})"
    return f"{result.ref}: {result.final_action}" + (f" ({result.note})" if result.note else "")


def cmd_emulate(args: argparse.Namespace) -> int:
    # Every problem (bad flag, file that is not an emulator config, busy port) is an EmulatorError: one line, exit 2.
    from batchrun.emulator import EmulatorConfig, describe, load_emulator_config, serve
    from batchrun.emulator.config import check_loopback_host
    from batchrun.errors import EmulatorError

    if args.host is not None:
        check_loopback_host(args.host, key="--host")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise EmulatorError(f"--port {args.port}: expected 0..65535 (0 picks a free port)")
    config = load_emulator_config(args.config) if args.config else EmulatorConfig()
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["control_port"] = args.port
    if args.host is not None:
        overrides["host"] = args.host
    if overrides:
        import dataclasses

        config = dataclasses.replace(config, **overrides)

    def ready(emu: Emulator) -> None:
        print(describe(emu), flush=True)

    try:
        asyncio.run(serve(config, ready=ready))
    except KeyboardInterrupt:
        pass
    return 0
