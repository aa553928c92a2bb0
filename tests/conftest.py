"""Suite-wide isolation: no Hub access, no saved login leaking in, no token in the environment."""

import os

# Read by datasets at import time, so set before any test module imports it. HF_HUB_OFFLINE is not set
# here: huggingface_hub would then refuse to reach the emulator's control plane too (the source tests
# set it for themselves).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest


@pytest.fixture(autouse=True)
def _isolated_from_the_hub(monkeypatch, tmp_path_factory):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path_factory.getbasetemp() / "no-saved-token"))
    # Where jobs keep the user's endpoint settings while they change them (never ~/.cache in tests).
    monkeypatch.setenv("BATCHRUN_STATE_DIR", str(tmp_path_factory.mktemp("batchrun-state")))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): two workers per core this process may run on, read from its CPU
    affinity (xdist would ask psutil first, which counts the machine's cores, not the ones it is given).
    The suite waits more than it computes (on one core: 423 s of wall time for 166 s of CPU), so a second
    worker per core fills the waits: 151-155 s against 227 s with one per core, on 2 cores. On a single
    core the suite runs in this process, without a worker (``taskset -c 0``)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 * cores if cores > 1 else 0
