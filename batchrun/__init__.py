"""batchrun: run big offline inference jobs against Inference Endpoints, safely.

Data flows one way: spec -> source -> dispatch -> sink, with the endpoint lifecycle wrapped around
dispatch. The `batchrun` command runs a spec file; from Python (a script or a notebook)::

    import batchrun
    result = batchrun.run("jobs/quickstart.yaml")          # or a dict, with input=rows from memory
    result.dataset                                         # a datasets.Dataset of the rows that succeeded

``await batchrun.arun(...)`` is the same inside a running event loop.
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
    "Result": "batchrun.api",
    "RunOptions": "batchrun.runner",
    "arun": "batchrun.api",
    "load_spec": "batchrun.spec",
    "parse_spec": "batchrun.spec",
    "preflight": "batchrun.preflight",
    "read_status": "batchrun.output",
    "run": "batchrun.api",
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
    "Result",
    "RunOptions",
    "SpecError",
    "arun",
    "load_spec",
    "parse_spec",
    "preflight",
    "read_status",
    "run",
    "run_job",
]
