"""huggingface_hub's InferenceClient and AsyncInferenceClient accept the emulator's answers and errors."""

from __future__ import annotations

import base64
import io

import pytest
from emulator_helpers import NS, TOKEN, config, endpoint, run
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError, OverloadedError, ValidationError
from PIL import Image

from batchrun.emulator import EmulatorThread, Faults

pytestmark = pytest.mark.usefixtures("hub_client_on_loopback")


def _png_data_url(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def emulator():
    cfg = config(
        endpoint("gen", max_input_tokens=20, max_total_tokens=40),
        endpoint("vlm", task="image-text-to-text", model_id="HuggingFaceM4/idefics2-8b"),
        endpoint("img", task="text-to-image", model_id="stabilityai/sdxl"),
        endpoint("overloaded", faults=Faults(rate_429_no_retry_after=1.0)),
        endpoint("bad-body", faults=Faults(rate_error_body=1.0)),
    )
    with EmulatorThread(cfg) as emu:
        yield emu


def client(emulator, name: str) -> InferenceClient:
    return InferenceClient(model=emulator.endpoint_url(NS, name), token=TOKEN)


def test_text_generation_with_details_parses_into_huggingface_hub_types(emulator):
    output = client(emulator, "gen").text_generation("Tell me about rivers", max_new_tokens=5, details=True, seed=3)
    assert output.details.finish_reason == "length"
    assert output.details.generated_tokens == 5
    assert len(output.details.tokens) == 5
    assert output.details.seed == 3
    assert output.generated_text == "".join(token.text for token in output.details.tokens)


def test_text_generation_without_details_returns_the_string(emulator):
    text = client(emulator, "gen").text_generation("Tell me about rivers", max_new_tokens=5)
    assert isinstance(text, str) and len(text.split()) >= 3


def test_text_generation_streams_tokens_and_ends_with_details(emulator):
    gen = client(emulator, "gen")  # keep the client alive: it owns the open stream
    chunks = list(gen.text_generation("Tell me", max_new_tokens=4, stream=True, details=True))
    assert len(chunks) == 4
    assert chunks[-1].details.finish_reason == "length"
    assert chunks[-1].generated_text == "".join(chunk.token.text for chunk in chunks)


def test_chat_completion_with_text_reports_usage_and_finish_reason(emulator):
    output = client(emulator, "gen").chat_completion(
        [{"role": "user", "content": "Say something"}], max_tokens=6)
    assert output.choices[0].finish_reason == "length"
    assert output.usage.completion_tokens == 6
    assert output.choices[0].message.role == "assistant"


def test_chat_completion_streams_and_finishes(emulator):
    gen = client(emulator, "gen")
    chunks = list(gen.chat_completion([{"role": "user", "content": "Say something"}], max_tokens=3, stream=True))
    assert len(chunks) == 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_with_an_image_part_names_its_size_and_dominant_colour(emulator):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": _png_data_url((64, 48), (220, 20, 20))}},
    ]}]
    output = client(emulator, "vlm").chat_completion(messages, max_tokens=40)
    assert output.choices[0].message.content.startswith("The image is 64x48 pixels, mostly red.")
    blue = [{"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": _png_data_url((10, 20), (10, 30, 230))}}]}]
    assert "10x20 pixels, mostly blue" in client(emulator, "vlm").chat_completion(blue).choices[0].message.content


def test_a_malformed_data_url_is_a_422_validation_error(emulator):
    # chat_completion does not map TGI error types (text_generation does): it raises the HTTP error.
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}]}]
    with pytest.raises(HfHubHTTPError, match="invalid image content") as caught:
        client(emulator, "vlm").chat_completion(messages)
    assert caught.value.response.status_code == 422
    assert caught.value.response.json()["error_type"] == "validation"
    with pytest.raises(ValidationError, match="invalid image content"):
        client(emulator, "vlm").text_generation("Describe ![](data:image/png;base64,bm90IGFuIGltYWdl)")


def test_text_generation_reads_markdown_images_on_a_vision_endpoint(emulator):
    prompt = f"What is this? ![]({_png_data_url((30, 30), (30, 170, 60))})"
    assert client(emulator, "vlm").text_generation(prompt, max_new_tokens=20).startswith(
        "The image is 30x30 pixels, mostly green.")


def test_text_to_image_returns_a_pil_image_of_the_requested_size(emulator):
    image = client(emulator, "img").text_to_image("a red fox", width=64, height=64, seed=7)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)


def test_empty_and_over_long_prompts_raise_validation_error(emulator):
    with pytest.raises(ValidationError, match="cannot be empty"):
        client(emulator, "gen").text_generation("")
    with pytest.raises(ValidationError, match="must have less than 20 tokens"):
        client(emulator, "gen").text_generation("word " * 30)


def test_an_overloaded_endpoint_raises_overloaded_error(emulator):
    with pytest.raises(OverloadedError, match="Model is overloaded"):
        client(emulator, "overloaded").text_generation("hello")


def test_a_200_with_an_error_body_is_not_an_answer_the_client_can_use(emulator):
    # huggingface_hub trusts a 200: it fails on the missing key, which is why batchrun checks bodies itself.
    with pytest.raises(KeyError):
        client(emulator, "bad-body").text_generation("hello")


def test_a_wrong_token_gets_401_on_the_data_plane(emulator):
    wrong = InferenceClient(model=emulator.endpoint_url(NS, "gen"), token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as caught:
        wrong.text_generation("hello")
    assert caught.value.response.status_code == 401


def test_async_client_generates_chats_and_draws(emulator):
    async def body():
        async with AsyncInferenceClient(model=emulator.endpoint_url(NS, "gen"), token=TOKEN) as gen:
            text = await gen.text_generation("Tell me about rivers", max_new_tokens=5)
            chat = await gen.chat_completion([{"role": "user", "content": "hi"}], max_tokens=2)
        async with AsyncInferenceClient(model=emulator.endpoint_url(NS, "img"), token=TOKEN) as img:
            image = await img.text_to_image("fox", width=32, height=32)
        async with AsyncInferenceClient(model=emulator.endpoint_url(NS, "overloaded"), token=TOKEN) as busy:
            with pytest.raises(OverloadedError):
                await busy.text_generation("hello")
        return text, chat, image

    text, chat, image = run(body())
    assert text == client(emulator, "gen").text_generation("Tell me about rivers", max_new_tokens=5)
    assert chat.usage.completion_tokens == 2
    assert image.size == (32, 32)
