"""The preview is one self-contained HTML page: thumbnails as data URLs, escaped text, no server."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchrun.images import IMAGE_FEATURE_TYPE, image_output_schema, image_value
from batchrun.output import build_data_schema
from batchrun.preview import THUMBNAIL_SIDE, write_preview

CHROMIUM = Path("/usr/bin/chromium")
IMG_TAG = re.compile(r'<img src="data:image/(?:jpeg|png);base64,([A-Za-z0-9+/=]+)"')
COLOURS = [(220, 30, 30), (40, 170, 60), (30, 60, 220), (240, 220, 40), (245, 140, 20), (130, 50, 170)]


def picture(index: int, size: tuple[int, int] = (512, 512), pil_format: str = "PNG") -> bytes:
    image = Image.new("RGB", size, COLOURS[index % len(COLOURS)])
    image.paste(Image.new("RGB", (size[0] // 3, size[1] // 3), (250, 250, 250)), (size[0] // 3, size[1] // 3))
    out = io.BytesIO()
    image.save(out, format=pil_format)
    return out.getvalue()


def write_job(root: Path, name: str | None = "sdxl-demo") -> None:
    (root / "data").mkdir(parents=True)
    (root / "state").mkdir()
    if name is not None:
        (root / "state" / "job.json").write_text(json.dumps({"name": name}))


def text_to_image_output(root: Path, n: int, *, shards: int = 1, prompt=lambda i: f"prompt {i}") -> None:
    """A fake text-to-image output folder: ``n`` rows over ``shards`` data shards."""
    write_job(root)
    schema = build_data_schema(
        pa.schema([("prompt", pa.string())]), id_column=None, keep_columns=None, output_schema=image_output_schema()
    )
    per_shard = -(-n // shards)
    for s in range(shards):
        ids = range(s * per_shard, min(n, (s + 1) * per_shard))
        table = pa.table(
            {
                "id": list(ids),
                "prompt": [prompt(i) for i in ids],
                "image": [image_value(picture(i)) for i in ids],
                "width": [512] * len(ids),
                "height": [512] * len(ids),
                "format": ["png"] * len(ids),
                "seed": [1000 + i for i in ids],
                "latency_s": [1.25] * len(ids),
                "attempts": [1] * len(ids),
            },
            schema=schema,
        )
        pq.write_table(table, root / "data" / f"part-{s:05d}-r1.parquet")


def test_a_text_to_image_preview_embeds_one_thumbnail_per_row_with_escaped_prompts(tmp_path):
    hostile = '<script>alert("x")</script> & a fox'
    text_to_image_output(tmp_path / "out", 5, prompt=lambda i: hostile if i == 2 else f"a red fox #{i}")

    page = write_preview(tmp_path / "out", tmp_path / "preview.html")

    text = page.read_text(encoding="utf-8")
    assert page == tmp_path / "preview.html"
    assert len(IMG_TAG.findall(text)) == 5
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a fox" in text
    assert "a red fox #4" in text and "seed 1004" in text and "1.25 s" in text
    assert "sdxl-demo" in text and "5 results" in text


def test_thumbnails_are_downsized_so_the_page_stays_small(tmp_path):
    text_to_image_output(tmp_path / "out", 3)
    text = write_preview(tmp_path / "out", tmp_path / "p.html").read_text()
    for payload in IMG_TAG.findall(text):
        thumb = Image.open(io.BytesIO(base64.b64decode(payload)))
        assert max(thumb.size) <= THUMBNAIL_SIDE
    assert len(text) < 60_000


def test_the_preview_stops_at_the_limit_across_shards(tmp_path):
    text_to_image_output(tmp_path / "out", 10, shards=3)
    text = write_preview(tmp_path / "out", tmp_path / "p.html", limit=7).read_text()
    assert len(IMG_TAG.findall(text)) == 7
    assert "10 results" in text and "showing 7" in text


def test_a_vision_preview_shows_each_input_image_with_its_answer(tmp_path):
    root = tmp_path / "out"
    write_job(root, name="vlm")
    table = pa.table(
        {
            "id": ["img01", "img02"],
            "question": ["What colour?", "What shape & size?"],
            "photo": pa.array([image_value(picture(0, (64, 48))), image_value(picture(1, (96, 72), "JPEG"))],
                              IMAGE_FEATURE_TYPE),
            "generated_text": ["It is red.", "A <square>."],
            "latency_s": [0.1, 0.2],
            "attempts": [1, 1],
        }
    )
    pq.write_table(table, root / "data" / "part-00000-r1.parquet")

    text = write_preview(root, tmp_path / "p.html").read_text()

    assert len(IMG_TAG.findall(text)) == 2
    assert "It is red." in text and "A &lt;square&gt;." in text
    assert "What shape &amp; size?" in text


def test_an_undecodable_image_is_shown_as_such_not_a_crash(tmp_path):
    root = tmp_path / "out"
    write_job(root)
    table = pa.table({"id": [0, 1], "image": pa.array([image_value(b"junk"), None], IMAGE_FEATURE_TYPE)})
    pq.write_table(table, root / "data" / "part-00000-r1.parquet")
    text = write_preview(root, tmp_path / "p.html").read_text()
    assert "image cannot be decoded" in text and "no image bytes" in text


def test_a_text_preview_is_a_table_of_ids_and_answers(tmp_path):
    root = tmp_path / "out"
    write_job(root, name=None)
    table = pa.table({"id": [1, 2], "topic": ["sea", "rain"], "generated_text": ["Waves & <foam>", "Drops"]})
    pq.write_table(table, root / "data" / "part-00000-r1.parquet")
    (root / "failed").mkdir()
    pq.write_table(pa.table({"id": [3], "error_type": ["validation"]}), root / "failed" / "part-00001-r1.parquet")

    text = write_preview(root, tmp_path / "p.html").read_text()

    assert "<table>" in text and "<img" not in text
    assert "<td class=\"text\">Waves &amp; &lt;foam&gt;</td>" in text
    assert "2 results, 1 failed" in text
    assert "<h1>out</h1>" in text  # no job.json: the folder's name


def test_an_output_with_no_shards_yet_still_gets_a_page(tmp_path):
    write_job(tmp_path / "out")
    text = write_preview(tmp_path / "out", tmp_path / "p.html").read_text()
    assert "No results yet" in text


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_the_preview_renders_in_a_headless_browser(tmp_path):
    text_to_image_output(tmp_path / "out", 6, prompt=lambda i: f"a picture in colour {COLOURS[i]}")
    page = write_preview(tmp_path / "out", tmp_path / "preview.html")
    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
        page.resolve().as_uri(),
    ]  # fmt: skip
    try:
        subprocess.run(command, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 60 s")
    finally:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)

    assert shot.exists(), "chromium wrote no screenshot"
    rendered = Image.open(shot).convert("RGB")
    assert rendered.size == (1200, 900)
    colours = rendered.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 1, "the screenshot is blank"
    # The thumbnails' colours made it to the screen: some pixels are clearly red.
    raw = rendered.resize((120, 90)).tobytes()
    assert any(r > 180 and g < 80 and b < 80 for r, g, b in zip(raw[0::3], raw[1::3], raw[2::3]))
