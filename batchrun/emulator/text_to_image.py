"""The inference-toolkit text-to-image server of an emulated endpoint.

``POST /`` with ``{"inputs": prompt, "parameters": {...}}``; ``Accept`` picks raw PNG, JPEG or
WebP bytes, and no Accept (or ``*/*``) gives a JSON string holding a base64 PNG (assumed shape).
Every error is a 400 ``{"error": ...}``. Each replica draws one image at a time; the data plane
queues the rest (no 429), as the toolkit does.
"""

from __future__ import annotations

import asyncio
import base64
import json

from batchrun.emulator import drawing
from batchrun.emulator.config import EndpointConfig
from batchrun.emulator.replies import Reply, json_reply


def error(message: str) -> Reply:
    """The toolkit's error shape."""
    return json_reply({"error": message}, 400)


class ImageModel:
    """Answers text-to-image requests for one endpoint's configuration."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config

    def parse(self, body: bytes) -> tuple[dict, str] | Reply:
        """Validate a request body; return (payload, prompt) or the 400 to send."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error("Body needs to be a valid JSON object")
        if not isinstance(payload, dict) or "inputs" not in payload:
            return error("Body needs to provide a inputs key")
        prompt = payload["inputs"]
        if not isinstance(prompt, str) or not prompt.strip():
            return error("Prompt cannot be empty")
        return payload, prompt

    async def render(self, payload: dict, accept: str) -> Reply:
        """Draw and encode the picture; the latency is image_latency_s."""
        cfg = self.config
        parameters = payload.get("parameters") or {}
        if not isinstance(parameters, dict):
            return error("parameters must be an object")
        width = parameters.get("width", cfg.image_default_size)
        height = parameters.get("height", cfg.image_default_size)
        seed = parameters.get("seed")
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= cfg.image_max_size:
                return error(f"{name} must be an integer between 8 and {cfg.image_max_size}, got {value!r}")
        if cfg.image_reject_non_square and width != height:
            return error(f"height ({height}) and width ({width}) must be equal")
        mime = _pick_format(accept)
        if mime is None:
            return error(f"Unsupported Accept header: {accept}")
        if cfg.image_latency_s > 0:
            await asyncio.sleep(cfg.image_latency_s)
        # Drawing and encoding a large picture takes milliseconds of CPU: keep it off the loop.
        encoded = await asyncio.to_thread(_draw_encoded, payload["inputs"], seed, width, height,
                                          mime or "image/png")
        if mime == "":
            return json_reply(base64.b64encode(encoded).decode())
        return Reply(200, encoded, mime)


def _draw_encoded(prompt: str, seed: int | None, width: int, height: int, mime: str) -> bytes:
    return drawing.encode(drawing.draw(prompt, seed, width, height), mime)


def _pick_format(accept: str) -> str | None:
    """The first acceptable image type; "" for JSON (no Accept or */*); None when nothing fits."""
    if not accept:
        return ""
    for item in accept.split(","):
        kind = item.split(";")[0].strip().lower()
        if kind in drawing.FORMATS:
            return kind
        if kind in ("*/*", "application/json"):
            return ""
        if kind == "image/*":
            return "image/png"
    return None
