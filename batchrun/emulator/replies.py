"""What a data-plane handler answers, before faults and transport get a say."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Reply:
    """A complete (non-streamed) answer. Kept as bytes so a fault can cut or replace it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def to_response(self) -> web.Response:
        """The aiohttp response carrying this reply."""
        return web.Response(status=self.status, body=self.body, content_type=self.content_type, headers=self.headers)


def json_reply(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply."""
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json", headers or {})


def tgi_error(status: int, error_type: str, message: str) -> Reply:
    """TGI's error shape: ``{"error": ..., "error_type": ...}``."""
    return json_reply({"error": message, "error_type": error_type}, status)


def text_reply(status: int, text: str) -> Reply:
    """A plain-text reply, as proxies and web frameworks send them."""
    return Reply(status, text.encode(), "text/plain")
