"""Each provider's text-to-image request and answer, shaped as huggingface_hub's provider helpers shape them."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from batchrun.errors import RequestFailed
from batchrun.records import Row
from batchrun.tasks.provider_images import IMAGE_ROUTES, ProviderImageTask

FLUX = "black-forest-labs/FLUX.1-schnell"
PARAMETERS = {"width": 64, "height": 32, "num_inference_steps": 4, "cfg_scale": 3.5}


def png(width: int = 8, height: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


def row(row_id: str, prompt: str) -> Row:
    return Row(id=row_id, columns={"prompt": prompt}, position=0)


def task(provider: str) -> ProviderImageTask:
    return ProviderImageTask(provider=provider, model=FLUX, template=None, column="prompt", parameters=PARAMETERS,
                             job_seed=3)


def test_hf_inference_sends_inputs_and_parameters_to_the_models_path():
    request = task("hf-inference").prepare(row("a", "a fox"))
    assert request.path == f"/models/{FLUX}"
    assert request.payload == {"inputs": "a fox", "parameters": {**PARAMETERS, "seed": request.outputs["seed"]}}
    assert request.headers == {"Accept": "image/png"}


def test_together_asks_base64_and_calls_the_steps_steps():
    request = task("together").prepare(row("a", "a fox"))
    assert request.path == "/v1/images/generations"
    assert request.payload == {"prompt": "a fox", "response_format": "base64", "width": 64, "height": 32,
                               "cfg_scale": 3.5, "steps": 4, "seed": request.outputs["seed"]}


def test_nscale_asks_b64_json_with_a_size_and_without_steps_or_cfg_scale():
    request = task("nscale").prepare(row("a", "a fox"))
    assert request.payload == {"response_format": "b64_json", "prompt": "a fox", "size": "64x32",
                               "seed": request.outputs["seed"]}


def test_each_row_keeps_its_seed_from_run_to_run():
    first, again = (task("together").prepare(row("row-7", "x")) for _ in range(2))
    other = task("together").prepare(row("row-8", "x"))
    assert first.payload["seed"] == again.payload["seed"] != other.payload["seed"]


def test_an_openai_style_answer_is_decoded_from_b64_json_and_any_stored_format_is_kept():
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 4), "teal").save(jpeg, format="JPEG")
    body = json.dumps({"data": [{"b64_json": base64.b64encode(jpeg.getvalue()).decode()}]}).encode()
    outputs = task("together").parse(200, {"content-type": "application/json"}, body)
    assert (outputs["width"], outputs["height"], outputs["format"]) == (8, 4, "jpeg")
    assert outputs["image"]["bytes"] == jpeg.getvalue()


def test_hf_inference_keeps_the_bytes_and_holds_them_to_the_format_asked():
    outputs = task("hf-inference").parse(200, {"content-type": "image/png"}, png())
    assert outputs["image"]["bytes"] == png() and outputs["format"] == "png"


@pytest.mark.parametrize("body", [b'{"data": []}', b'{"data": [{"url": "https://x"}]}', b"<html>busy</html>"])
def test_an_answer_without_an_image_is_a_retryable_failure(body):
    with pytest.raises(RequestFailed) as failed:
        task("nscale").parse(200, {"content-type": "application/json"}, body)
    assert failed.value.retryable


def test_the_routes_are_the_ones_the_task_kind_declares():
    from batchrun.task_kinds import task_kind

    assert tuple(sorted(IMAGE_ROUTES)) == task_kind("text-to-image").provider_routes


def test_auto_takes_the_first_provider_of_the_mapping_that_batchrun_has_a_route_for() -> None:
    from batchrun.endpoints.providers import _image_mapping, first_image_provider
    from batchrun.errors import EndpointUnusableError

    model = "black-forest-labs/FLUX.1-dev"
    # The Hub's list form, in its order (the user's preference): fal-ai first, whose queue route batchrun does
    # not build, a chat mapping, replicate in error, then together.
    mapping = _image_mapping([
        {"provider": "fal-ai", "task": "text-to-image", "status": "live", "providerId": "fal-ai/flux/dev"},
        {"provider": "cerebras", "task": "conversational", "status": "live", "providerId": model},
        {"provider": "replicate", "task": "text-to-image", "status": "error", "providerId": "black-forest-labs/flux"},
        {"provider": "together", "task": "text-to-image", "status": "staging", "providerId": model},
        {"provider": "nscale", "task": "text-to-image", "status": "live", "providerId": "flux-dev"},
    ])
    chosen, passed = first_image_provider(model, mapping)
    assert chosen == "together"
    assert passed == ["fal-ai (a route batchrun does not build)", "replicate (status error)"]
    with pytest.raises(EndpointUnusableError, match="fal-ai .a route batchrun does not build.; nothing was sent"):
        first_image_provider(model, {"fal-ai": mapping["fal-ai"], "cerebras": mapping["cerebras"]})
    with pytest.raises(EndpointUnusableError, match="the Hub maps no provider to it for text-to-image"):
        first_image_provider(model, {})
