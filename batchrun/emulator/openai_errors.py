"""OpenAI's error body, as the router and the batch API answer it."""

from __future__ import annotations

from batchrun.emulator.replies import Reply, json_reply


def openai_error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> Reply:
    """``{"error": {"message", "type", "param", "code"}}`` with ``status``."""
    return json_reply({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                      headers=headers)
