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
