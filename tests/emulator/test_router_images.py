"""The emulated router's text-to-image routes: huggingface_hub's own InferenceClient draws through each
provider it plays, finding the provider's model id in the emulated Hub's inferenceProviderMapping."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from emulator_helpers import TOKEN
from huggingface_hub import HfApi, InferenceClient, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.inference._providers import PROVIDERS, _common, hf_inference
from PIL import Image

from batchrun.emulator import EmulatorConfig, EmulatorThread, describe
from batchrun.emulator.router_config import Outage, ProviderConfig, RouterConfig

pytestmark = pytest.mark.usefixtures("hub_client_on_loopback")

FLUX = "black-forest-labs/FLUX.1-schnell"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def image_router(*providers: ProviderConfig) -> EmulatorThread:
    return EmulatorThread(EmulatorConfig(token=TOKEN, endpoints=[], router=RouterConfig(providers=providers)))


def providers() -> tuple[ProviderConfig, ...]:
    return (ProviderConfig(name="hf-inference", image_models=((FLUX, FLUX),), price_image=0.001),
            ProviderConfig(name="together", image_models=((FLUX, "black-forest-labs/FLUX.1-schnell-Free"),),
                           price_image=0.003),
            ProviderConfig(name="nscale", image_models=((FLUX, "flux-schnell"),), price_image=0.002),
            ProviderConfig(name="chatty", models=(LLAMA,)))


@pytest.fixture
def client_on(monkeypatch):
    """Point huggingface_hub's provider helpers at the emulated router and Hub, as HF_ENDPOINT would."""

    def point(emu: EmulatorThread) -> None:
        origin = emu.router_url.removesuffix("/v1")
        monkeypatch.setattr(constants, "ENDPOINT", emu.hub_url)
        monkeypatch.setattr(constants, "INFERENCE_PROXY_TEMPLATE", origin + "/{provider}")
        # hf-inference's helper read the template when it was made.
        monkeypatch.setattr(PROVIDERS["hf-inference"]["text-to-image"], "base_url", origin + "/hf-inference")
        _common._fetch_inference_provider_mapping.cache_clear()
        hf_inference._check_supported_task.cache_clear()

    yield point
    _common._fetch_inference_provider_mapping.cache_clear()
    hf_inference._check_supported_task.cache_clear()


@pytest.mark.parametrize("name", ["hf-inference", "together", "nscale"])
def test_inference_client_draws_through_each_provider_route_and_each_image_is_billed(client_on, name):
    with image_router(*providers()) as emu:
        client_on(emu)
        client = InferenceClient(provider=name, api_key=TOKEN)  # type: ignore[arg-type]
        image = client.text_to_image("a lighthouse at dusk", model=FLUX, width=48, height=32, seed=7)
        again = client.text_to_image("a lighthouse at dusk", model=FLUX, width=48, height=32, seed=7)
        stats = emu.router_stats()
    assert image.size == (48, 32)
    assert image.tobytes() == again.tobytes()  # the same prompt and seed draw the same picture
    billed = stats["providers"][name]
    assert billed["images"] == 2 and billed["by_status"] == {"200": 2}
    assert billed["cost_usd"] == pytest.approx(2 * {"hf-inference": 0.001, "together": 0.003, "nscale": 0.002}[name])
    route = "POST /hf-inference/models/{model}" if name == "hf-inference" else f"POST /{name}/v1/images/generations"
    assert stats["by_route"][route] == {"200": 2}


def test_the_hub_maps_each_model_to_the_providers_ids_and_tasks(client_on):
    with image_router(*providers()) as emu:
        info = HfApi(endpoint=emu.hub_url, token=TOKEN).model_info(FLUX, expand=["inferenceProviderMapping"])
        chat = HfApi(endpoint=emu.hub_url, token=TOKEN).model_info(LLAMA, expand=["inferenceProviderMapping"])
        with pytest.raises(HfHubHTTPError) as unknown:
            HfApi(endpoint=emu.hub_url, token=TOKEN).model_info("nobody/nothing", expand=["inferenceProviderMapping"])
        described = describe(emu)
    mapping = {m.provider: (m.provider_id, m.task, m.status) for m in info.inference_provider_mapping or []}
    assert mapping == {"hf-inference": (FLUX, "text-to-image", "live"),
                       "together": ("black-forest-labs/FLUX.1-schnell-Free", "text-to-image", "live"),
                       "nscale": ("flux-schnell", "text-to-image", "live")}
    assert [(m.provider, m.task) for m in chat.inference_provider_mapping or []] == [("chatty", "conversational")]
    assert unknown.value.response.status_code == 404
    assert f"together: text-to-image {FLUX} as black-forest-labs/FLUX.1-schnell-Free at http" in described


def post(emu: EmulatorThread, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    origin = emu.router_url.removesuffix("/v1")
    request = urllib.request.Request(origin + path, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Accept": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_a_route_answers_its_providers_shape_and_refuses_what_it_does_not_serve():
    with image_router(*providers()) as emu:
        status, headers, body = post(emu, "/together/v1/images/generations", {
            "prompt": "a fox", "model": "black-forest-labs/FLUX.1-schnell-Free", "response_format": "base64",
            "width": 16, "height": 16, "seed": 1})
        wrong_id, _, refusal = post(emu, "/together/v1/images/generations", {
            "prompt": "a fox", "model": FLUX, "response_format": "base64"})
        not_served, _, _ = post(emu, "/hf-inference/models/nobody/nothing", {"inputs": "a fox"})
        empty, _, empty_body = post(emu, "/hf-inference/models/" + FLUX, {"inputs": " "})
        unauthorized = urllib.request.Request(emu.router_url.removesuffix("/v1") + "/nscale/v1/images/generations",
                                              data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(unauthorized, timeout=10)
    assert status == 200 and headers["x-inference-provider"] == "together"
    picture = Image.open(io.BytesIO(base64.b64decode(json.loads(body)["data"][0]["b64_json"])))
    assert picture.size == (16, 16)
    assert wrong_id == 404 and json.loads(refusal)["error"]["code"] == "model_not_found"  # the provider's id is needed
    assert not_served == 404
    assert empty == 400 and "empty" in json.loads(empty_body)["error"]
    assert refused.value.code == 401


def test_image_routes_meet_the_providers_outages_and_random_429s():
    down = ProviderConfig(name="hf-inference", image_models=((FLUX, FLUX),),
                          outages=(Outage(at_s=0.0, seconds=600.0, kind="503"),))
    busy = ProviderConfig(name="together", image_models=((FLUX, FLUX),), rate_429=1.0, retry_after="none")
    with image_router(down, busy) as emu:
        outage, _, _ = post(emu, "/hf-inference/models/" + FLUX, {"inputs": "a fox"})
        throttled, headers, _ = post(emu, "/together/v1/images/generations", {
            "prompt": "a fox", "model": FLUX, "response_format": "base64"})
        stats = emu.router_stats()["providers"]
    assert outage == 503 and throttled == 429
    assert "Retry-After" not in headers
    assert stats["together"]["random_429"] == 1 and stats["hf-inference"]["images"] == 0


def test_image_routes_count_against_the_providers_request_limit():
    limited = ProviderConfig(name="nscale", image_models=((FLUX, "flux-schnell"),), rpm=1)
    body = {"prompt": "a fox", "model": "flux-schnell", "response_format": "b64_json", "size": "16x16"}
    with image_router(limited) as emu:
        first, first_headers, _ = post(emu, "/nscale/v1/images/generations", body)
        second, headers, refusal = post(emu, "/nscale/v1/images/generations", body)
    assert first == 200 and first_headers["x-ratelimit-remaining-requests"] == "0"
    assert second == 429 and int(headers["Retry-After"]) >= 1 and headers["x-inference-provider"] == "nscale"
    assert json.loads(refusal)["error"]["code"] == "rate_limit_exceeded"


def test_image_models_are_refused_for_a_provider_whose_route_is_not_played():
    with pytest.raises(ValueError, match="image_models"):
        RouterConfig.from_dict({"providers": [{"name": "fal-ai", "image_models": {FLUX: "fal-ai/flux/schnell"}}]})
    config = RouterConfig.from_dict({"providers": [{"name": "together", "image_models": {FLUX: "flux-free"}}]})
    assert config.providers[0].image_models == ((FLUX, "flux-free"),)
