"""Whole text-to-image jobs through the emulated Inference Providers router: each provider's own route,
the provider's model id from the Hub's mapping, one image per row, each image's cost."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants
from jobkit import REPO, TOKEN, cli, read_ids, read_rows, run, write_spec, write_topics
from PIL import Image

from batchrun.emulator import EmulatorConfig, EmulatorThread, ProviderConfig, RouterConfig
from batchrun.errors import EndpointUnusableError, SpecError
from batchrun.spec import load_spec

FLUX = "black-forest-labs/FLUX.1-schnell"
OWN_IDS = {"hf-inference": FLUX, "together": "black-forest-labs/FLUX.1-schnell-Free", "nscale": "flux-schnell"}
IMAGE_ROUTES = {"POST /hf-inference/models/{model}", "POST /together/v1/images/generations",
                "POST /nscale/v1/images/generations"}


def image_provider(name: str, **overrides: Any) -> ProviderConfig:
    return ProviderConfig(name=name, image_models=((FLUX, OWN_IDS[name]),), **overrides)


@pytest.fixture
def router_and_hub(monkeypatch):
    """An emulated router with the given providers; huggingface_hub's Hub (HF_ENDPOINT) is the emulator's."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def start(*providers: ProviderConfig) -> EmulatorThread:
        emu = EmulatorThread(EmulatorConfig(token=TOKEN, endpoints=[], router=RouterConfig(providers=providers)))
        emu.__enter__()
        started.append(emu)
        monkeypatch.setattr(constants, "ENDPOINT", emu.hub_url)
        return emu

    started: list[EmulatorThread] = []
    yield start
    for emu in started:
        emu.__exit__(None, None, None)


def image_job(tmp_path: Path, endpoint: Any, *, n: int = 12, **overrides: Any) -> Path:
    input_path = tmp_path / "in" / "topics.parquet"
    if not input_path.exists():
        write_topics(input_path, n)
    keys: dict[str, Any] = {"task": "text-to-image", "prompt": {"template": "A painting of {topic}.", "system": None},
                            "parameters": {"width": 32, "height": 24, "max_tokens": None, "seed": None}, **overrides}
    return write_spec(tmp_path, endpoint=endpoint, input_path=input_path, **keys)


def summary(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "out" / "job" / "state" / "summary.json").read_text())


def image_requests(emu: EmulatorThread) -> int:
    return sum(sum(statuses.values()) for route, statuses in emu.router_stats()["by_route"].items()
               if route in IMAGE_ROUTES)


@pytest.mark.parametrize("name", ["hf-inference", "together", "nscale"])
def test_each_provider_route_draws_every_row_and_cost_usd_sums_to_images_times_price(tmp_path, router_and_hub, name):
    emu = router_and_hub(image_provider(name))
    endpoint = {"provider": name, "model": FLUX, "router_url": emu.router_url, "price": {"per_image": 0.004}}
    outcome, lines = run(image_job(tmp_path, endpoint))
    stats = emu.router_stats()["providers"][name]
    assert outcome.exit_code == 0, lines
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 12 and stats["images"] == 12
    for row in rows:
        picture = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert picture.size == (32, 24) == (row["width"], row["height"])
        assert row["format"] == "png" and row["provider"] == name
    assert [r["cost_usd"] for r in rows] == [pytest.approx(0.004)] * 12
    assert summary(tmp_path)["cost"]["usd"] == pytest.approx(12 * 0.004)
    assert any("12 images" in line for line in lines)


def test_a_price_per_megapixel_charges_each_image_by_its_size(tmp_path, router_and_hub):
    emu = router_and_hub(image_provider("nscale"))
    price = {"per_image": 0.001, "per_megapixel": 0.5}
    endpoint = {"provider": "nscale", "model": FLUX, "router_url": emu.router_url, "price": price}
    outcome, _ = run(image_job(tmp_path, endpoint, n=5, parameters={"width": 200, "height": 100, "seed": None, "max_tokens": None}))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert {(r["width"], r["height"]) for r in rows} == {(200, 100)}  # nscale's size: "200x100"
    assert [r["cost_usd"] for r in rows] == [pytest.approx(0.001 + 0.5 * 0.02)] * 5


def test_the_same_rows_draw_the_same_images_on_a_rerun_elsewhere(tmp_path, router_and_hub):
    emu = router_and_hub(image_provider("together"))
    endpoint = {"provider": "together", "model": FLUX, "router_url": emu.router_url}
    run(image_job(tmp_path / "a", endpoint, n=4))
    run(image_job(tmp_path / "b", endpoint, n=4))
    first, second = (read_rows(tmp_path / side / "out" / "job" / "data") for side in ("a", "b"))
    assert {r["id"]: r["image"]["bytes"] for r in first} == {r["id"]: r["image"]["bytes"] for r in second}
    assert {r["cost_usd"] for r in first} == {None}  # no price in the spec: the router lists none for images


def test_a_provider_that_does_not_serve_the_model_for_text_to_image_is_refused_before_anything_is_sent(
        tmp_path, router_and_hub):
    emu = router_and_hub(image_provider("hf-inference"), image_provider("together"),
                         ProviderConfig(name="nscale", models=(FLUX,)))  # nscale serves it for chat only
    endpoint = {"provider": "nscale", "model": FLUX, "router_url": emu.router_url}
    spec = image_job(tmp_path, endpoint)
    with pytest.raises(EndpointUnusableError) as refused:
        run(spec)
    checked = cli("validate", "--check-endpoint", str(spec), env={"HF_TOKEN": TOKEN})
    ran = cli("run", str(spec), env={"HF_TOKEN": TOKEN})
    assert checked.returncode == 2 and ran.returncode == 2
    for said in (str(refused.value), checked.stdout + checked.stderr, ran.stderr):
        assert "nscale does not serve black-forest-labs/FLUX.1-schnell for text-to-image" in said
        assert "served for text-to-image by: hf-inference, together" in said
    assert image_requests(emu) == 0
    assert not (tmp_path / "out" / "job" / "data").exists() or read_ids(tmp_path / "out" / "job" / "data") == []


@pytest.mark.parametrize(("model", "status", "problem"), [
    ("nobody/nothing", "live", "the Hub has no model nobody/nothing"),
    (FLUX, "error", "provider together reports status error"),
])
def test_an_unknown_model_or_a_provider_in_error_is_refused_before_anything_is_sent(
        tmp_path, router_and_hub, model, status, problem):
    emu = router_and_hub(image_provider("together", status=status))
    with pytest.raises(EndpointUnusableError, match=problem):
        run(image_job(tmp_path, {"provider": "together", "model": model, "router_url": emu.router_url}))
    assert image_requests(emu) == 0


@pytest.mark.parametrize("listed", [False, True], ids=["endpoint", "a list of one"])
def test_provider_auto_draws_with_the_first_provider_the_hub_maps_to_the_model_for_text_to_image(
        tmp_path, router_and_hub, monkeypatch, listed):
    # The Hub's mapping, in the router's order: a provider serving the model for chat only (not for images),
    # together in error, then nscale and hf-inference. auto passes over together and takes nscale.
    emu = router_and_hub(ProviderConfig(name="cerebras", models=(FLUX,)), image_provider("together", status="error"),
                         image_provider("nscale"), image_provider("hf-inference"))
    endpoint = {"provider": "auto", "model": FLUX, "router_url": emu.router_url, "price": {"per_image": 0.002}}
    spec = image_job(tmp_path, [endpoint] if listed else endpoint, n=4)
    outcome, lines = run(spec)
    assert outcome.exit_code == 0, lines
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 4 and {row["provider"] for row in rows} == {"nscale"}
    assert {(row["width"], row["height"]) for row in rows} == {(32, 24)}  # nscale's size: "32x24"
    drawn = {name: stats["images"] for name, stats in emu.router_stats()["providers"].items()}
    assert drawn == {"cerebras": 0, "together": 0, "nscale": 4, "hf-inference": 0}
    assert any("provider auto chose nscale" in line and "together (status error)" in line for line in lines), lines
    assert summary(tmp_path)["cost"]["usd"] == pytest.approx(4 * 0.002)
    # Every row done: a rerun sends nothing, so it does not ask the Hub either (here, a port nobody serves).
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    again, lines = run(spec)
    assert again.exit_code == 0 and not any("provider auto chose" in line for line in lines), lines
    assert image_requests(emu) == 4


def test_provider_auto_with_no_provider_it_can_use_is_refused_before_anything_is_sent(tmp_path, router_and_hub):
    emu = router_and_hub(image_provider("together", status="error"), ProviderConfig(name="nscale", models=(FLUX,)))
    spec = image_job(tmp_path, {"provider": "auto", "model": FLUX, "router_url": emu.router_url})
    with pytest.raises(EndpointUnusableError, match=r"provider auto: no provider serves .*together \(status error\)"):
        run(spec)
    checked = cli("validate", "--check-endpoint", str(spec), env={"HF_TOKEN": TOKEN})
    assert checked.returncode == 2 and "provider auto: no provider serves" in checked.stdout + checked.stderr
    assert image_requests(emu) == 0


def test_a_429_without_retry_after_loses_no_row(tmp_path, router_and_hub):
    flaky = image_provider("together", rate_429=0.5, rate_limit_headers=False, retry_after="none")
    emu = router_and_hub(flaky)
    endpoint = {"provider": "together", "model": FLUX, "router_url": emu.router_url, "price": {"per_image": 0.01}}
    outcome, _ = run(image_job(tmp_path, endpoint, n=30))
    stats = emu.router_stats()["providers"]["together"]
    assert stats["random_429"] > 0
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert sorted(r["id"] for r in rows) == [f"row-{i:05d}" for i in range(30)]
    assert stats["images"] == 30  # each row drawn once: a 429 is not an image
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(30 * 0.01)


def test_a_budget_counts_each_image_and_stops_before_it_is_crossed(tmp_path, router_and_hub):
    emu = router_and_hub(image_provider("hf-inference", image_latency_s=0.01))
    endpoint = {"provider": "hf-inference", "model": FLUX, "router_url": emu.router_url, "price": {"per_image": 0.1}}
    outcome, _ = run(image_job(tmp_path, endpoint, n=40, budget={"max_usd": 1.0},
                               concurrency={"max": 2, "initial": 2}))
    assert outcome.exit_code == 3
    spent = summary(tmp_path)["cost"]["job_usd"]
    assert spent < 1.0
    done = read_rows(tmp_path / "out" / "job" / "data")
    assert 0 < len(done) < 40 and sum(r["cost_usd"] for r in done) == pytest.approx(spent)


def test_the_spec_names_the_provider_routes_built_and_prices_images_per_image(tmp_path):
    def refused(endpoint: dict[str, Any], **overrides: Any) -> str:
        with pytest.raises(SpecError) as error:
            load_spec(image_job(tmp_path, endpoint, **overrides))
        return str(error.value)

    flux = {"model": FLUX}
    assert "hf-inference, nscale, together" in refused({"provider": "fal-ai", **flux})
    assert "hf-inference, nscale, together" in refused({"provider": "fastest", **flux})
    assert load_spec(image_job(tmp_path, {"provider": "auto", **flux})).endpoint.provider == "auto"
    assert "per_image" in refused({"provider": "together", **flux, "price": {"input_per_mtok": 1, "output_per_mtok": 1}})
    assert "per_image" in refused({"provider": "together", **flux}, budget={"max_usd": 1})
    assert "one endpoint" in refused([{"provider": "together", **flux}, {"provider": "nscale", **flux}])
    chat = write_spec(tmp_path, endpoint={"provider": "together", "model": FLUX, "price": {"per_image": 0.1}},
                      input_path=tmp_path / "in.parquet", name="chat")
    with pytest.raises(SpecError, match="only applies to task text-to-image"):
        load_spec(chat)


def test_the_shipped_example_runs_on_the_built_in_router_with_no_setup(tmp_path):
    result = cli("run", str(REPO / "jobs" / "provider_images.yaml"), "--output", str(tmp_path / "out"),
                 "--progress", "off")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "out" / "data")
    assert len(rows) == 12 and {r["provider"] for r in rows} == {"together"}
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(12 * 0.0027)
    assert "(12 images)" in result.stdout + result.stderr


def test_the_hf_token_appears_in_no_file_message_or_card_of_an_image_job(tmp_path, monkeypatch, caplog):
    """The token goes to the router and the Hub's provider mapping, and nowhere else: not in the images,
    the rows, the state, the card, the log, or what a refused token prints."""
    import base64
    import logging
    import urllib.parse

    canary = "hf_CANARY_image_token_NOT_REAL_0123"
    forms = [canary, base64.b64encode(canary.encode()).decode(), urllib.parse.quote(canary, safe="")]
    monkeypatch.setenv("HF_TOKEN", canary)
    caplog.set_level(logging.DEBUG)
    flaky = image_provider("together", rate_429=0.3, retry_after="none")
    with EmulatorThread(EmulatorConfig(token=canary, endpoints=[], router=RouterConfig(providers=(flaky,)))) as emu:
        monkeypatch.setattr(constants, "ENDPOINT", emu.hub_url)
        endpoint = {"provider": "together", "model": FLUX, "router_url": emu.router_url, "price": {"per_image": 0.01}}
        spec = image_job(tmp_path, endpoint, n=10)
        outcome, lines = run(spec)
        assert outcome.exit_code == 0, lines
        env = {"HF_TOKEN": canary, "HF_ENDPOINT": emu.hub_url}
        shown = [cli("validate", "--check-endpoint", str(spec), env=env),
                 cli("status", str(spec), env=env)]
        refused = cli("run", str(spec), "--output", str(tmp_path / "out" / "refused"), env={**env, "HF_TOKEN": canary + "x"})
    assert refused.returncode != 0
    assert len(read_rows(tmp_path / "out" / "job" / "data")) == 10
    texts = ["\n".join(lines), caplog.text, refused.stdout, refused.stderr]
    texts += [r.stdout + r.stderr for r in shown]
    texts += [path.read_bytes().decode("latin-1") for path in tmp_path.rglob("*") if path.is_file()]
    for text in texts:
        for form in forms:
            assert form not in text
