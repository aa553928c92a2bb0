"""A local Inference Endpoint emulator: control plane, TGI and text-to-image data planes, faults.

Think of it as moto for Hugging Face Inference Endpoints: huggingface_hub's own clients talk to it
on loopback, and batchrun's tests and benchmarks inject faults through it. See docs/emulator.md.
"""

from batchrun.emulator.config import (
    EmulatorConfig,
    EmulatorConfigError,
    EndpointConfig,
    Episode,
    Faults,
    default_endpoints,
    load_emulator_config,
)
from batchrun.emulator.server import Emulator, EmulatorThread, describe, serve
from batchrun.emulator.state import EndpointState

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "EmulatorConfigError",
    "EmulatorThread",
    "EndpointConfig",
    "EndpointState",
    "Episode",
    "Faults",
    "default_endpoints",
    "describe",
    "load_emulator_config",
    "serve",
]
