"""Hugging Face Storage Buckets on the emulated Hub, as huggingface_hub's bucket API calls them.

A bucket is a flat map ``path -> (xet hash, size, mtime)``: its bytes live in the Xet CAS
(``batchrun.emulator.xet_cas``, on the same port), a file is added by naming a hash the CAS holds.
What it serves:

- ``POST/GET/DELETE /api/buckets/{ns}/{name}`` (create_bucket, 409 when it exists; bucket_info; delete_bucket);
- ``GET /api/buckets/{ns}/{name}/xet-write-token`` and ``/xet-read-token``: ``{casUrl, exp, accessToken}``;
- ``POST /api/buckets/{ns}/{name}/batch`` (NDJSON ``addFile`` / ``copyFile`` / ``deleteFile``; a hash the CAS
  does not hold fails that line: 200 with ``failed`` when some lines applied, 422 when none did);
- ``GET /api/buckets/{ns}/{name}/tree[/{prefix}]`` (``recursive``; folders listed when not) and
  ``POST .../paths-info`` (list_bucket_tree, get_bucket_paths_info);
- ``HEAD /buckets/{ns}/{name}/resolve/{path}``: the file's ``X-Xet-Hash``, size and the read-token link.

Writes to a path replace what it held, and nothing can be refused on a condition: a bucket has no
create-if-absent or compare-and-swap, as on the Hub.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from batchrun.emulator.xet_cas import XetCas, token_answer

TOKEN_LIFETIME_S = 3600


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class BucketFile:
    xet_hash: str
    size: int
    mtime_ms: int
    uploaded_at: str

    def entry(self, path: str) -> dict[str, Any]:
        mtime = dt.datetime.fromtimestamp(self.mtime_ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")
        return {"type": "file", "path": path, "size": self.size, "xetHash": self.xet_hash, "mtime": mtime,
                "uploadedAt": self.uploaded_at}


@dataclass
class Bucket:
    bucket_id: str
    private: bool
    created_at: str
    files: dict[str, BucketFile] = field(default_factory=dict)


class EmulatedBuckets:
    """The buckets of the emulated Hub; ``authorized`` is the Hub's check of a request's token."""

    def __init__(self, cas: XetCas, authorized: Any) -> None:
        self.cas = cas
        self._authorized = authorized
        self.buckets: dict[str, Bucket] = {}
        self.log: list[dict[str, Any]] = []

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        base = "/api/buckets/{ns}/{name}"
        r.add_post(base, self._create)
        r.add_get(base, self._info)
        r.add_delete(base, self._delete)
        r.add_get(base + "/xet-{scope:read|write}-token", self._token)
        r.add_post(base + "/batch", self._batch)
        r.add_get(base + "/tree", self._tree)
        r.add_get(base + "/tree/{prefix:.+}", self._tree)
        r.add_post(base + "/paths-info", self._paths_info)
        r.add_route("HEAD", "/buckets/{ns}/{name}/resolve/{path:.+}", self._resolve)

    # ----- plumbing

    def _answer(self, request: web.Request, response: web.Response) -> web.Response:
        self.log.append({"method": request.method, "path": request.path, "status": response.status})
        return response

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        return self._answer(request, web.json_response({"error": message}, status=status,
                                                       headers={"X-Error-Message": message}))

    def _find(self, request: web.Request) -> tuple[Bucket | None, web.Response | None]:
        if not self._authorized(request):
            return None, self._error(request, 401, "Invalid username or password.")
        bucket = self.buckets.get(f"{request.match_info['ns']}/{request.match_info['name']}")
        if bucket is None:
            return None, self._error(request, 404, "Bucket not found")
        return bucket, None

    # ----- routes

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(request, 401, "Invalid username or password.")
        bucket_id = f"{request.match_info['ns']}/{request.match_info['name']}"
        body = await request.json() if request.can_read_body else {}
        if bucket_id in self.buckets:
            return self._error(request, 409, "You already created this bucket")
        private = body.get("visibility", "public") != "public"
        self.buckets[bucket_id] = Bucket(bucket_id=bucket_id, private=private, created_at=_now())
        return self._answer(request, web.json_response(
            {"url": f"{self.cas.base_url}/buckets/{bucket_id}", "name": bucket_id, "id": bucket_id}))

    async def _info(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        return self._answer(request, web.json_response({
            "id": bucket.bucket_id, "private": bucket.private, "createdAt": bucket.created_at,
            "size": sum(f.size for f in bucket.files.values()), "totalFiles": len(bucket.files)}))

    async def _delete(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        del self.buckets[bucket.bucket_id]
        return self._answer(request, web.Response(status=200))

    async def _token(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        return self._answer(request, token_answer(self.cas, request.match_info["scope"],
                                                  int(time.time()) + TOKEN_LIFETIME_S))

    async def _batch(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        lines = [json.loads(line) for line in (await request.text()).splitlines() if line.strip()]
        failed = [f for f in (self._apply(bucket, op) for op in lines) if f is not None]
        status = 422 if lines and len(failed) == len(lines) else 200
        return self._answer(request, web.json_response({"failed": failed}, status=status))

    def _apply(self, bucket: Bucket, op: dict[str, Any]) -> dict[str, str] | None:
        """One NDJSON line applied, or what failed."""
        path = str(op.get("path", ""))
        if op.get("type") == "deleteFile":
            bucket.files.pop(path, None)
            return None
        if op.get("type") not in ("addFile", "copyFile"):
            return {"path": path, "error": f"unknown operation {op.get('type')!r}"}
        size = self.cas.file_size(str(op.get("xetHash")))
        if size is None:
            return {"path": path, "error": "xetHash not found in storage"}
        mtime = int(op.get("mtime") or time.time() * 1000)
        bucket.files[path] = BucketFile(xet_hash=str(op["xetHash"]), size=size, mtime_ms=mtime, uploaded_at=_now())
        return None

    async def _tree(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        prefix = unquote(request.match_info.get("prefix", "")).strip("/")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        under = {p: f for p, f in bucket.files.items() if not prefix or p == prefix or p.startswith(prefix + "/")}
        entries: dict[str, dict[str, Any]] = {}
        for path, file in sorted(under.items()):
            rest = path[len(prefix) + 1:] if prefix else path
            if recursive or "/" not in rest:
                entries[path] = file.entry(path)
                continue
            folder = (prefix + "/" if prefix else "") + rest.split("/", 1)[0]
            entries.setdefault(folder, {"type": "directory", "path": folder, "uploadedAt": file.uploaded_at})
        if recursive:
            for path in list(entries):
                parts = path.split("/")[:-1]
                for i in range(len(prefix.split("/")) if prefix else 0, len(parts)):
                    folder = "/".join(parts[:i + 1])
                    entries.setdefault(folder, {"type": "directory", "path": folder})
        return self._answer(request, web.json_response([entries[k] for k in sorted(entries)]))

    async def _paths_info(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        paths = (await request.json()).get("paths", [])
        return self._answer(request, web.json_response(
            [bucket.files[p].entry(p) for p in paths if p in bucket.files]))

    async def _resolve(self, request: web.Request) -> web.Response:
        bucket, refusal = self._find(request)
        if bucket is None:
            return refusal  # type: ignore[return-value]
        path = unquote(request.match_info["path"])
        file = bucket.files.get(path)
        if file is None:
            return self._error(request, 404, "Entry not found")
        refresh = f"{self.cas.base_url}/api/buckets/{bucket.bucket_id}/xet-read-token"
        return self._answer(request, web.Response(status=200, headers={
            "X-Xet-Hash": file.xet_hash, "X-Linked-Size": str(file.size), "Content-Length": str(file.size),
            "Link": f'<{refresh}>; rel="xet-auth"', "ETag": f'"{file.xet_hash}"'}))
