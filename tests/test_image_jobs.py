"""Whole image jobs against the emulator: text-to-image out, images in for vision-language models.

The promises of issue 5 end to end: Parquet that ``datasets`` decodes to PIL images, seeds that make
any row reproducible, bytes stored exactly as the endpoint sent them, a 200 that is not an image
retried, an undecodable input image failed without a request, downsizing reported, resume in the
middle of an image job, and shards that rotate by bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web
from jobkit import (
    FAST_LIFECYCLE,
    NS,
    REPO,
    TOKEN,
    cli,
    data_requests,
    emulator,
    read_ids,
    read_rows,
    run,
    running_endpoint,
    wait_for_committed,
)
from PIL import Image

from batchrun.emulator import drawing
from batchrun.errors import SpecError
from batchrun.images import derive_seed
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec

SAMPLE_DATA = REPO / "sample_data"
SIZE = 64  # pixels: small pictures keep every job quick
RETRIES = {"max_attempts": 4, "backoff_base": 0.01, "backoff_cap": 0.05, "budget_ratio": 1.0}


def write_prompts(path: Path, n: int, *, seeds: bool = False) -> Path:
    """A Parquet input of ``n`` rows: id (string), prompt, and optionally a seed column."""
    columns: dict[str, Any] = {"id": [f"p{i:04d}" for i in range(n)], "prompt": [f"a picture of thing {i}" for i in range(n)]}
    if seeds:
        columns["seed"] = pa.array([1000 + i if i % 3 else None for i in range(n)], pa.int64())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_job(tmp_path: Path, name: str, spec: dict[str, Any]) -> Path:
    full = {
        "name": name,
        "retries": RETRIES,
        "request_timeout": "5s",
        "concurrency": {"max": 8, "initial": 4},
        "output": {"path": str(tmp_path / "out" / name), "shard_rows": 1000},
        **spec,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(full, sort_keys=False))
    return path


def image_job(tmp_path: Path, endpoint: dict[str, Any], input_path: Path, name: str = "img", **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "task": "text-to-image",
        "input": {"parquet": str(input_path), "id_column": "id", "keep_columns": ["prompt"]},
        "prompt": {"column": "prompt"},
        "parameters": {"num_inference_steps": 4, "guidance_scale": 5.0, "width": SIZE, "height": SIZE,
                       "negative_prompt": "blurry"},
        "image": {"format": "png"},
        "endpoint": endpoint,
    }
    spec.update(overrides)
    return write_job(tmp_path, name, spec)


def vision_job(tmp_path: Path, endpoint: dict[str, Any], input_path: Path, name: str = "vis", **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "task": "image-text-to-text",
        "input": {"parquet": str(input_path), "id_column": "id"},
        "prompt": {"template": "{question}", "image_column": "image"},
        "parameters": {"max_tokens": 16, "seed": 1},
        "endpoint": endpoint,
    }
    spec.update(overrides)
    return write_job(tmp_path, name, spec)


def image_endpoint(**overrides: Any):
    return running_endpoint(task="text-to-image", image_max_size=4096, **overrides)


def vision_endpoint(**overrides: Any):
    return running_endpoint(task="image-text-to-text", **overrides)


def url_of(emu) -> dict[str, str]:
    return {"url": emu.endpoint_url(NS, "gen")}


def picture(size: tuple[int, int], colour: tuple[int, int, int] = (220, 30, 30), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def load_with_datasets(folder: Path):
    import datasets

    return datasets.load_dataset("parquet", data_files=str(folder / "*.parquet"), split="train")


# ---------------------------------------------------------------------------------------- text-to-image


def test_a_text_to_image_job_writes_images_that_datasets_decodes_to_pil(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 12))
        outcome, _ = run(spec)
    assert outcome.exit_code == 0
    ds = load_with_datasets(tmp_path / "out" / "img" / "data")
    assert ds.column_names == ["id", "prompt", "image", "width", "height", "format", "seed", "latency_s", "attempts"]
    assert len(ds) == 12
    for row in ds:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (SIZE, SIZE)
        assert (row["width"], row["height"], row["format"]) == (SIZE, SIZE, "png") and row["latency_s"] > 0


def test_seeds_come_from_the_column_or_the_row_id_and_the_stored_bytes_are_the_endpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 9, seeds=True),
                         image={"format": "jpeg", "seed_column": "seed", "seed": 11},
                         input={"parquet": str(tmp_path / "in.parquet"), "id_column": "id", "keep_columns": ["prompt"]})
        outcome, _ = run(spec)
    assert outcome.exit_code == 0
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "img" / "data")}
    for i in range(9):
        row = rows[f"p{i:04d}"]
        expected_seed = 1000 + i if i % 3 else derive_seed(f"p{i:04d}", 11)  # a null seed: derived from the id
        assert row["seed"] == expected_seed
        # The emulator draws a pure function of (prompt, seed, size): the stored bytes are exactly its answer.
        assert row["image"]["bytes"] == drawing.encode(drawing.draw(row["prompt"], expected_seed, SIZE, SIZE), "image/jpeg")
        assert row["format"] == "jpeg"


def test_a_seed_column_needs_no_keep_columns_the_output_seed_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        input_path = write_prompts(tmp_path / "in.parquet", 6, seeds=True)
        spec = image_job(tmp_path, url_of(emu), input_path, image={"format": "png", "seed_column": "seed"},
                         input={"parquet": str(input_path), "id_column": "id"})  # keep every column
        outcome, _ = run(spec)
    assert outcome.exit_code == 0
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "img" / "data")}
    assert set(rows["p0001"]) >= {"id", "prompt", "image", "seed"}
    assert rows["p0001"]["seed"] == 1001 and rows["p0000"]["seed"] == derive_seed("p0000", 0)


def test_the_same_job_run_twice_draws_the_same_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    input_path = write_prompts(tmp_path / "in.parquet", 8)
    with emulator(image_endpoint()) as emu:
        first, _ = run(image_job(tmp_path, url_of(emu), input_path, name="a", image={"seed": 4}))
        second, _ = run(image_job(tmp_path, url_of(emu), input_path, name="b", image={"seed": 4}))
        other, _ = run(image_job(tmp_path, url_of(emu), input_path, name="c", image={"seed": 5}))

    def pictures(name: str) -> dict[str, tuple[int, bytes]]:
        return {r["id"]: (r["seed"], r["image"]["bytes"]) for r in read_rows(tmp_path / "out" / name / "data")}

    assert first.exit_code == second.exit_code == other.exit_code == 0
    assert pictures("a") == pictures("b")
    assert {seed for seed, _ in pictures("a").values()}.isdisjoint({seed for seed, _ in pictures("c").values()})


@pytest.mark.parametrize("fault", ["rate_error_body", "rate_truncated"])
def test_a_200_that_is_not_an_image_is_retried_and_never_stored(tmp_path, monkeypatch, fault):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint(faults={"seed": 2, fault: 0.3})) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 30))
        outcome, _ = run(spec)
    out = tmp_path / "out" / "img"
    ok, failed = read_ids(out / "data"), read_ids(out / "failed")
    assert sorted(ok + failed) == [f"p{i:04d}" for i in range(30)]
    assert outcome.summary["retries"] > 0 and outcome.summary["status_counts"]["bad_body"] > 0  # seen, retried
    assert len(ok) >= 28
    for row in read_rows(out / "data"):
        Image.open(io.BytesIO(row["image"]["bytes"])).load()  # every stored image is whole
    for row in read_rows(out / "failed"):
        assert row["error_type"] == "not_an_image" and row["retryable"] and row["status"] == 200


class LoopbackServer:
    """A tiny aiohttp server on its own thread: ``routes`` maps (method, path) to a handler."""

    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.requests = 0
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._count])
        for (method, path), handler in self.routes.items():
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        return await handler(request)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


async def login_page(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="<html><body>Please log in</body></html>", content_type="text/html")


def test_html_answered_with_200_becomes_a_retryable_not_an_image_failure(tmp_path):
    with LoopbackServer({("POST", "/{tail:.*}"): login_page}) as server:  # a confused proxy
        spec = image_job(tmp_path, {"url": server.url}, write_prompts(tmp_path / "in.parquet", 3))
        outcome, _ = run(spec)
    failures = read_rows(tmp_path / "out" / "img" / "failed")
    assert outcome.exit_code == 1 and read_ids(tmp_path / "out" / "img" / "data") == []
    # Every attempt of every row, and the preflight's one GET /info.
    assert len(failures) == 3 and server.requests == 3 * RETRIES["max_attempts"] + 1
    for row in failures:
        assert row["error_type"] == "not_an_image" and row["retryable"] and row["status"] == 200
        assert "text/html" in row["error"] and "Please log in" in row["error"]


def test_shards_rotate_by_bytes_and_every_shard_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 24),
                         parameters={"width": 256, "height": 256},
                         output={"path": str(tmp_path / "out" / "img"), "shard_rows": 10_000, "shard_bytes": "8KB"})
        outcome, _ = run(spec)
    assert outcome.exit_code == 0
    shards = sorted((tmp_path / "out" / "img" / "data").glob("*.parquet"))
    images = [[len(r["image"]["bytes"]) for r in pq.read_table(s, columns=["image"]).to_pylist()] for s in shards]
    assert sum(map(len, images)) == 24 and len(shards) >= 4  # far fewer rows per shard than shard_rows
    for shard in images[:-1]:
        # Each shard closed on the row that took it past 8 KB (its ids and prompts count too).
        assert sum(shard[:-1]) < 8000 and sum(shard) > 0.8 * 8000
    assert len(load_with_datasets(tmp_path / "out" / "img" / "data")) == 24


def test_an_image_job_stopped_midway_resumes_without_redrawing_or_losing_a_row(tmp_path, monkeypatch):
    n = 60
    with emulator(image_endpoint(image_latency_s=0.02)) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", n), name="mid",
                         concurrency={"max": 2, "initial": 2},
                         output={"path": str(tmp_path / "out" / "mid"), "shard_rows": 5})
        env = {**os.environ, "HF_TOKEN": TOKEN}
        proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = tmp_path / "out" / "mid"
        wait_for_committed(out, 5, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 3, stderr
        partial = set(read_ids(out / "data"))
        assert 0 < len(partial) < n
        sent_before = data_requests(emu)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        outcome, _ = run(spec)
        assert outcome.exit_code == 0 and outcome.summary["rows"]["skipped"] == len(partial)
        assert data_requests(emu) - sent_before == n - len(partial)  # done rows are not drawn again
    rows = read_rows(out / "data")
    assert sorted(r["id"] for r in rows) == [f"p{i:04d}" for i in range(n)]  # none lost, none twice
    for row in rows:
        assert row["seed"] == derive_seed(row["id"], 0)
        assert row["image"]["bytes"] == drawing.encode(drawing.draw(row["prompt"], row["seed"], SIZE, SIZE), "image/png")


def test_a_local_endpoint_serves_the_task_the_job_asks_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    local = {"local": {"pending_s": 0.02, "initializing_s": 0.05, "replica_start_s": 0.02}}
    outcome, _ = run(image_job(tmp_path, local, write_prompts(tmp_path / "in.parquet", 4)))
    assert outcome.exit_code == 0 and len(read_ids(tmp_path / "out" / "img" / "data")) == 4


# ---------------------------------------------------------------------------------------- vision


def test_a_vision_job_reads_a_datasets_image_column_and_answers_about_each_picture(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(vision_endpoint()) as emu:
        outcome, _ = run(vision_job(tmp_path, url_of(emu), SAMPLE_DATA / "vision.parquet"))
    assert outcome.exit_code == 0
    ds = load_with_datasets(tmp_path / "out" / "vis" / "data")
    colours = {"img01": "red", "img02": "green", "img03": "blue", "img04": "yellow", "img05": "orange", "img06": "purple"}
    assert sorted(ds["id"]) == sorted(colours)
    for row in ds:
        # The emulator describes the picture it decoded from the data URL: its true size and colour.
        w, h = row["image"].size
        assert row["generated_text"].startswith(f"The image is {w}x{h} pixels, mostly {colours[row['id']]}.")
        assert row["image_downsized"] is False and row["completion_tokens"] > 0


def test_vision_images_may_be_raw_bytes_local_paths_or_loopback_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "green.png").write_bytes(picture((30, 20), (40, 170, 60)))

    async def blue(request: web.Request) -> web.Response:
        return web.Response(body=picture((24, 24), (30, 60, 220)), content_type="image/png")

    pq.write_table(pa.table({"id": ["bytes"], "question": ["colour?"], "image": [picture((20, 10))]}),
                   tmp_path / "bytes.parquet")
    # The emulator fetches http(s) image URLs from loopback hosts, as TGI fetches any URL.
    with LoopbackServer({("GET", "/blue.png"): blue}) as images, emulator(vision_endpoint()) as emu:
        pq.write_table(pa.table({"id": ["path", "url"], "question": ["colour?"] * 2,
                                 "image": ["green.png", images.url + "/blue.png"]}), tmp_path / "strings.parquet")
        as_bytes, _ = run(vision_job(tmp_path, url_of(emu), tmp_path / "bytes.parquet", name="b"))
        as_strings, _ = run(vision_job(tmp_path, url_of(emu), tmp_path / "strings.parquet", name="s",
                                       image={"base_dir": str(tmp_path / "pics"), "max_side": 8}))
        assert images.requests == 1  # fetched by the server, not by batchrun
    assert as_bytes.exit_code == 0 and as_strings.exit_code == 0, read_rows(tmp_path / "out" / "s" / "failed")
    answers = {r["id"]: r for r in read_rows(tmp_path / "out" / "b" / "data") + read_rows(tmp_path / "out" / "s" / "data")}
    assert answers["bytes"]["generated_text"].startswith("The image is 20x10 pixels, mostly red.")
    assert answers["path"]["generated_text"].startswith("The image is 8x5 pixels, mostly green.")  # max_side 8
    assert answers["path"]["image_downsized"] is True
    assert answers["url"]["generated_text"].startswith("The image is 24x24 pixels, mostly blue.")
    assert answers["url"]["image_downsized"] is None  # batchrun never saw it


def test_an_undecodable_input_image_fails_its_row_without_a_request(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    images = [{"bytes": picture((16, 16)), "path": "ok.png"}, {"bytes": b"\x89PNG not really", "path": "broken.png"},
              {"bytes": None, "path": None}, {"bytes": picture((16, 16))[:40], "path": "cut.png"}]
    image_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["ok", "broken", "missing", "cut"], "question": ["what?"] * 4,
                             "image": pa.array(images, image_type)}), input_path)
    with emulator(vision_endpoint()) as emu:
        outcome, _ = run(vision_job(tmp_path, url_of(emu), input_path))
        assert data_requests(emu) == 1  # only the good image was sent
    assert outcome.exit_code == 1
    assert read_ids(tmp_path / "out" / "vis" / "data") == ["ok"]
    failures = {r["id"]: r for r in read_rows(tmp_path / "out" / "vis" / "failed")}
    assert set(failures) == {"broken", "missing", "cut"}
    for row in failures.values():
        assert row["error_type"] == "bad_image" and row["attempts"] == 0 and not row["retryable"]
    assert "broken.png" in failures["broken"]["error"]


def test_large_input_images_are_downsized_before_sending_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    image_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    images = [{"bytes": picture((400, 200)), "path": "wide.png"}, {"bytes": picture((100, 300), fmt="JPEG"), "path": "tall.jpg"},
              {"bytes": picture((50, 50)), "path": "small.png"}]
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["wide", "tall", "small"], "question": ["what?"] * 3,
                             "image": pa.array(images, image_type)}), input_path)
    with emulator(vision_endpoint()) as emu:
        outcome, _ = run(vision_job(tmp_path, url_of(emu), input_path, image={"max_side": 100}))
    assert outcome.exit_code == 0
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "vis" / "data")}
    assert rows["wide"]["generated_text"].startswith("The image is 100x50 pixels")
    assert rows["tall"]["generated_text"].startswith("The image is 33x100 pixels")
    assert rows["small"]["generated_text"].startswith("The image is 50x50 pixels")
    assert [rows[i]["image_downsized"] for i in ("wide", "tall", "small")] == [True, True, False]
    assert rows["wide"]["image"]["bytes"] == images[0]["bytes"]  # the kept input column is the original


def test_a_missing_image_column_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(vision_endpoint()) as emu:
        spec = vision_job(tmp_path, url_of(emu), SAMPLE_DATA / "vision.parquet",
                          prompt={"template": "{question}", "image_column": "picture"})
        with pytest.raises(SpecError) as refused:
            run(spec)
        assert data_requests(emu) == 0
    assert refused.value.key == "prompt.image_column" and "picture" in refused.value.problem


def test_a_missing_seed_column_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 3), image={"seed_column": "sede"})
        with pytest.raises(SpecError) as refused:
            run(spec)
        assert data_requests(emu) == 0
    assert refused.value.key == "image.seed_column" and "sede" in refused.value.problem


# ---------------------------------------------------------------------------------------- the CLI


def _run_shipped(job: str, output: Path):
    """A shipped job in-process, its emulated endpoint starting fast (the demo's timings are for show)."""
    spec = load_spec(REPO / job, output_override=str(output))
    local = {**spec.endpoint.local, **FAST_LIFECYCLE}
    spec = dataclasses.replace(spec, endpoint=dataclasses.replace(spec.endpoint, local=local))
    options = RunOptions(progress="off", handle_signals=False, echo=lambda _: None, poll_interval_s=0.02)
    return asyncio.run(run_job(spec, options))


def test_the_shipped_image_jobs_run_and_their_preview_shows_every_picture(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped jobs name sample_data/ relative to the project folder
    images, vision = tmp_path / "images", tmp_path / "vision"
    assert _run_shipped("jobs/images.yaml", images).exit_code == 0
    assert _run_shipped("jobs/vision.yaml", vision).exit_code == 0
    assert len(load_with_datasets(images / "data")) == 24 and len(load_with_datasets(vision / "data")) == 6
    result = cli("preview", str(images))
    assert result.returncode == 0, result.stderr
    page = images / "preview.html"
    assert result.stdout.strip() == str(page)
    html = page.read_text()
    assert html.count("<img ") == 24 and "a red fox in the snow" in html and "seed 1000" in html
    result = cli("preview", str(vision), "--html", str(tmp_path / "v.html"), "--limit", "2")
    assert result.returncode == 0 and (tmp_path / "v.html").read_text().count("<img ") == 2


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BATCHRUN_SLOW") != "1", reason="runs the demo jobs at their own pace with BATCHRUN_SLOW=1")
def test_the_shipped_image_jobs_run_from_the_command_line_as_a_user_would(tmp_path):
    for job in ("images", "vision"):
        result = cli("run", f"jobs/{job}.yaml", "--output", str(tmp_path / job), "--progress", "off")
        assert result.returncode == 0, result.stderr
        assert "every row succeeded" in result.stderr
    assert cli("preview", str(tmp_path / "images")).returncode == 0


def test_preview_of_a_folder_that_does_not_exist_exits_2(tmp_path):
    result = cli("preview", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "not an output folder" in result.stderr


def test_a_template_that_pastes_the_image_column_into_the_text_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(vision_endpoint()) as emu:
        spec = vision_job(tmp_path, url_of(emu), SAMPLE_DATA / "vision.parquet",
                          prompt={"template": "{question} {image}", "image_column": "image"})
        with pytest.raises(SpecError) as refused:
            run(spec)
        assert data_requests(emu) == 0
    assert refused.value.key == "prompt.template" and "image part" in refused.value.problem
