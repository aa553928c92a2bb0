"""What the spec says of a url or serverless target, read without a server: a lane's rate limits
(``endpoint.limits``), an API key's variable, and what a serverless target cannot take.

The jobs these specs would run are in tests/test_rate_limits.py and tests/test_providers.py, on the emulator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jobkit import write_spec, write_topics

from batchrun.errors import SpecError
from batchrun.spec import load_spec

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
MAX_TOKENS = 12


def rate_job(tmp_path: Path, url: str | list[str], rows: int, **overrides: Any) -> Path:
    endpoint: Any = overrides.pop("endpoint", [{"url": u} for u in url] if isinstance(url, list) else {"url": url})
    return write_spec(tmp_path, endpoint=endpoint, input_path=write_topics(tmp_path / "in.parquet", rows),
                      parameters={"max_tokens": MAX_TOKENS, "seed": 1, "model": LLAMA}, **overrides)


def job(tmp_path: Path, endpoint: Any, *, n: int = 40, name: str = "job", **overrides: Any) -> Path:
    input_path = tmp_path / "in" / f"{name}.parquet"
    if not input_path.exists():
        write_topics(input_path, n)
    return write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name=name, **overrides)


# ----- a lane's rate limits (the jobs that hold them: tests/test_rate_limits.py)


def test_the_spec_gives_a_url_endpoint_its_limits_per_minute(tmp_path):
    spec = load_spec(rate_job(tmp_path, "http://127.0.0.1:1", 1, endpoint={"url": "http://127.0.0.1:1",
                                                                        "limits": {"rpm": 600, "tpm": 90000}}))
    assert spec.endpoint.limits is not None
    assert (spec.endpoint.limits.rpm, spec.endpoint.limits.tpm) == (600, 90000)


def test_a_url_endpoints_lane_gets_the_specs_limits(tmp_path):
    import asyncio

    from batchrun.endpoints import open_endpoint
    from batchrun.rate import RateLimits
    from batchrun.stop import Stop

    spec = load_spec(rate_job(tmp_path, "http://127.0.0.1:1", 1, endpoint={"url": "http://127.0.0.1:1",
                                                                        "limits": {"tpm": 90000}}))
    endpoint = open_endpoint(spec, token=None, stop=Stop(), echo=lambda line: None)
    plane = asyncio.run(endpoint.__aenter__())
    assert plane.limits == RateLimits(tpm=90000)


@pytest.mark.parametrize(("limits", "words"), [
    ({"rpm": 0}, "endpoint.limits.rpm"),
    ({"rpm": 10, "tokens": 5}, "endpoint.limits.tokens"),
    ("600", "endpoint.limits"),
])
def test_bad_limits_are_refused_naming_the_key(tmp_path, limits: Any, words: str):
    with pytest.raises(SpecError, match=words):
        load_spec(rate_job(tmp_path, "http://127.0.0.1:1", 1, endpoint={"url": "http://127.0.0.1:1", "limits": limits}))


def test_limits_on_a_dedicated_endpoint_are_refused(tmp_path):
    endpoint = {"name": "gen", "namespace": "ns", "limits": {"rpm": 10}}
    with pytest.raises(SpecError, match="endpoint.limits: only applies to an endpoint given by url"):
        load_spec(rate_job(tmp_path, "http://127.0.0.1:1", 1, endpoint=endpoint))


# ----- a serverless target (the jobs: tests/test_providers.py)


def test_a_missing_api_key_variable_is_a_spec_error_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("BATCHRUN_TEST_API_KEY", raising=False)
    spec = job(tmp_path, {"url": "https://api.example.com/v1", "model": "some-model",
                          "api_key_env": "BATCHRUN_TEST_API_KEY"}, n=3)
    with pytest.raises(SpecError, match="BATCHRUN_TEST_API_KEY is not set"):
        load_spec(spec)


@pytest.mark.parametrize(("endpoint", "overrides", "key", "problem"), [
    ({"provider": "together", "model": LLAMA, "on_finish": "keep"}, {}, "endpoint.on_finish", "no lifecycle"),
    ({"provider": "together", "model": f"{LLAMA}:together"}, {}, "endpoint.model", "ORG/NAME"),
    ({"provider": "together"}, {}, "endpoint.model", "is required"),
    ({"provider": "together", "model": LLAMA, "router_url": "https://proxy.example.com/v1"}, {},
     "endpoint.router_url", "not a Hugging Face host"),
    ({"url": "http://127.0.0.1:9/v1", "api_key_env": "HOME"}, {}, "endpoint.api_key_env", "endpoint.model"),
    ({"url": "http://10.1.2.3/v1", "model": "m", "api_key_env": "HOME"}, {}, "endpoint.url", "plain http"),
    ({"url": "https://api.example.com/v1", "model": "m", "api_key_env": "HOME"}, {"budget": {"max_usd": 1}},
     "endpoint.price", "is required with budget.max_usd"),
    ({"provider": "fal-ai", "model": LLAMA}, {"task": "text-to-image", "prompt": {"template": "{topic}", "system": None},
                                              "parameters": {"max_tokens": None, "seed": None}},
     "endpoint.provider", "the routes of hf-inference, nscale, together"),
    ({"url": "https://api.example.com/v1", "model": "m", "api_key_env": "HOME"},
     {"task": "text-to-image", "prompt": {"template": "{topic}", "system": None},
      "parameters": {"max_tokens": None, "seed": None}}, "endpoint.model", "not served"),
    ({"provider": "together", "model": LLAMA}, {"task": "text-generation", "prompt": {"system": None},
                                                "parameters": {"max_tokens": None}, "samples": 2},
     "samples", "chat-completion"),
    ({"provider": "together", "model": LLAMA}, {"task": "text-generation", "prompt": {"system": None},
                                                "parameters": {"max_tokens": None}, "output_schema": {"type": "object"}},
     "output_schema", "chat-completion"),
])
def test_the_spec_refuses_what_a_serverless_target_cannot_take(tmp_path, endpoint, overrides, key, problem):
    with pytest.raises(SpecError) as refused:
        load_spec(job(tmp_path, endpoint, n=3, **overrides))
    assert refused.value.key == key and problem in str(refused.value)
