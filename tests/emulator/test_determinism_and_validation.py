"""Generated text and images are deterministic; TGI's parameters and 422s behave as TGI's do."""

from __future__ import annotations

import base64
import io
import json

import aiohttp
import pytest
from emulator_helpers import AUTH, NS, config, endpoint, run
from PIL import Image

from batchrun.emulator import Emulator, EmulatorConfig, EndpointConfig, load_emulator_config


def call(cfg: EndpointConfig, path: str, payload, headers: dict | None = None, raw: bool = False):
    """POST ``payload`` to ``path`` on a fresh emulator holding ``cfg``; returns (status, headers, body)."""
    async def body():
        async with Emulator(config(cfg)) as emu, aiohttp.ClientSession(headers=AUTH) as http:
            kwargs = {"data": payload} if raw else {"json": payload}
            async with http.post(emu.endpoint_url(NS, cfg.name) + path, headers=headers or {}, **kwargs) as r:
                return r.status, dict(r.headers), await r.read()
    return run(body())


GEN = endpoint("gen", max_input_tokens=30, max_total_tokens=50)


def generate(parameters: dict, prompt: str = "Write about the river") -> dict:
    status, _, body = call(GEN, "/generate", {"inputs": prompt, "parameters": parameters})
    assert status == 200, body
    return json.loads(body)


def test_same_prompt_seed_and_parameters_give_the_same_text_in_a_new_emulator():
    parameters = {"seed": 5, "temperature": 0.7, "max_new_tokens": 20}
    assert generate(parameters) == generate(parameters)
    assert generate(parameters) != generate({**parameters, "seed": 6})
    assert generate(parameters) != generate(parameters, prompt="Write about the forest")


def test_an_endpoint_seed_changes_the_text_like_other_weights_would():
    payload = {"inputs": "Write about the river", "parameters": {"seed": 5, "max_new_tokens": 20}}
    other = endpoint("gen", seed=99, max_input_tokens=30, max_total_tokens=50)
    assert call(other, "/generate", payload)[2] != call(GEN, "/generate", payload)[2]


def test_max_new_tokens_cuts_the_same_stream_and_reports_length():
    short = generate({"seed": 1, "max_new_tokens": 3, "details": True})
    long = generate({"seed": 1, "max_new_tokens": 10, "details": True})
    assert long["generated_text"].startswith(short["generated_text"])
    assert short["details"]["finish_reason"] == "length"
    assert short["details"]["generated_tokens"] == 3


def test_the_stream_ends_by_itself_with_eos_token():
    answer = generate({"seed": 1, "details": True}, prompt="hi")
    assert answer["details"]["finish_reason"] == "eos_token"
    assert 12 <= answer["details"]["generated_tokens"] <= 60


def test_a_stop_string_ends_generation_with_stop_sequence_and_stays_in_the_text():
    full = generate({"seed": 2, "max_new_tokens": 12})["generated_text"]
    stop = full.split()[3]
    stopped = generate({"seed": 2, "max_new_tokens": 12, "stop": [stop], "details": True})
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop)
    assert full.startswith(stopped["generated_text"])


def test_return_full_text_prepends_the_prompt_and_details_are_absent_unless_asked():
    answer = generate({"seed": 3, "max_new_tokens": 4, "return_full_text": True})
    assert answer["generated_text"].startswith("Write about the river")
    assert "details" not in answer


def test_the_root_route_answers_a_one_element_list_with_tgi_headers():
    status, headers, body = call(GEN, "/", {"inputs": "one two three", "parameters": {"max_new_tokens": 5}})
    assert status == 200
    answer = json.loads(body)
    assert isinstance(answer, list) and list(answer[0]) == ["generated_text"]
    assert headers["x-prompt-tokens"] == "3"
    assert headers["x-generated-tokens"] == "5"
    for name in ("x-compute-type", "x-compute-time", "x-compute-characters", "x-total-time", "x-validation-time",
                 "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert name in headers


@pytest.mark.parametrize(("payload", "message"), [
    ({"inputs": ""}, "Input validation error: `inputs` cannot be empty"),
    ({"inputs": "word " * 31}, "Input validation error: `inputs` must have less than 30 tokens. Given: 31"),
    ({"inputs": "word " * 10, "parameters": {"max_new_tokens": 45}},
     "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 50. Given: 10 `inputs` tokens and "
     "45 `max_new_tokens`"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}},
     "Input validation error: `max_new_tokens` must be strictly positive"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
     "Input validation error: `stop` supports up to 4 stop sequences. Given: 5"),
])
def test_bad_inputs_get_tgis_422_validation_errors(payload, message):
    status, headers, body = call(GEN, "/generate", payload)
    assert status == 422
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": message, "error_type": "validation"}


def test_a_body_that_is_not_json_or_lacks_inputs_gets_a_plain_text_framework_error():
    assert call(GEN, "/generate", b"{not json", raw=True)[0] == 400
    status, headers, body = call(GEN, "/generate", {"prompt": "x"})
    assert status == 422
    assert headers["Content-Type"].startswith("text/plain")
    assert b"missing field `inputs`" in body


IMG = endpoint("img", task="text-to-image")


def draw(parameters: dict, accept: str = "image/png", prompt: str = "a red fox"):
    return call(IMG, "/", {"inputs": prompt, "parameters": parameters}, headers={"Accept": accept} if accept else {})


def test_text_to_image_is_deterministic_in_prompt_seed_and_size():
    first = draw({"seed": 1, "width": 48, "height": 48})[2]
    assert draw({"seed": 1, "width": 48, "height": 48})[2] == first
    assert draw({"seed": 2, "width": 48, "height": 48})[2] != first
    assert draw({"seed": 1, "width": 48, "height": 48}, prompt="a blue whale")[2] != first


@pytest.mark.parametrize(("accept", "kind"), [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")])
def test_accept_picks_the_image_format(accept, kind):
    status, headers, body = draw({"width": 32, "height": 32}, accept=accept)
    assert status == 200
    assert headers["Content-Type"] == accept
    assert Image.open(io.BytesIO(body)).format == kind


def test_no_accept_gives_json_with_a_base64_png():
    status, headers, body = draw({"width": 16, "height": 16}, accept="")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert Image.open(io.BytesIO(base64.b64decode(json.loads(body)))).size == (16, 16)


def test_text_to_image_errors_are_400_with_an_error_key():
    status, _, body = draw({"width": 64, "height": 32})
    assert status == 400 and "must be equal" in json.loads(body)["error"]
    status, _, body = draw({}, prompt="")
    assert status == 400 and list(json.loads(body)) == ["error"]


def test_endpoint_config_from_dict_names_unknown_keys_and_wrong_types():
    assert EndpointConfig.from_dict({"name": "x", "faults": {"rate_503": 0.1}}).faults.rate_503 == 0.1
    with pytest.raises(ValueError, match="replicas: unknown key"):
        EndpointConfig.from_dict({"name": "x", "replicas": 2})
    with pytest.raises(ValueError, match="max_replica: expected int"):
        EndpointConfig.from_dict({"name": "x", "max_replica": "2"})
    with pytest.raises(ValueError, match="faults.rate_5xx: unknown key"):
        EndpointConfig.from_dict({"name": "x", "faults": {"rate_5xx": 0.1}})
    with pytest.raises(ValueError, match="episodes"):
        EndpointConfig.from_dict({"name": "x", "episodes": [{"kind": "outage_503"}]})


def test_load_emulator_config_reads_yaml_and_never_shows_the_token(tmp_path):
    path = tmp_path / "emulator.yaml"
    path.write_text("token: hf_secret_value\nendpoints:\n  - name: a\n    task: text-to-image\n"
                    "    faults: {rate_429: 0.5}\n    episodes: [{kind: lose_replica, after_requests: 3}]\n")
    loaded = load_emulator_config(path)
    assert isinstance(loaded, EmulatorConfig)
    assert loaded.endpoints[0].task == "text-to-image" and loaded.endpoints[0].faults.rate_429 == 0.5
    assert "hf_secret_value" not in repr(loaded)
    path.write_text("endpoints:\n  - name: a\n    colour: red\n")
    with pytest.raises(ValueError, match=r"emulator.yaml: endpoints\[0\]\.colour: unknown key"):
        load_emulator_config(path)
