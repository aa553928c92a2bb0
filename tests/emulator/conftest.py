"""Fixtures of the emulator tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def hf_endpoints_api(monkeypatch):
    """Point huggingface_hub's Inference Endpoints constant at an emulator, restored after the test."""
    import huggingface_hub.constants

    def point(api_url: str) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "INFERENCE_ENDPOINTS_ENDPOINT", api_url)

    return point


@pytest.fixture
def hub_client_on_loopback(monkeypatch):
    """Let huggingface_hub's clients send requests, which the suite's offline mode blocks.

    The suite sets HF_HUB_OFFLINE so nothing reaches the Hub; these tests only ever point the
    clients at the emulator on 127.0.0.1, so lifting it here reaches nothing beyond loopback.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
