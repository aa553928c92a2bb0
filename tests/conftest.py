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
