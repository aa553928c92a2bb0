"""Helpers for the emulator tests: tiny timings, a known token, configs. Imported by name (tests/emulator is on sys.path)."""

from __future__ import annotations

import asyncio

from batchrun.emulator import EmulatorConfig, EndpointConfig

TOKEN = "hf_test_emulator_token_123"
NS = "batchrun-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Lifecycle timings small enough for a fast suite, large enough to observe each state.
FAST = dict(namespace=NS, pending_s=0.05, initializing_s=0.1, replica_start_s=0.1)


def endpoint(name: str = "gen", **overrides) -> EndpointConfig:
    """An endpoint config with fast timings; running unless told otherwise."""
    values = {**FAST, "initial_state": "running", **overrides}
    return EndpointConfig(name=name, **values)


def config(*endpoints: EndpointConfig, token: str | None = TOKEN) -> EmulatorConfig:
    """An emulator config holding ``endpoints``."""
    return EmulatorConfig(token=token, endpoints=list(endpoints))


def run(coroutine):
    """Run an async test body (the suite does not use pytest-asyncio)."""
    return asyncio.run(coroutine)


async def until(predicate, *, what: str = "the condition", limit_s: float = 30.0) -> None:
    """Wait for an observed event with a short poll; the limit is against a hang, not a speed claim."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not predicate():
        assert loop.time() < deadline, f"waiting for {what}: not seen after {limit_s:g} s"
        await asyncio.sleep(0.002)


async def sleep_until(loop_time: float) -> None:
    """Let the event loop's clock reach ``loop_time`` (the emulator times its episodes on that clock)."""
    loop = asyncio.get_running_loop()
    while loop.time() <= loop_time:
        await asyncio.sleep(max(0.001, loop_time - loop.time() + 0.001))
