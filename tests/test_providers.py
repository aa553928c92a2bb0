"""Whole jobs on serverless targets billed per token: the emulated Inference Providers router, and an
OpenAI-compatible API with its key in an environment variable."""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from jobkit import REPO, TOKEN, cli, read_ids, read_rows, run, write_spec, write_topics

from batchrun.emulator import EmulatorConfig, EmulatorThread, Outage, ProviderConfig, RouterConfig
from batchrun.errors import AuthError, EndpointUnusableError
from batchrun.spec import load_spec

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def router(*providers: ProviderConfig, token: str = TOKEN, **overrides: Any) -> EmulatorThread:
    return EmulatorThread(EmulatorConfig(token=token, endpoints=[],
                                         router=RouterConfig(providers=providers, **overrides)))


def provider(name: str, **overrides: Any) -> ProviderConfig:
    return ProviderConfig(name=name, models=(LLAMA,), **overrides)


def job(tmp_path: Path, endpoint: Any, *, n: int = 40, name: str = "job", **overrides: Any) -> Path:
    input_path = tmp_path / "in" / f"{name}.parquet"
    if not input_path.exists():
        write_topics(input_path, n)
    return write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name=name, **overrides)


def summary(tmp_path: Path, name: str = "job") -> dict[str, Any]:
    return json.loads((tmp_path / "out" / name / "state" / "summary.json").read_text())


def chat_requests(emu: EmulatorThread) -> int:
    routes = emu.router_stats()["by_route"]
    return sum(routes.get("POST /v1/chat/completions", {}).values())


@pytest.fixture
def hf_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


# ----- the router: model in the body, provider and tokens in each row, cost = tokens x price


def test_a_pinned_provider_answers_every_row_and_cost_usd_sums_to_tokens_times_price(tmp_path, hf_token):
    with router(provider("together", cached_tokens=True), provider("nebius")) as emu:
        endpoint = {"provider": "together", "model": LLAMA, "router_url": emu.router_url,
                    "price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5}}
        outcome, _ = run(job(tmp_path, endpoint))
        stats = emu.router_stats()
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 40
    assert {r["provider"] for r in rows} == {"together"}
    assert stats["providers"]["together"]["requests"] == 40 and stats["providers"]["nebius"]["requests"] == 0
    assert any(r["cached_tokens"] for r in rows)  # the system message, seen before
    expected = sum(r["prompt_tokens"] * 0.5 + r["completion_tokens"] * 1.5 for r in rows) / 1e6
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(expected)
    cost = summary(tmp_path)["cost"]
    assert cost["usd"] == pytest.approx(expected)
    assert cost["replica_hours"] == 0
    assert cost["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)


def test_without_a_price_each_row_is_priced_by_the_router_for_the_provider_that_served_it(tmp_path, hf_token):
    cheap = provider("cheap", price_input=0.1, price_output=0.2)
    dear = provider("dear", price_input=1.0, price_output=3.0)
    with router(dear, cheap) as emu:
        endpoint = {"provider": "cheapest", "model": LLAMA, "router_url": emu.router_url}
        outcome, lines = run(job(tmp_path, endpoint, n=20))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert {r["provider"] for r in rows} == {"cheap"}
    expected = sum(r["prompt_tokens"] * 0.1 + r["completion_tokens"] * 0.2 for r in rows) / 1e6
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(expected)
    assert any("cost: $" in line and "completion tokens" in line for line in lines)


def test_a_provider_without_headers_and_without_retry_after_loses_no_row(tmp_path, hf_token):
    flaky = provider("flaky", rate_429=0.5, rate_limit_headers=False, retry_after="none")
    with router(flaky) as emu:
        endpoint = {"provider": "flaky", "model": LLAMA, "router_url": emu.router_url}
        outcome, _ = run(job(tmp_path, endpoint, n=60))
        stats = emu.router_stats()["providers"]["flaky"]
    assert stats["random_429"] > 0
    assert outcome.exit_code == 0
    ids = read_ids(tmp_path / "out" / "job" / "data")
    assert sorted(ids) == [f"row-{i:05d}" for i in range(60)]


def test_a_failing_provider_is_drained_and_the_job_finishes_on_the_others(tmp_path, hf_token):
    broken = provider("broken", outages=(Outage(at_s=0.0, seconds=600.0, kind="503"),))
    with router(broken, provider("steady")) as emu:
        endpoint = [{"provider": "broken", "model": LLAMA, "router_url": emu.router_url},
                    {"provider": "steady", "model": LLAMA, "router_url": emu.router_url}]
        outcome, lines = run(job(tmp_path, endpoint, n=200, concurrency={"max": 8, "initial": 8}))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 200
    assert {r["provider"] for r in rows} == {"steady"}
    assert {r["endpoint"] for r in rows} == {"steady"}
    shares = {share["name"]: share for share in summary(tmp_path)["endpoint"]["endpoints"]}
    assert shares["broken"]["rows_ok"] == 0 and shares["steady"]["rows_ok"] == 200
    assert summary(tmp_path)["status_counts"].get("503", 0) <= 40  # held off by its breaker, not hammered


def test_a_budget_stops_the_job_before_it_is_crossed_and_a_rerun_resumes(tmp_path, hf_token):
    slow = provider("together", latency_s=0.02)
    price = {"input_per_mtok": 2000.0, "output_per_mtok": 6000.0}  # about $0.1 a row
    with router(slow) as emu:
        endpoint = {"provider": "together", "model": LLAMA, "router_url": emu.router_url, "price": price}
        spec = job(tmp_path, endpoint, n=100, budget={"max_usd": 3.0}, concurrency={"max": 4, "initial": 4})
        outcome, _ = run(spec)
        assert outcome.exit_code == 3
        first = summary(tmp_path)
        assert first["stop_kind"] == "budget"
        assert first["cost"]["job_usd"] < 3.0
        done = read_ids(tmp_path / "out" / "job" / "data")
        assert 0 < len(done) < 100
        spec = job(tmp_path, endpoint, n=100, budget={"max_usd": 100.0}, concurrency={"max": 4, "initial": 4})
        outcome, _ = run(spec)
    assert outcome.exit_code == 0
    ids = read_ids(tmp_path / "out" / "job" / "data")
    assert sorted(ids) == [f"row-{i:05d}" for i in range(100)]
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert summary(tmp_path)["cost"]["job_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))


# ----- tasks: structured output and text generation through the router


def test_structured_output_goes_through_the_router_as_a_json_schema_response_format(tmp_path, hf_token):
    schema = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}
    with router(provider("together", supports_structured_output=True)) as emu:
        endpoint = {"provider": "together", "model": LLAMA, "router_url": emu.router_url}
        outcome, _ = run(job(tmp_path, endpoint, n=10, output_schema=schema, parameters={"max_tokens": 80}))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert all(isinstance(json.loads(r["parsed"]) if isinstance(r["parsed"], str) else r["parsed"], dict)
               for r in rows)


def test_structured_output_is_refused_before_sending_where_the_router_says_the_provider_lacks_it(tmp_path, hf_token):
    with router(provider("together", supports_structured_output=False)) as emu:
        endpoint = {"provider": "together", "model": LLAMA, "router_url": emu.router_url}
        with pytest.raises(EndpointUnusableError, match="structured output"):
            run(job(tmp_path, endpoint, n=5, output_schema={"type": "object"}))
        assert chat_requests(emu) == 0


def test_text_generation_goes_through_v1_completions(tmp_path, hf_token):
    with router(provider("together", completions=True)) as emu:
        endpoint = {"provider": "together", "model": LLAMA, "router_url": emu.router_url}
        spec = job(tmp_path, endpoint, n=10, task="text-generation", parameters={"max_new_tokens": 8, "max_tokens": None},
                   prompt={"template": "Write about {topic}.", "system": None})
        outcome, _ = run(spec)
        routes = emu.router_stats()["by_route"]
    assert outcome.exit_code == 0
    assert routes["POST /v1/completions"] == {"200": 10}
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert all(r["completion_tokens"] <= 8 and r["cost_usd"] > 0 for r in rows)


# ----- checks before anything is sent


@pytest.mark.parametrize(("endpoint", "problem"), [
    ({"provider": "together", "model": "nobody/no-such-model"}, "serves no model nobody/no-such-model"),
    ({"provider": "elsewhere", "model": LLAMA}, "provider elsewhere does not serve"),
    ({"provider": "together", "model": LLAMA, "parameters": {"max_tokens": 40000}}, "does not fit the context"),
])
def test_a_target_that_cannot_serve_the_job_is_refused_before_anything_is_sent(tmp_path, hf_token, endpoint, problem):
    with router(provider("together", context_length=8192)) as emu:
        parameters = endpoint.pop("parameters", None)
        overrides = {"parameters": parameters} if parameters else {}
        with pytest.raises(EndpointUnusableError, match=problem):
            run(job(tmp_path, {**endpoint, "router_url": emu.router_url}, n=5, **overrides))
        assert chat_requests(emu) == 0


def test_a_provider_in_error_is_refused_and_a_refused_token_stops_before_sending(tmp_path, monkeypatch):
    with router(provider("together", status="error")) as emu:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with pytest.raises(EndpointUnusableError, match="status error"):
            run(job(tmp_path, {"provider": "together", "model": LLAMA, "router_url": emu.router_url}, n=5))
        monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
        with pytest.raises(AuthError):
            run(job(tmp_path, {"provider": "auto", "model": LLAMA, "router_url": emu.router_url}, n=5, name="auth"))
        assert chat_requests(emu) == 0


# ----- an OpenAI-compatible API and its key


def test_the_api_key_appears_in_no_file_message_or_card(tmp_path, monkeypatch, caplog):
    canary = "sk-CANARY_api_key_not_real_0123456789"
    forms = [canary, base64.b64encode(canary.encode()).decode(), urllib.parse.quote(canary, safe="")]
    monkeypatch.setenv("BATCHRUN_TEST_API_KEY", canary)
    caplog.set_level(logging.DEBUG)
    flaky = provider("together", rate_429=0.1)
    with router(flaky, token=canary) as emu:
        endpoint = {"url": emu.router_url, "model": LLAMA, "api_key_env": "BATCHRUN_TEST_API_KEY",
                    "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
        spec = job(tmp_path, endpoint, n=30)
        outcome, lines = run(spec)
        assert outcome.exit_code == 0
        env = {"BATCHRUN_TEST_API_KEY": canary}
        results = [cli("run", str(spec), "--progress", "lines", "-vv", env=env),
                   cli("validate", str(spec), env=env),
                   cli("runs", str(tmp_path / "out" / "job"), env=env)]
        wrong = job(tmp_path, {**endpoint}, n=30, name="wrong")
        refused = cli("run", str(wrong), env={"BATCHRUN_TEST_API_KEY": canary + "x"})
    assert refused.returncode == 2 and "BATCHRUN_TEST_API_KEY" in refused.stderr
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 30 and all(r["cost_usd"] > 0 for r in rows)
    texts = ["\n".join(lines), caplog.text, refused.stdout, refused.stderr]
    texts += [r.stdout + r.stderr for r in results]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        for form in forms:
            assert form not in text


def test_the_shipped_providers_example_runs_on_the_built_in_router_with_no_setup(tmp_path):
    result = cli("run", str(REPO / "jobs" / "providers.yaml"), "--output", str(tmp_path / "out"),
                 "--progress", "off")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "out" / "data")
    assert rows and all(r["provider"] and r["cost_usd"] > 0 for r in rows)


# ----- several lanes, resumes, and what the spec refuses


def test_each_lane_prices_its_own_rows_and_the_summary_adds_them_up(tmp_path, hf_token):
    with router(provider("together"), provider("nebius")) as emu:
        endpoint = [{"provider": "together", "model": LLAMA, "router_url": emu.router_url,
                     "price": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}},
                    {"provider": "nebius", "model": LLAMA, "router_url": emu.router_url,
                     "price": {"input_per_mtok": 3.0, "output_per_mtok": 5.0}}]
        outcome, _ = run(job(tmp_path, endpoint, n=80))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    prices = {"together": (1.0, 1.0), "nebius": (3.0, 5.0)}
    for row in rows:
        given, taken = prices[row["endpoint"]]
        assert row["provider"] == row["endpoint"]
        assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] * given + row["completion_tokens"] * taken) / 1e6)
    assert summary(tmp_path)["cost"]["usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
    shares = {share["name"]: share for share in summary(tmp_path)["endpoint"]["endpoints"]}
    assert sum(share["usd"] for share in shares.values()) == pytest.approx(sum(r["cost_usd"] for r in rows))


def test_runs_and_compare_show_the_cost_of_runs_billed_per_token(tmp_path, hf_token):
    with router(provider("together"), provider("nebius")) as emu:
        for name, provider_name, given in (("a", "together", 100.0), ("b", "nebius", 300.0)):
            endpoint = {"provider": provider_name, "model": LLAMA, "router_url": emu.router_url,
                        "price": {"input_per_mtok": given, "output_per_mtok": given}}
            outcome, _ = run(job(tmp_path, endpoint, n=20, name=name))
            assert outcome.exit_code == 0
    listed = cli("runs", str(tmp_path / "out" / "a"))
    assert listed.returncode == 0, listed.stderr
    assert f"${summary(tmp_path, 'a')['cost']['usd']:.2f}" in listed.stdout
    compared = cli("compare", str(tmp_path / "out" / "a"), str(tmp_path / "out" / "b"), "--json")
    assert compared.returncode == 0, compared.stderr
    figures = json.loads(compared.stdout)["runs"]
    assert figures["a"]["cost_usd"] == pytest.approx(summary(tmp_path, "a")["cost"]["usd"])
    assert figures["b"]["cost_usd"] == pytest.approx(summary(tmp_path, "b")["cost"]["usd"])
    assert figures["b"]["cost_usd"] == pytest.approx(3 * figures["a"]["cost_usd"])  # the same tokens, 3x the price


def test_a_resume_with_another_model_is_refused_and_another_provider_is_not(tmp_path, hf_token):
    from batchrun.errors import ConfigMismatchError

    qwen = "Qwen/Qwen3-8B"
    both = (LLAMA, qwen)
    with router(ProviderConfig(name="together", models=both), ProviderConfig(name="nebius", models=both)) as emu:
        first = {"provider": "together", "model": LLAMA, "router_url": emu.router_url}
        outcome, _ = run(job(tmp_path, first, n=10))
        assert outcome.exit_code == 0
        with pytest.raises(ConfigMismatchError):
            run(job(tmp_path, {**first, "model": qwen}, n=10), retry_failed=False)
        outcome, _ = run(job(tmp_path, {**first, "provider": "nebius"}, n=10))
    assert outcome.exit_code == 0
    assert outcome.summary["rows"]["skipped"] == 10


def test_a_key_refused_mid_job_stops_it_naming_the_variable_not_the_hf_token(tmp_path, monkeypatch):
    import asyncio
    import threading

    from jobkit import wait_until

    from batchrun.runner import RunOptions, run_job

    monkeypatch.setenv("BATCHRUN_TEST_API_KEY", TOKEN)
    with router(provider("together", latency_s=0.02)) as emu:
        endpoint = {"url": emu.router_url, "model": LLAMA, "api_key_env": "BATCHRUN_TEST_API_KEY"}
        spec = job(tmp_path, endpoint, n=200, concurrency={"max": 2, "initial": 2})
        result: dict = {}
        options = RunOptions(progress="off", handle_signals=False, echo=lambda _: None, poll_interval_s=0.02)
        thread = threading.Thread(target=lambda: result.update(outcome=asyncio.run(run_job(load_spec(spec), options))))
        thread.start()
        wait_until(lambda: chat_requests(emu) >= 5)
        emu.call(lambda: setattr(emu.emulator.router, "_expected_auth", "Bearer a-rotated-key"))
        thread.join(timeout=120)
    outcome = result["outcome"]
    assert outcome.exit_code == 3 and outcome.summary["stop_kind"] == "auth"
    assert "the API key in BATCHRUN_TEST_API_KEY" in outcome.summary["stop_reason"]
    assert "HF_TOKEN" not in outcome.summary["stop_reason"]


def test_the_dataset_card_shows_the_cost_billed_per_token(tmp_path, monkeypatch, hf_token):
    from hubkit import REPO_ID, card_of, point_at_hub

    with router(provider("together")) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        endpoint = {"provider": "together", "model": LLAMA, "router_url": emu.router_url,
                    "price": {"input_per_mtok": 100.0, "output_per_mtok": 100.0}}
        spec = job(tmp_path, endpoint, n=20,
                   output={"push_to_hub": {"repo": REPO_ID, "endpoint": emu.hub_url}})
        outcome, _ = run(spec)
        files = emu.hub.files(REPO_ID)
    assert outcome.exit_code == 0
    _, body = card_of(files)
    usd = summary(tmp_path)["cost"]["job_usd"]
    assert f"${usd:.4f}; 1 run(s), billed per token" in body
    for path, data in files.items():
        assert TOKEN.encode() not in data, path
