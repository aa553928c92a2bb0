"""An OpenAI-compatible batch API, through batchrun's one transport: files up and down, batches made and read.

    POST /files (multipart: purpose=batch, file)      -> {"id": "file-..."}
    POST /batches {input_file_id, endpoint, ...}      -> a batch object
    GET  /batches/{id}, POST /batches/{id}/cancel     -> a batch object
    GET  /batches?after=&limit=                       -> {"data": [...], "has_more", "last_id"}
    GET  /files/{id}/content                          -> the file's bytes (JSONL)

Every call that fails raises :class:`BatchApiError` with the status; none is retried here (the
batch runner polls again at its next turn, reliability.md §2: one layer retries).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson

from batchrun.endpoints.base import DataPlane
from batchrun.errors import AuthError, BatchrunError, redact
from batchrun.tasks import join_url
from batchrun.transport import Request, TransportError, auth_headers, current_transport

__all__ = ["TERMINAL", "BatchApi", "BatchApiError"]

#: The states a batch does not leave.
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
#: An output or error file may be large; a batch's answers are read whole.
_FILE_MAX_BYTES = 1 << 31
_TIMEOUT_S = 120.0


class BatchApiError(BatchrunError):
    """A batch API call got no usable answer: ``status`` is the HTTP status (None: none came)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BatchApi:
    """The batch API at the data plane's base url (``.../v1``), with its key."""

    def __init__(self, plane: DataPlane) -> None:
        self.base = plane.url.rstrip("/")
        self._headers = auth_headers(self.base, plane.token, send_token=plane.send_token)

    async def _call(self, method: str, path: str, *, body: bytes | None = None,
                    content_type: str = "application/json", raw: bool = False) -> Any:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = content_type
        url = join_url(self.base, path)
        try:
            answer = await current_transport().send(Request(method, url, headers, body, timeout=_TIMEOUT_S,
                                                            max_bytes=_FILE_MAX_BYTES))
        except TransportError as exc:
            raise BatchApiError(redact(f"{method} {path}: {type(exc).__name__}: {exc}")[:300]) from None
        if answer.status in (401, 403):
            raise AuthError(f"the batch API refused the key (HTTP {answer.status} on {method} {path})",
                            status=answer.status)
        if not 200 <= answer.status < 300:
            text = answer.body[:300].decode("utf-8", "replace")
            raise BatchApiError(redact(f"{method} {path}: HTTP {answer.status}: {text}"), status=answer.status)
        if raw:
            return answer.body
        try:
            return orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise BatchApiError(f"{method} {path}: the answer is not JSON", status=answer.status) from None

    async def upload(self, data: bytes, filename: str) -> str:
        """Upload a batch input file; its id."""
        boundary = "batchrun-" + secrets.token_hex(12)
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode(),
            (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
             "Content-Type: application/jsonl\r\n\r\n").encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
        try:
            doc = await self._call("POST", "/files", body=b"".join(parts),
                                   content_type=f"multipart/form-data; boundary={boundary}")
        except BatchApiError as exc:
            if exc.status in (404, 405):  # nothing was paid for: say what to do instead
                raise BatchApiError(f"{redact(self.base)} has no batch API (POST /files answered {exc.status}): use "
                                    "endpoint.mode online or flex with it", status=exc.status) from None
            raise
        return str(doc["id"])

    async def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = orjson.dumps({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                             "metadata": metadata})
        doc: dict[str, Any] = await self._call("POST", "/batches", body=body)
        return doc

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", f"/batches/{batch_id}")
        return doc

    async def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """Ask the batch to stop; None when it had ended already (409)."""
        try:
            doc: dict[str, Any] = await self._call("POST", f"/batches/{batch_id}/cancel", body=b"{}")
        except BatchApiError as exc:
            if exc.status == 409:
                return None
            raise
        return doc

    async def batches(self) -> AsyncIterator[dict[str, Any]]:
        """Every batch the key can see, newest first."""
        after = ""
        while True:
            page = await self._call("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            data = page.get("data") or []
            for batch in data:
                yield batch
            if not page.get("has_more") or not data:
                return
            after = str(data[-1]["id"])

    async def content(self, file_id: str) -> list[dict[str, Any]]:
        """A file's JSONL lines."""
        body: bytes = await self._call("GET", f"/files/{file_id}/content", raw=True)
        return [orjson.loads(line) for line in body.splitlines() if line.strip()]
