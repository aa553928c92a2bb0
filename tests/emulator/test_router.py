"""The emulator plays the Inference Providers router: huggingface_hub's clients chat through it, and its
providers answer with their own prices, limits, headers, 429s and outages."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from emulator_helpers import AUTH, TOKEN, run
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError

from batchrun.emulator import Emulator, EmulatorConfig, EmulatorConfigError, describe, load_emulator_config
from batchrun.emulator.rate_limits import go_duration
from batchrun.emulator.router_config import Outage, ProviderConfig, RouterConfig
from batchrun.emulator.textgen import count_tokens

pytestmark = pytest.mark.usefixtures("hub_client_on_loopback")

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen3-8B"
HELLO = [{"role": "user", "content": "Tell me about rivers"}]


def router_config(*providers: ProviderConfig, **overrides) -> EmulatorConfig:
    return EmulatorConfig(token=TOKEN, endpoints=[], router=RouterConfig(providers=tuple(providers), **overrides))


def provider(name: str, *models: str, **overrides) -> ProviderConfig:
    return ProviderConfig(name=name, models=models or (LLAMA,), **overrides)


async def post(session: aiohttp.ClientSession, emu: Emulator, body: dict, *, path: str = "/chat/completions",
               headers: dict | None = None) -> tuple[int, dict, dict]:
    async with session.post(emu.router_url + path, json=body, headers=AUTH if headers is None else headers) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


def seconds(duration: str) -> float:
    """A reset header (``120ms``, ``1s``, ``6m0s``) in seconds."""
    import re

    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(ms|h|m|s)", duration):
        total += float(number) * {"ms": 0.001, "h": 3600, "m": 60, "s": 1}[unit]
    return total


def chat(model: str, content: str = "Tell me about rivers", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# ----- chat through huggingface_hub's client


def test_async_inference_client_chats_through_the_router_with_usage_consistent_with_the_text():
    async def body():
        async with Emulator(router_config(provider("together"))) as emu:
            client = AsyncInferenceClient(base_url=emu.router_url, api_key=TOKEN)
            first = await client.chat_completion(HELLO, model=LLAMA, max_tokens=30, seed=4)
            again = await client.chat_completion(HELLO, model=LLAMA, max_tokens=30, seed=4)
            other = await client.chat_completion(HELLO, model=LLAMA, max_tokens=30, seed=5)
            text = first.choices[0].message.content
            assert text == again.choices[0].message.content
            assert text != other.choices[0].message.content
            assert first.model == LLAMA and first.object == "chat.completion"
            assert first.usage.completion_tokens == count_tokens(text)
            assert first.usage.prompt_tokens == count_tokens("user: Tell me about rivers")
            assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    run(body())


def test_the_router_answers_like_the_tgi_emulator_for_the_same_prompt_and_seed():
    from emulator_helpers import NS, endpoint

    async def body():
        cfg = EmulatorConfig(token=TOKEN, endpoints=[endpoint("gen", namespace=NS, model_id=LLAMA)],
                             router=RouterConfig(providers=(provider("together"),)))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            _, _, routed = await post(session, emu, chat(LLAMA, max_tokens=20, seed=1))
            async with session.post(emu.endpoint_url(NS, "gen") + "/v1/chat/completions", headers=AUTH,
                                    json=chat("tgi", max_tokens=20, seed=1)) as r:
                direct = await r.json()
            assert routed["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    run(body())


def test_the_serving_provider_is_named_in_the_x_inference_provider_header_for_each_policy():
    async def body():
        cfg = router_config(provider("slow-cheap", latency_s=0.02, price_input=0.01, price_output=0.02),
                            provider("fast-dear", latency_s=0.0, price_input=1.0, price_output=2.0))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            served = {}
            for suffix in ("", ":fastest", ":cheapest", ":fast-dear", ":slow-cheap"):
                status, headers, answer = await post(session, emu, chat(LLAMA + suffix, max_tokens=3))
                assert status == 200 and answer["model"] == LLAMA
                served[suffix] = headers["x-inference-provider"]
            assert served == {"": "slow-cheap", ":fastest": "fast-dear", ":cheapest": "slow-cheap",
                              ":fast-dear": "fast-dear", ":slow-cheap": "slow-cheap"}
    run(body())


def test_models_lists_each_model_with_its_providers_prices_and_capabilities():
    async def body():
        cfg = router_config(provider("together", LLAMA, QWEN, price_input=0.18, price_output=0.18, context_length=131072,
                                     supports_structured_output=True),
                            provider("novita", LLAMA, price_input=0.02, price_output=0.05, supports_tools=False,
                                     status="staging"))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            async with session.get(emu.router_url + "/models", headers=AUTH) as r:
                listing = await r.json()
            assert listing["object"] == "list"
            by_id = {m["id"]: m for m in listing["data"]}
            assert set(by_id) == {LLAMA, QWEN}
            assert by_id[LLAMA]["object"] == "model" and by_id[LLAMA]["owned_by"] == "meta-llama"
            assert by_id[LLAMA]["providers"] == [
                {"provider": "together", "status": "live", "context_length": 131072,
                 "pricing": {"input": 0.18, "output": 0.18}, "supports_tools": True, "supports_structured_output": True},
                {"provider": "novita", "status": "staging", "context_length": 32768,
                 "pricing": {"input": 0.02, "output": 0.05}, "supports_tools": False,
                 "supports_structured_output": False},
            ]
            assert [p["provider"] for p in by_id[QWEN]["providers"]] == ["together"]
    run(body())


# ----- errors of the router itself


def test_a_missing_token_is_401_an_unknown_model_404_and_a_provider_that_lacks_the_model_400():
    async def body():
        cfg = router_config(provider("together", LLAMA), provider("novita", QWEN))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            status, _, answer = await post(session, emu, chat(LLAMA), headers={})
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            status, _, answer = await post(session, emu, chat(LLAMA), headers={"Authorization": "Bearer wrong"})
            assert status == 401
            status, _, answer = await post(session, emu, chat("nobody/nothing"))
            assert status == 404
            assert answer["error"] == {"message": "The model `nobody/nothing` does not exist or you do not have "
                                                  "access to it.", "type": "invalid_request_error", "param": "model",
                                       "code": "model_not_found"}
            status, _, answer = await post(session, emu, chat(LLAMA + ":novita"))
            assert status == 400 and answer["error"]["message"] == "Model not supported by provider novita"
            status, _, answer = await post(session, emu, {"model": LLAMA})
            assert status == 400 and answer["error"]["param"] == "messages"
            async with session.post(emu.router_url + "/chat/completions", headers=AUTH, data=b"{oops") as r:
                assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
            async with session.get(emu.router_url + "/models") as r:
                assert r.status == 401
    run(body())


def test_the_client_sees_a_router_error_as_an_hf_hub_http_error():
    async def body():
        async with Emulator(router_config(provider("together"))) as emu:
            client = AsyncInferenceClient(base_url=emu.router_url, api_key=TOKEN)
            with pytest.raises(HfHubHTTPError) as caught:
                await client.chat_completion(HELLO, model="nobody/nothing")
            assert caught.value.response.status_code == 404
    run(body())


# ----- rate limits and their headers


def test_go_durations_read_like_openais_resets():
    assert [go_duration(s) for s in (0.12, 1, 1.5, 360, 3723)] == ["120ms", "1s", "1.5s", "6m0s", "1h2m3s"]


def test_request_limit_headers_count_down_then_429_with_retry_after_and_the_window_frees_them():
    async def body():
        cfg = router_config(provider("together", rpm=3, tpm=100_000, window="second"))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            remaining = []
            for _ in range(3):
                status, headers, _ = await post(session, emu, chat(LLAMA, max_tokens=5))
                assert status == 200
                assert headers["x-ratelimit-limit-requests"] == "3"
                assert headers["x-ratelimit-limit-tokens"] == "100000"
                remaining.append(int(headers["x-ratelimit-remaining-requests"]))
                assert 0 < seconds(headers["x-ratelimit-reset-requests"]) <= 1
            assert remaining == [2, 1, 0]
            status, headers, answer = await post(session, emu, chat(LLAMA, max_tokens=5))
            assert status == 429
            assert answer["error"]["code"] == "rate_limit_exceeded" and answer["error"]["type"] == "requests"
            assert headers["Retry-After"] == "1" and "retry-after-ms" not in headers
            assert headers["x-ratelimit-remaining-requests"] == "0"
            await asyncio.sleep(seconds(headers["x-ratelimit-reset-requests"]) + 0.02)
            status, headers, _ = await post(session, emu, chat(LLAMA, max_tokens=5))
            assert status == 200 and headers["x-ratelimit-remaining-requests"] == "2"
            assert emu.router_stats()["providers"]["together"]["rate_limited_429"] == 1
    run(body())


def test_tokens_count_the_prompt_plus_max_tokens_against_the_token_limit():
    async def body():
        cfg = router_config(provider("together", tpm=100, window="minute", retry_after="both"))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            prompt = count_tokens("user: Tell me about rivers")
            status, headers, _ = await post(session, emu, chat(LLAMA, max_tokens=60))
            assert status == 200
            assert int(headers["x-ratelimit-remaining-tokens"]) == 100 - prompt - 60
            assert "x-ratelimit-limit-requests" not in headers  # no request limit configured
            status, headers, answer = await post(session, emu, chat(LLAMA, max_tokens=60))
            assert status == 429 and answer["error"]["type"] == "tokens"
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert 0 < int(headers["retry-after-ms"]) <= 60_000
            assert 59 < seconds(headers["x-ratelimit-reset-tokens"]) <= 60  # e.g. 59.998s: the minute window
    run(body())


def test_a_429_without_retry_after_and_a_provider_that_sends_no_rate_limit_headers():
    async def body():
        cfg = router_config(provider("quiet", rpm=1, window="minute", retry_after="none", rate_limit_headers=False),
                            provider("millis", QWEN, rpm=1, window="minute", retry_after="ms"))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            status, headers, _ = await post(session, emu, chat(LLAMA))
            assert status == 200 and not any(h.lower().startswith("x-ratelimit") for h in headers)
            status, headers, _ = await post(session, emu, chat(LLAMA))
            assert status == 429
            assert "Retry-After" not in headers and "retry-after-ms" not in headers
            assert not any(h.lower().startswith("x-ratelimit") for h in headers)
            await post(session, emu, chat(QWEN))
            status, headers, _ = await post(session, emu, chat(QWEN))
            assert status == 429 and "Retry-After" not in headers and 59_000 < int(headers["retry-after-ms"]) <= 60_000
    run(body())


def test_one_provider_429s_about_half_its_requests_without_retry_after_while_the_other_serves_all():
    async def body():
        cfg = router_config(provider("flaky", LLAMA, rate_429=0.5), provider("steady", QWEN))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            flaky, steady = [], []
            for i in range(60):
                status, headers, _ = await post(session, emu, chat(LLAMA, f"question {i}", max_tokens=2))
                flaky.append(status)
                if status == 429:
                    assert "Retry-After" not in headers and headers["x-inference-provider"] == "flaky"
                steady.append((await post(session, emu, chat(QWEN, f"question {i}", max_tokens=2)))[0])
            assert 18 <= flaky.count(429) <= 42 and set(flaky) == {200, 429}
            assert steady == [200] * 60
            stats = emu.router_stats()["providers"]
            assert stats["flaky"]["random_429"] == flaky.count(429) and stats["steady"]["random_429"] == 0
    run(body())


# ----- a provider goes down


def test_a_provider_that_goes_down_503s_when_pinned_and_the_router_picks_another_meanwhile():
    async def body():
        cfg = router_config(provider("first"), provider("second"))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            assert (await post(session, emu, chat(LLAMA)))[1]["x-inference-provider"] == "first"
            emu.provider_down("first", seconds=0.3)
            status, headers, answer = await post(session, emu, chat(LLAMA + ":first"))
            assert status == 503 and answer["error"]["type"] == "server_error"
            assert headers["x-inference-provider"] == "first"
            status, headers, _ = await post(session, emu, chat(LLAMA))
            assert status == 200 and headers["x-inference-provider"] == "second"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while (await post(session, emu, chat(LLAMA + ":first")))[0] != 200:
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            assert emu.router_stats()["providers"]["first"]["by_status"]["503"] >= 1
    run(body())


def test_a_scheduled_outage_resets_connections_then_the_provider_comes_back():
    async def body():
        cfg = router_config(provider("together", outages=(Outage(at_s=0.0, seconds=0.3, kind="reset"),)))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await post(session, emu, chat(LLAMA))
            statuses: list[int] = []

            async def recovered() -> bool:
                try:
                    statuses.append((await post(session, emu, chat(LLAMA)))[0])
                except aiohttp.ClientError:
                    return False
                return statuses[-1] == 200

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not await recovered():
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            assert emu.router_stats()["by_route"]["POST /v1/chat/completions"]["reset"] >= 1
    run(body())


# ----- usage details, completions, stats


def test_cached_tokens_count_a_repeated_message_prefix_and_reasoning_models_report_reasoning_tokens():
    async def body():
        cfg = router_config(provider("cache", LLAMA, QWEN, cached_tokens=True), provider("plain", LLAMA),
                            reasoning_models=(QWEN,))
        system = {"role": "system", "content": "You are a careful assistant who answers about rivers"}
        async with Emulator(cfg) as emu:
            client = AsyncInferenceClient(base_url=emu.router_url, api_key=TOKEN)
            first = await client.chat_completion([system, {"role": "user", "content": "one"}], model=LLAMA + ":cache")
            second = await client.chat_completion([system, {"role": "user", "content": "two"}], model=LLAMA + ":cache")
            assert first.usage["prompt_tokens_details"] == {"cached_tokens": 0}
            cached = second.usage["prompt_tokens_details"]["cached_tokens"]
            assert cached == count_tokens("system: " + system["content"]) and cached < second.usage.prompt_tokens
            plain = await client.chat_completion([system, {"role": "user", "content": "two"}], model=LLAMA + ":plain")
            assert "prompt_tokens_details" not in plain.usage and "completion_tokens_details" not in plain.usage
            thinking = await client.chat_completion(HELLO, model=QWEN)
            reasoning = thinking.usage["completion_tokens_details"]["reasoning_tokens"]
            assert 0 < reasoning < thinking.usage.completion_tokens
            assert emu.router_stats()["providers"]["cache"]["cached_tokens"] == cached
    run(body())


def test_completions_are_served_by_providers_that_have_the_route_only():
    async def body():
        cfg = router_config(provider("chat-only", LLAMA), provider("both", LLAMA, completions=True))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            status, headers, answer = await post(session, emu, {"model": LLAMA, "prompt": "Once", "max_tokens": 4},
                                                 path="/completions")
            assert status == 200 and headers["x-inference-provider"] == "both"
            assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 4
            assert count_tokens(answer["choices"][0]["text"]) == 4
            status, _, answer = await post(session, emu, {"model": LLAMA + ":chat-only", "prompt": "Once"},
                                           path="/completions")
            assert status == 400 and "chat-only" in answer["error"]["message"]
    run(body())


def test_stats_count_requests_tokens_per_minute_and_online_cost_per_provider():
    async def body():
        cfg = router_config(provider("together", price_input=1.0, price_output=2.0))
        async with Emulator(cfg) as emu, aiohttp.ClientSession() as session:
            answers = [(await post(session, emu, chat(LLAMA, f"q{i}", max_tokens=5)))[2] for i in range(3)]
            stats = emu.router_stats()
            together = stats["providers"]["together"]
            prompt = sum(a["usage"]["prompt_tokens"] for a in answers)
            completion = sum(a["usage"]["completion_tokens"] for a in answers)
            assert together["requests"] == 3 and together["by_status"] == {"200": 3}
            assert together["prompt_tokens"] == prompt and together["completion_tokens"] == completion
            assert together["tokens_by_minute"] == {0: prompt + completion}
            assert together["cost_usd"] == pytest.approx((prompt * 1.0 + completion * 2.0) / 1e6)
            assert stats["by_route"]["POST /v1/chat/completions"] == {"200": 3}
            async with session.get(emu.router.base_url + "/emulator/router/stats", headers=AUTH) as r:
                assert (await r.json())["providers"]["together"]["requests"] == 3
    run(body())


# ----- config


def test_a_router_section_in_a_yaml_config_is_served_and_described(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(f"""
token: {TOKEN}
endpoints: []
router:
  providers:
    - name: together
      models: [{LLAMA}]
      rpm: 600
      window: minute
      outages: [{{at_s: 30, seconds: 5, kind: "502"}}]
  reasoning_models: [{QWEN}]
  batch: {{completion_s: 0.5, expire_after_s: 10}}
""")
    cfg = load_emulator_config(path)
    assert cfg.router is not None and cfg.router.providers[0].rpm == 600
    assert cfg.router.providers[0].outages == (Outage(at_s=30, seconds=5, kind="502"),)
    assert cfg.router.batch.expire_after_s == 10.0

    async def body():
        async with Emulator(cfg) as emu:
            text = describe(emu)
            assert emu.router_url in text and f"together: {LLAMA}" in text
    run(body())


@pytest.mark.parametrize(("router", "key"), [
    ({"providers": [{"name": "x", "rpm": "many"}]}, "router.providers[0].rpm"),
    ({"providers": [{"name": "x", "window": "hour"}]}, "router.providers[0].window"),
    ({"providers": [{"name": "x", "colour": 1}]}, "router.providers[0].colour"),
    ({"batch": {"error_rate": 2}}, "router.batch.error_rate"),
    ({"providers": [{"name": "x", "outages": [{"at_s": 1, "seconds": 1, "kind": "418"}]}]},
     "router.providers[0].outages[0].kind"),
])
def test_a_bad_router_setting_is_refused_naming_its_key(router, key):
    with pytest.raises(EmulatorConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        EmulatorConfig.from_dict({"endpoints": [], "router": router})


def test_without_a_router_section_there_is_no_router_url():
    async def body():
        async with Emulator(EmulatorConfig(token=TOKEN, endpoints=[])) as emu:
            assert emu.router is None
            with pytest.raises(KeyError, match="router"):
                _ = emu.router_url
    run(body())


def test_batchrun_emulate_serves_the_router_of_its_config_file(tmp_path):
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    path = tmp_path / "router.yaml"
    path.write_text(f"token: {TOKEN}\nrouter:\n  providers:\n    - name: together\n      models: [{LLAMA}]\n")
    process = subprocess.Popen([sys.executable, "-m", "batchrun", "emulate", "--config", str(path)],
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("Inference Providers router and batch API: "):
                url = line.split()[6]
                break
        else:
            pytest.fail("batchrun emulate printed no router url")
        request = urllib.request.Request(url + "/chat/completions", data=json.dumps(chat(LLAMA, max_tokens=3)).encode(),
                                         headers={**AUTH, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["x-inference-provider"] == "together"
            assert json.loads(response.read())["usage"]["completion_tokens"] == 3
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_sync_inference_client_chats_through_an_emulator_thread_whose_hooks_reach_the_router():
    from huggingface_hub import InferenceClient

    from batchrun.emulator import EmulatorThread

    with EmulatorThread(router_config(provider("together"))) as emu:
        client = InferenceClient(base_url=emu.router_url, api_key=TOKEN)
        answer = client.chat_completion(HELLO, model=LLAMA + ":together", max_tokens=4)
        assert answer.usage.completion_tokens == 4
        emu.provider_down("together", seconds=60, kind="502")
        with pytest.raises(HfHubHTTPError) as caught:
            client.chat_completion(HELLO, model=LLAMA + ":together", max_tokens=4)
        assert caught.value.response.status_code == 502
        assert emu.router_stats()["providers"]["together"]["by_status"] == {"200": 1, "502": 1}
