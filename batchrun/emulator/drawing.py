"""Deterministic pictures for the text-to-image endpoint, drawn with Pillow.

The same (prompt, seed, width, height) always gives the same pixels, hence the same bytes for a
given format: a background gradient and a few shapes whose colours and places come from a hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import random

from PIL import Image, ImageDraw

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def draw(prompt: str, seed: int | None, width: int, height: int) -> Image.Image:
    """Draw the picture for a prompt."""
    material = json.dumps([prompt, seed, width, height]).encode()
    rng = random.Random(int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big"))
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    # A vertical gradient built from a 1-pixel-wide column is fast at any size.
    column = Image.new("RGB", (1, 256))
    column.putdata([tuple(t + (b - t) * y // 255 for t, b in zip(top, bottom)) for y in range(256)])
    image = column.resize((width, height))
    pen = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(1, max(1, width // 2)), y0 + rng.randint(1, max(1, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def encode(image: Image.Image, mime: str) -> bytes:
    """Encode in one of FORMATS."""
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[mime])
    return buffer.getvalue()
