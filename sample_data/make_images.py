"""Regenerate the small image samples for the text-to-image and vision-language jobs.

    .venv/bin/python sample_data/make_images.py

Writes, next to this script and deterministically (no randomness, no clock):

- ``images/*.png`` and ``images/*.jpg``: six small pictures (64x48 to 128x96), each one dominant
  colour with a shape on it, so that an answer naming the colour can be checked;
- ``vision.parquet``: 6 rows of ``id`` (string), ``question`` and ``image``, a ``datasets`` Image
  column (``struct<bytes, path>`` holding the files' bytes, declared in the ``huggingface`` metadata);
- ``image_prompts.parquet``: 24 rows of ``id`` (int64), ``prompt`` and ``seed`` (int64).

Everything together stays well under 100 KB.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"

# The emulator names the dominant colour from this palette (batchrun/emulator/vision.py).
COLOURS = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "orange": (245, 140, 20), "purple": (130, 50, 170),
}  # fmt: skip

# (file stem, colour, shape, size, format)
PICTURES = [
    ("red_circle", "red", "circle", (64, 48), "PNG"),
    ("green_square", "green", "square", (96, 72), "PNG"),
    ("blue_triangle", "blue", "triangle", (128, 96), "JPEG"),
    ("yellow_stripes", "yellow", "stripes", (80, 60), "PNG"),
    ("orange_ring", "orange", "ring", (112, 84), "JPEG"),
    ("purple_cross", "purple", "cross", (72, 96), "PNG"),
]

QUESTIONS = [
    "What colour is this image?",
    "What shape do you see?",
    "Describe the image in one sentence.",
    "Is there any text in this picture?",
    "What is the dominant colour?",
    "How many shapes are in the image?",
]

SUBJECTS = [
    "a red fox in the snow", "a lighthouse at dusk", "a bowl of ripe cherries", "a paper boat on a pond",
    "a city skyline in the rain", "an owl on a branch", "a field of sunflowers", "a vintage bicycle",
    "a cup of tea on a windowsill", "a mountain lake at dawn", "a robot reading a book", "a koi fish",
]  # fmt: skip
STYLES = ["watercolour", "photograph, 35mm", "pixel art", "oil painting"]


def draw(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    """One picture: a solid background in ``colour`` with a white or dark ``shape`` in the middle."""
    width, height = size
    image = Image.new("RGB", size, COLOURS[colour])
    pen = ImageDraw.Draw(image)
    ink = (250, 250, 250) if colour != "yellow" else (40, 40, 40)
    # The shape covers well under half the picture, so the background stays the dominant colour.
    cx, cy, r = width // 2, height // 2, min(width, height) // 4
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    elif shape == "stripes":
        for x in range(4, width, 16):
            pen.rectangle((x, 0, x + 3, height), fill=ink)
    elif shape == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=max(2, r // 4))
    elif shape == "cross":
        pen.rectangle((cx - r, cy - 3, cx + r, cy + 3), fill=ink)
        pen.rectangle((cx - 3, cy - r, cx + 3, cy + r), fill=ink)
    return image


def encode(image: Image.Image, pil_format: str) -> bytes:
    """The file's bytes; fixed options, so the output is the same on every run."""
    out = io.BytesIO()
    if pil_format == "JPEG":
        image.save(out, format="JPEG", quality=85)
    else:
        image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def write_images() -> list[tuple[str, bytes]]:
    """Write ``images/`` and return (file name, bytes) for each picture."""
    IMAGES.mkdir(exist_ok=True)
    written = []
    for stem, colour, shape, size, pil_format in PICTURES:
        name = f"{stem}.{'jpg' if pil_format == 'JPEG' else 'png'}"
        data = encode(draw(colour, shape, size), pil_format)
        (IMAGES / name).write_bytes(data)
        written.append((name, data))
    return written


def vision_table(images: list[tuple[str, bytes]]) -> pa.Table:
    """One question per picture, the picture embedded as a ``datasets`` Image value."""
    image_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    table = pa.table(
        {
            "id": pa.array([f"img{i + 1:02d}" for i in range(len(images))], pa.string()),
            "question": pa.array(QUESTIONS[: len(images)], pa.string()),
            # The path is the bare file name, as datasets stores it when it embeds the bytes.
            "image": pa.array([{"bytes": data, "path": name} for name, data in images], image_type),
        }
    )
    features = {
        "id": {"dtype": "string", "_type": "Value"},
        "question": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
    }
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def prompts_table() -> pa.Table:
    """24 text-to-image prompts with ids 1..24 and fixed seeds."""
    prompts = [f"{SUBJECTS[(i * 5) % len(SUBJECTS)]}, {STYLES[i % len(STYLES)]}" for i in range(24)]
    return pa.table(
        {
            "id": pa.array(range(1, 25), pa.int64()),
            "prompt": pa.array(prompts, pa.string()),
            "seed": pa.array([1000 + 37 * i for i in range(24)], pa.int64()),
        }
    )


def main() -> None:
    images = write_images()
    pq.write_table(vision_table(images), HERE / "vision.parquet")
    pq.write_table(prompts_table(), HERE / "image_prompts.parquet")
    total = sum(len(d) for _, d in images) + sum(
        (HERE / n).stat().st_size for n in ("vision.parquet", "image_prompts.parquet")
    )
    print(f"wrote {len(images)} images, vision.parquet and image_prompts.parquet ({total / 1024:.1f} KB in all)")


if __name__ == "__main__":
    main()
