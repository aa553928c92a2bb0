"""GET /info says which model and revision an endpoint serves, and the control plane agrees."""

from __future__ import annotations

import re

import aiohttp
import pytest
from emulator_helpers import AUTH, NS, config, endpoint, run

from batchrun.emulator import EndpointConfig, load_emulator_config
from batchrun.emulator.server import Emulator

SHA = "0123456789abcdef0123456789abcdef01234567"
HEX40 = re.compile(r"[0-9a-f]{40}")


async def get_json(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession(headers=AUTH) as http, http.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


def info_and_endpoint(cfg: EndpointConfig) -> tuple[tuple[int, object], dict]:
    """(status, body) of GET /info, and the control plane's endpoint object."""
    async def body():
        async with Emulator(config(cfg)) as emu:
            info = await get_json(emu.endpoint_url(NS, cfg.name) + "/info")
            status, api = await get_json(f"{emu.api_url}/endpoint/{NS}/{cfg.name}")
            assert status == 200
            return info, api
    return run(body())


def test_info_names_the_model_and_the_configured_revision_as_tgi_does():
    (status, info), api = info_and_endpoint(endpoint("gen", model_id="org/model", revision=SHA,
                                                    max_concurrent_requests=32, max_input_tokens=1000,
                                                    max_total_tokens=2000))
    assert status == 200
    assert info["model_id"] == "org/model"
    assert info["model_sha"] == SHA
    assert (info["model_dtype"], info["model_device_type"]) == ("torch.float16", "cuda")
    assert (info["max_concurrent_requests"], info["max_input_tokens"], info["max_total_tokens"]) == (32, 1000, 2000)
    assert info["version"] == "3.3.6"
    assert HEX40.fullmatch(info["sha"])
    assert api["model"]["revision"] == SHA


def test_without_a_revision_the_sha_is_derived_from_the_model_id_and_stable():
    (_, first), api = info_and_endpoint(endpoint("gen", model_id="org/model"))
    (_, again), _ = info_and_endpoint(endpoint("gen", model_id="org/model"))
    (_, other), _ = info_and_endpoint(endpoint("gen", model_id="org/other-model"))
    assert HEX40.fullmatch(first["model_sha"])
    assert again["model_sha"] == first["model_sha"] != other["model_sha"]
    assert api["model"]["revision"] == first["model_sha"]


def test_a_text_to_image_endpoint_has_no_info_route():
    (status, _), api = info_and_endpoint(endpoint("img", task="text-to-image", revision=SHA))
    assert status == 404
    assert api["model"]["revision"] == SHA


def test_revision_is_a_config_key_and_must_be_a_commit_sha(tmp_path):
    assert EndpointConfig.from_dict({"name": "x", "revision": SHA}).model_sha == SHA
    with pytest.raises(ValueError, match="revision: expected a 40-hex commit sha"):
        EndpointConfig.from_dict({"name": "x", "revision": "main"})
    path = tmp_path / "emulator.yaml"
    path.write_text(f"endpoints:\n  - name: gen\n    revision: '{SHA}'\n")
    assert load_emulator_config(path).endpoints[0].revision == SHA


def test_an_endpoint_created_through_the_api_serves_the_revision_it_was_given():
    def create(revision: str | None) -> dict:
        model = {"repository": "org/model", "task": "text-generation", "framework": "pytorch"}
        if revision is not None:
            model["revision"] = revision
        return {"name": f"made-{revision or 'none'}", "type": "protected", "model": model,
                "compute": {"scaling": {"minReplica": 1, "maxReplica": 1}}}

    async def body():
        async with Emulator(config(endpoint("gen"))) as emu:
            answers = []
            async with aiohttp.ClientSession(headers=AUTH) as http:
                for revision in (SHA, "main", None):
                    async with http.post(f"{emu.api_url}/endpoint/{NS}", json=create(revision)) as response:
                        assert response.status == 200
                        answers.append((await response.json())["model"]["revision"])
            return answers

    given, branch, missing = run(body())
    assert given == SHA
    assert HEX40.fullmatch(branch) and branch == missing != SHA
