"""Images sent to a vision-language endpoint: found, checked as TGI checks them, and described.

TGI takes images as markdown ``![](url)`` inside ``inputs`` and as ``image_url`` parts in chat
messages. A data URL must be exactly ``data:<mime>;base64,<payload>``. The internet cannot be
reached from the emulator, so an http(s) URL is fetched only when its host is loopback; any other
host answers the 422 TGI gives when a fetch fails. The description ("The image is 64x48 pixels,
mostly red.") lets a test see that the image really arrived.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any
from urllib.parse import urlparse

import aiohttp
from PIL import Image, UnidentifiedImageError

MARKDOWN_IMAGE = re.compile(r"!\[\]\(([^)]*)\)")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+);base64,(?P<payload>[A-Za-z0-9+/=\s]*)", re.DOTALL)
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "red": (220, 30, 30),
    "green": (40, 170, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40), "orange": (245, 140, 20),
    "purple": (130, 50, 170), "pink": (245, 160, 190), "brown": (120, 75, 35), "cyan": (40, 210, 220),
}


class ImageRejected(ValueError):
    """The image cannot be used; the message is TGI's validation text."""


async def load_image(url: str, session: aiohttp.ClientSession | None = None) -> Image.Image:
    """Decode an image given as a data URL, or fetched from a loopback http(s) URL."""
    url = url.strip()
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise ImageRejected("invalid image content")
        try:
            raw = base64.b64decode(match["payload"], validate=False)
        except (binascii.Error, ValueError):
            raise ImageRejected("invalid image content") from None
        return _decode(raw)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ImageRejected("invalid image content")
    if parsed.hostname not in _LOOPBACK_HOSTS:
        raise ImageRejected(f"Failed to fetch image {url}: the emulator fetches loopback URLs only")
    try:
        owned = session is None
        session = session or aiohttp.ClientSession()
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status != 200:
                    raise ImageRejected(f"Failed to fetch image {url}: HTTP {response.status}")
                raw = await response.read()
        finally:
            if owned:
                await session.close()
    except aiohttp.ClientError as error:
        raise ImageRejected(f"Failed to fetch image {url}: {type(error).__name__}") from None
    return _decode(raw)


def _decode(raw: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageRejected("invalid image content") from None
    return image


def dominant_colour(image: Image.Image) -> str:
    """The palette name most pixels are closest to (on a 16x16 thumbnail)."""
    small = image.convert("RGB").resize((16, 16))
    votes: dict[str, int] = {}
    pixels: Any = small.get_flattened_data() if hasattr(small, "get_flattened_data") else small.getdata()  # Pillow < 12
    for pixel in pixels:
        name = min(_PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(pixel, _PALETTE[n], strict=True)))
        votes[name] = votes.get(name, 0) + 1
    return max(sorted(votes), key=lambda n: votes[n])


def describe(images: list[Image.Image]) -> str:
    """One sentence per image naming its size and dominant colour."""
    sentences = []
    for index, image in enumerate(images):
        subject = "The image" if len(images) == 1 else f"Image {index + 1}"
        sentences.append(f"{subject} is {image.width}x{image.height} pixels, mostly {dominant_colour(image)}.")
    return " ".join(sentences)
