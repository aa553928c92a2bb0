"""A local Inference Endpoint emulator: control plane, TGI and text-to-image data planes, faults; and
the Inference Providers router with an OpenAI-compatible batch API, when configured.

Think of it as moto for Hugging Face Inference Endpoints: huggingface_hub's own clients talk to it
on loopback, and batchrun's tests and benchmarks inject faults through it. See docs/emulator.md.
"""

from typing import TYPE_CHECKING

from batchrun.emulator.config import (
    EmulatorConfig,
    EmulatorConfigError,
    EndpointConfig,
    Episode,
    Faults,
    default_endpoints,
    load_emulator_config,
)
from batchrun.emulator.router_config import BatchConfig, Outage, ProviderConfig, RouterConfig
from batchrun.lazy import lazy_attributes

if TYPE_CHECKING:
    from batchrun.emulator.server import Emulator, EmulatorThread, describe, serve
    from batchrun.emulator.state import EndpointState

# The servers pull in aiohttp's web stack; a job that only checks an `endpoint.local` block (batchrun
# validate) needs the config alone, so they load on first use.
_LAZY = {
    "Emulator": "batchrun.emulator.server",
    "EmulatorThread": "batchrun.emulator.server",
    "describe": "batchrun.emulator.server",
    "serve": "batchrun.emulator.server",
    "EndpointState": "batchrun.emulator.state",
}
__getattr__ = lazy_attributes(globals(), _LAZY)

__all__ = [
    "BatchConfig",
    "Emulator",
    "EmulatorConfig",
    "EmulatorConfigError",
    "EmulatorThread",
    "EndpointConfig",
    "EndpointState",
    "Episode",
    "Faults",
    "Outage",
    "ProviderConfig",
    "RouterConfig",
    "default_endpoints",
    "describe",
    "load_emulator_config",
    "serve",
]
