"""huggingface_hub's own HfApi drives the emulator's control plane and cannot tell it from the real one."""

from __future__ import annotations

import time

import pytest
from emulator_helpers import NS, TOKEN, config, endpoint
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, InferenceEndpointError

from batchrun.emulator import EmulatorThread

pytestmark = pytest.mark.usefixtures("hub_client_on_loopback")


@pytest.fixture
def emulator(hf_endpoints_api):
    cfg = config(
        endpoint("gen", initial_state="paused"),
        endpoint("img", task="text-to-image", model_id="stabilityai/sdxl", initial_state="running"),
        endpoint("broken", initial_state="paused", fail_on_deploy=True),
    )
    with EmulatorThread(cfg) as emu:
        hf_endpoints_api(emu.api_url)
        yield emu


def test_get_returns_an_endpoint_object_huggingface_hub_accepts(emulator):
    endpoint_ = HfApi().get_inference_endpoint("img", namespace=NS, token=TOKEN)
    assert endpoint_.name == "img"
    assert endpoint_.status == "running"
    assert endpoint_.repository == "stabilityai/sdxl"
    assert endpoint_.task == "text-to-image"
    assert endpoint_.url == emulator.endpoint_url(NS, "img")
    assert endpoint_.raw["status"]["readyReplica"] == 1


def test_list_returns_every_endpoint_of_the_namespace_and_none_of_another(emulator):
    names = sorted(e.name for e in HfApi().list_inference_endpoints(namespace=NS, token=TOKEN))
    assert names == ["broken", "gen", "img"]
    assert HfApi().list_inference_endpoints(namespace="someone-else", token=TOKEN) == []


def test_paused_endpoint_has_no_url_until_resume_and_wait_make_it_running(emulator):
    api = HfApi()
    endpoint_ = api.get_inference_endpoint("gen", namespace=NS, token=TOKEN)
    assert endpoint_.status == "paused" and endpoint_.url is None
    endpoint_.resume()
    assert endpoint_.status == "pending" and endpoint_.url is None
    endpoint_.wait(timeout=5, refresh_every=0.02)
    assert endpoint_.status == "running"
    assert endpoint_.url == emulator.endpoint_url(NS, "gen")
    seen = [entry["path"].rsplit("/", 1)[-1] for entry in emulator.control_log]
    assert "resume" in seen


def test_resume_of_a_running_endpoint_is_the_400_already_running_that_running_ok_accepts(emulator):
    api = HfApi()
    assert api.resume_inference_endpoint("img", namespace=NS, token=TOKEN).status == "running"
    with pytest.raises(HfHubHTTPError) as caught:
        api.resume_inference_endpoint("img", namespace=NS, token=TOKEN, running_ok=False)
    assert caught.value.response.status_code == 400
    assert "already running" in caught.value.response.text


def test_update_with_more_replicas_goes_updating_then_running_with_every_replica_ready(emulator):
    endpoint_ = HfApi().get_inference_endpoint("img", namespace=NS, token=TOKEN)
    endpoint_.update(min_replica=3, max_replica=3)
    assert endpoint_.status == "updating"
    assert endpoint_.raw["status"]["targetReplica"] == 3
    assert endpoint_.raw["compute"]["scaling"]["minReplica"] == 3
    ready_seen = set()
    deadline = time.monotonic() + 30  # a limit against a hang; the poll below is the wait
    while endpoint_.fetch().status != "running" and time.monotonic() < deadline:
        ready_seen.add(endpoint_.raw["status"]["readyReplica"])
        time.sleep(0.01)
    assert endpoint_.status == "running"
    assert endpoint_.raw["status"]["readyReplica"] == 3
    assert {1, 2} <= ready_seen  # replicas became ready one by one
    put = [entry for entry in emulator.control_log if entry["method"] == "PUT"]
    assert put[-1]["body"] == {"compute": {"scaling": {"minReplica": 3, "maxReplica": 3}}}


def test_pause_clears_the_url_and_drops_replicas_to_zero(emulator):
    endpoint_ = HfApi().get_inference_endpoint("img", namespace=NS, token=TOKEN).pause()
    assert endpoint_.status == "paused"
    assert endpoint_.url is None
    assert endpoint_.raw["status"]["readyReplica"] == 0
    billed = emulator.state(NS, "img").billable_seconds()
    time.sleep(0.05)  # a window to watch for billing that must not happen, not a wait for an event
    assert emulator.state(NS, "img").billable_seconds() == billed  # a paused endpoint is not billed


def test_scale_to_zero_keeps_the_url_and_drops_replicas_to_zero(emulator):
    endpoint_ = HfApi().get_inference_endpoint("img", namespace=NS, token=TOKEN).scale_to_zero()
    assert endpoint_.status == "scaledToZero"
    assert endpoint_.url == emulator.endpoint_url(NS, "img")
    assert endpoint_.raw["status"]["readyReplica"] == 0


def test_wait_raises_when_the_deploy_fails(emulator):
    endpoint_ = HfApi().get_inference_endpoint("broken", namespace=NS, token=TOKEN).resume()
    with pytest.raises(InferenceEndpointError, match="failed to deploy"):
        endpoint_.wait(timeout=5, refresh_every=0.02)
    assert emulator.state(NS, "broken").state == "failed"


def test_a_wrong_token_gets_401_and_an_unknown_endpoint_gets_404(emulator):
    api = HfApi()
    with pytest.raises(HfHubHTTPError) as caught:
        api.get_inference_endpoint("img", namespace=NS, token="hf_wrong")
    assert caught.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as caught:
        api.get_inference_endpoint("nope", namespace=NS, token=TOKEN)
    assert caught.value.response.status_code == 404
    assert caught.value.response.json() == {"error": "Endpoint not found"}


def test_create_deploys_a_new_endpoint_and_delete_removes_it(emulator):
    api = HfApi()
    created = api.create_inference_endpoint(
        "fresh", repository="openai-community/gpt2", framework="pytorch", task="text-generation",
        accelerator="gpu", vendor="aws", region="us-east-1", type="authenticated", instance_size="x1",
        instance_type="nvidia-a10g", namespace=NS, token=TOKEN)
    assert created.status == "pending"
    created.wait(timeout=5, refresh_every=0.02)
    assert created.repository == "openai-community/gpt2"
    api.delete_inference_endpoint("fresh", namespace=NS, token=TOKEN)
    assert "fresh" not in [e.name for e in api.list_inference_endpoints(namespace=NS, token=TOKEN)]


def test_the_control_log_never_holds_the_token(emulator):
    HfApi().get_inference_endpoint("img", namespace=NS, token=TOKEN).update(min_replica=1)
    assert TOKEN not in repr(emulator.control_log)
    assert TOKEN not in repr(emulator.stats())
