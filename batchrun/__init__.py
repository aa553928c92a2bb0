"""batchrun: run big offline inference jobs against Inference Endpoints, safely.

Data flows one way: spec -> source -> dispatch -> sink, with the endpoint lifecycle wrapped around
dispatch. Most users only need the `batchrun` command; this is the surface for calling it from
Python::

    import asyncio, batchrun
    outcome = asyncio.run(batchrun.run_job(batchrun.load_spec("jobs/quickstart.yaml")))
    print(outcome.exit_code, outcome.summary["rows"])
"""

from importlib import metadata as _metadata

from .errors import (
    AuthError,
    BatchrunError,
    ConfigMismatchError,
    EndpointError,
    EndpointNotReadyError,
    InputError,
    JobStopped,
    OutputError,
    OutputLockedError,
    SpecError,
)
from .lazy import lazy_attributes

try:
    __version__ = _metadata.version("batchrun")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# The runner pulls in aiohttp, pyarrow and datasets; load it on first use so that `batchrun --help`
# and `import batchrun.errors` stay instant.
_LAZY = {
    "JobOutcome": "batchrun.summary",
    "JobSpec": "batchrun.spec",
    "RunOptions": "batchrun.runner",
    "load_spec": "batchrun.spec",
    "parse_spec": "batchrun.spec",
    "preflight": "batchrun.preflight",
    "read_status": "batchrun.output",
    "run_job": "batchrun.runner",
}
__getattr__ = lazy_attributes(globals(), _LAZY)

__all__ = [
    "AuthError",
    "BatchrunError",
    "ConfigMismatchError",
    "EndpointError",
    "EndpointNotReadyError",
    "InputError",
    "JobOutcome",
    "JobSpec",
    "JobStopped",
    "OutputError",
    "OutputLockedError",
    "RunOptions",
    "SpecError",
    "load_spec",
    "parse_spec",
    "preflight",
    "read_status",
    "run_job",
]
