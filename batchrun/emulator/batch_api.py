"""OpenAI's batch API on the router's port: ``/v1/files`` and ``/v1/batches``, in OpenAI's shapes.

A batch's life is a function of the time since its creation (computed whenever it is read, so no
background task is needed): ``validating`` for ``validating_s``, then ``failed`` (with ``errors``) if
the input file is bad, else ``in_progress`` while its requests finish evenly over ``completion_s``
(``request_counts`` grow), ``finalizing`` for ``finalizing_s``, and ``completed`` with an output file
and, when some requests failed, an error file. ``expire_after_s`` cuts that short: ``expired``, the
output holds what finished and the error file a ``batch_expired`` line for each of the rest. A cancel
makes it ``cancelling`` for ``cancel_s``, then ``cancelled`` with what finished before the cancel.
Answers come from the router's generator (:meth:`Router.offline_answer`), billed at the batch price.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import BodyPartReader, web

from batchrun.emulator.openai_errors import openai_error
from batchrun.emulator.router_config import BatchConfig

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_TERMINAL = ("failed", "completed", "expired", "cancelled")


class Answerer(Protocol):
    """What the batch API needs of the router it lives on: its auth, its generator and its providers' counters."""

    providers: dict[str, Any]

    def authorized(self, request: web.Request) -> bool: ...

    def unauthorized(self) -> web.Response: ...

    async def offline_answer(self, body: dict, route: str) -> tuple[int, dict[str, Any], Any]: ...


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


@dataclass
class Outcome:
    """One request's result, ready before it is due: at ``due`` seconds after creation it counts as done."""

    custom_id: str
    due: float
    status_code: int
    body: dict[str, Any]
    tokens: tuple[int, int]  # (prompt, completion) billed when it is delivered
    cost_usd: float
    provider: str | None = None


@dataclass
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict | None
    created: float  # loop time
    created_at: int  # wall clock
    errors: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    status: str = "validating"
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, finalizing_at, completed_at, ...
    cancelled_at_s: float | None = None  # loop time of the cancel
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    done_ok: int = 0
    done_failed: int = 0
    billed: dict[str, Any] = field(default_factory=dict)


class BatchApi:
    """Files and batches, kept in memory, for one router."""

    def __init__(self, router: Answerer, config: BatchConfig) -> None:
        self.router = router
        self.config = config
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self._ids = itertools.count(1)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}", self._file)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_delete("/v1/files/{file_id}", self._delete)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._cancel)

    def stats(self) -> dict[str, Any]:
        """Per batch: status, request counts and the tokens and cost billed (at the batch price)."""
        now = asyncio.get_running_loop().time()
        out = {}
        for batch in self.batches.values():
            self._advance(batch, now)
            out[batch.id] = {"status": batch.status, "request_counts": self._counts(batch), **batch.billed}
        return out

    def _new_id(self, prefix: str) -> str:
        """``file-...`` or ``batch_...``, as OpenAI spells them."""
        number = next(self._ids)
        digest = hashlib.blake2b(f"{prefix}{number}".encode(), digest_size=6).hexdigest()
        return f"{prefix}{'-' if prefix == 'file' else '_'}{digest}{number:04d}"

    # ----- files

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        if not self.router.authorized(request):
            return self.router.unauthorized()
        if not request.content_type.startswith("multipart/"):
            return openai_error(400, "Expected a multipart/form-data body with `purpose` and `file`.",
                                "invalid_request_error").to_response()
        purpose, filename, data = None, "upload.jsonl", b""
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename or filename
                data = await part.read(decode=False)
        if purpose is None:
            return openai_error(400, "Missing required parameter: 'purpose'.", "invalid_request_error",
                                param="purpose").to_response()
        if not data:
            return openai_error(400, "Missing required parameter: 'file'.", "invalid_request_error",
                                param="file").to_response()
        if len(data) > self.config.max_file_bytes:
            return openai_error(400, f"File is too large: {len(data)} bytes, the limit is "
                                f"{self.config.max_file_bytes}.", "invalid_request_error", param="file").to_response()
        stored = StoredFile(self._new_id("file"), filename, purpose, bytes(data), int(time.time()))
        self.files[stored.id] = stored
        return web.json_response(stored.to_dict())

    def _find_file(self, request: web.Request) -> StoredFile | web.Response:
        if not self.router.authorized(request):
            return self.router.unauthorized()
        file_id = request.match_info["file_id"]
        stored = self.files.get(file_id)
        if stored is None:
            return openai_error(404, f"No such File object: {file_id}", "invalid_request_error",
                                param="id").to_response()
        return stored

    async def _file(self, request: web.Request) -> web.StreamResponse:
        found = self._find_file(request)
        return found if isinstance(found, web.Response) else web.json_response(found.to_dict())

    async def _content(self, request: web.Request) -> web.StreamResponse:
        found = self._find_file(request)
        if isinstance(found, web.Response):
            return found
        return web.Response(body=found.data, content_type="application/octet-stream")

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        found = self._find_file(request)
        if isinstance(found, web.Response):
            return found
        del self.files[found.id]
        return web.json_response({"id": found.id, "object": "file", "deleted": True})

    # ----- batches

    async def _create(self, request: web.Request) -> web.StreamResponse:
        if not self.router.authorized(request):
            return self.router.unauthorized()
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return openai_error(400, "We could not parse the JSON body of your request.",
                                "invalid_request_error").to_response()
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(payload.get(key), str):
                return openai_error(400, f"Missing required parameter: '{key}'.", "invalid_request_error",
                                    param=key).to_response()
        if payload["endpoint"] not in ENDPOINTS:
            return openai_error(400, f"Invalid value for 'endpoint': {payload['endpoint']!r}; supported: "
                                f"{', '.join(ENDPOINTS)}.", "invalid_request_error", param="endpoint").to_response()
        if payload["completion_window"] != "24h":
            return openai_error(400, "Invalid value for 'completion_window': only '24h' is supported.",
                                "invalid_request_error", param="completion_window").to_response()
        source = self.files.get(payload["input_file_id"])
        if source is None:
            return openai_error(404, f"No such File object: {payload['input_file_id']}", "invalid_request_error",
                                param="input_file_id").to_response()
        batch = Batch(id=self._new_id("batch"), input_file_id=source.id, endpoint=payload["endpoint"],
                      completion_window="24h", metadata=payload.get("metadata"),
                      created=asyncio.get_running_loop().time(), created_at=int(time.time()))
        if len(self.batches) < self.config.fail_first:
            batch.errors.append(_error("invalid_file", "The batch input file could not be validated.", None))
        else:
            await self._validate_and_answer(batch, source.data)
        self.batches[batch.id] = batch
        return web.json_response(self._object(batch))

    async def _validate_and_answer(self, batch: Batch, data: bytes) -> None:
        """Check the input file as OpenAI does (errors: the batch will fail) and compute every answer now."""
        requests: list[tuple[str, dict]] = []
        seen: set[str] = set()
        errors = batch.errors
        lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
        if len(lines) > self.config.max_requests:
            errors.append(_error("too_many_requests", f"The batch input file has {len(lines)} requests, more than "
                                 f"the limit of {self.config.max_requests} per batch.", None))
        for number, line in enumerate(lines, start=1):
            if errors and errors[0]["code"] == "too_many_requests":
                break
            try:
                item = json.loads(line)
            except ValueError:
                errors.append(_error("invalid_json_line", "This line is not parseable as valid JSON.", number))
                continue
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) \
                    or not isinstance(item.get("body"), dict):
                errors.append(_error("invalid_request", "Each line needs a string `custom_id`, `method`, `url` "
                                     "and an object `body`.", number))
                continue
            if item.get("method") != "POST":
                errors.append(_error("invalid_method", "The method must be POST.", number, "method"))
                continue
            if item.get("url") != batch.endpoint:
                errors.append(_error("invalid_url", f"The URL provided for this request does not match the "
                                     f"batch endpoint {batch.endpoint}.", number, "url"))
                continue
            if item["custom_id"] in seen:
                errors.append(_error("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                     "another request. The custom_id parameter must be unique for each request "
                                     "in a batch.", number, "custom_id"))
                continue
            seen.add(item["custom_id"])
            requests.append((item["custom_id"], item["body"]))
        batch.total = 0 if errors else len(requests)
        if errors:
            return
        # Requests finish in an order other than the input's: by a hash of their custom_id.
        order = sorted(range(len(requests)), key=lambda i: hashlib.blake2b(
            f"{self.config.seed}:{requests[i][0]}".encode(), digest_size=8).digest())
        cfg = self.config
        for rank, index in enumerate(order, start=1):
            if rank % 500 == 0:
                await asyncio.sleep(0)  # a 50,000-request file takes seconds: let the other routes in meanwhile
            custom_id, body = requests[index]
            due = cfg.validating_s + cfg.completion_s * rank / len(requests)
            if _roll(cfg.seed, custom_id) < cfg.error_rate:
                batch.outcomes.append(Outcome(custom_id, due, 500, {"error": {
                    "message": "The server had an error processing your request.", "type": "server_error",
                    "param": None, "code": None}}, (0, 0), 0.0, None))
                continue
            status, answer, provider = await self.router.offline_answer(body, _ROUTES[batch.endpoint])
            usage = answer.get("usage", {}) if status == 200 else {}
            cost = 0.0
            if status == 200 and provider is not None:
                cost = cfg.price_factor * (usage["prompt_tokens"] * provider.config.price_input
                                           + usage["completion_tokens"] * provider.config.price_output) / 1e6
            batch.outcomes.append(Outcome(custom_id, due, status, answer,
                                          (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)), cost,
                                          provider.config.name if provider is not None else None))

    def _advance(self, batch: Batch, now: float) -> None:
        """Bring ``batch`` to the state its age gives it."""
        if batch.status in _TERMINAL:
            return
        cfg = self.config
        age = now - batch.created
        if batch.status == "cancelling":
            assert batch.cancelled_at_s is not None
            if now >= batch.cancelled_at_s + cfg.cancel_s:
                self._finish(batch, "cancelled", batch.cancelled_at_s - batch.created, age)
            return
        if age < cfg.validating_s:
            return
        if batch.errors:
            batch.status = "failed"
            batch.stamps["failed_at"] = self._wall(batch, cfg.validating_s)
            return
        batch.status = "in_progress"
        batch.stamps.setdefault("in_progress_at", self._wall(batch, cfg.validating_s))
        batch.stamps.setdefault("expires_at", batch.created_at + 24 * 3600)
        end = cfg.validating_s + cfg.completion_s
        if cfg.expire_after_s is not None and age >= cfg.expire_after_s and cfg.expire_after_s < end:
            self._finish(batch, "expired", cfg.expire_after_s, age)
            return
        self._count(batch, min(age, end))
        if age >= end:
            batch.status = "finalizing"
            batch.stamps.setdefault("finalizing_at", self._wall(batch, end))
            if age >= end + cfg.finalizing_s:
                self._finish(batch, "completed", end, age)

    def _count(self, batch: Batch, upto: float) -> None:
        done = [o for o in batch.outcomes if o.due <= upto]
        batch.done_ok = sum(1 for o in done if o.status_code == 200)
        batch.done_failed = len(done) - batch.done_ok

    def _finish(self, batch: Batch, status: str, upto: float, age: float) -> None:
        """Write the output and error files of what finished by ``upto`` seconds; the rest expire or are dropped."""
        self._count(batch, upto)
        done = [o for o in batch.outcomes if o.due <= upto]
        output: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for outcome in done:
            line = {"id": _request_id(batch, outcome),
                    "custom_id": outcome.custom_id,
                    "response": {"status_code": outcome.status_code,
                                 "request_id": hashlib.blake2b(outcome.custom_id.encode(), digest_size=8).hexdigest(),
                                 "body": outcome.body},
                    "error": None}
            (output if outcome.status_code == 200 else failed).append(line)
        if status == "expired":
            failed.extend({"id": _request_id(batch, outcome), "custom_id": outcome.custom_id, "response": None,
                           "error": {"code": "batch_expired", "message": "This request could not be executed "
                                     "before the completion window expired."}}
                          for outcome in batch.outcomes if outcome.due > upto)
            batch.done_failed += sum(1 for o in batch.outcomes if o.due > upto)
        if output:
            batch.output_file_id = self._store(batch, "output", output)
        if failed:
            batch.error_file_id = self._store(batch, "error", failed)
        self._bill(batch, done)
        batch.status = status
        batch.stamps[f"{status}_at"] = self._wall(batch, age)

    def _bill(self, batch: Batch, done: list[Outcome]) -> None:
        prompt = sum(o.tokens[0] for o in done)
        completion = sum(o.tokens[1] for o in done)
        cost = sum(o.cost_usd for o in done)
        batch.billed = {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": round(cost, 9)}
        for outcome in done:
            if outcome.status_code != 200:
                continue
            provider = self.router.providers.get(outcome.provider or "")
            if provider is not None:
                provider.prompt_tokens += outcome.tokens[0]
                provider.completion_tokens += outcome.tokens[1]
                provider.cost_usd += outcome.cost_usd

    def _store(self, batch: Batch, kind: str, lines: list[dict]) -> str:
        data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
        stored = StoredFile(self._new_id("file"), f"{batch.id}_{kind}.jsonl", f"batch_{kind}", data, int(time.time()))
        self.files[stored.id] = stored
        return stored.id

    def _wall(self, batch: Batch, offset_s: float) -> int:
        return int(batch.created_at + offset_s)

    def _counts(self, batch: Batch) -> dict[str, int]:
        return {"total": batch.total, "completed": batch.done_ok, "failed": batch.done_failed}

    def _object(self, batch: Batch) -> dict[str, Any]:
        stamps = batch.stamps
        return {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.errors} if batch.errors and batch.status == "failed" else None,
            "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
            "status": batch.status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            **{key: stamps.get(key) for key in ("in_progress_at", "expires_at", "finalizing_at", "completed_at",
                                                "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
            "request_counts": self._counts(batch), "metadata": batch.metadata,
        }

    def _find_batch(self, request: web.Request) -> Batch | web.Response:
        if not self.router.authorized(request):
            return self.router.unauthorized()
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return openai_error(404, f"No batch found with id '{request.match_info['batch_id']}'.",
                                "invalid_request_error", param="batch_id").to_response()
        self._advance(batch, asyncio.get_running_loop().time())
        return batch

    async def _retrieve(self, request: web.Request) -> web.StreamResponse:
        found = self._find_batch(request)
        return found if isinstance(found, web.Response) else web.json_response(self._object(found))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        found = self._find_batch(request)
        if isinstance(found, web.Response):
            return found
        if found.status not in ("validating", "in_progress", "finalizing"):
            return openai_error(409, f"Cannot cancel a batch with status '{found.status}'.",
                                "invalid_request_error").to_response()
        now = asyncio.get_running_loop().time()
        found.status = "cancelling"
        found.cancelled_at_s = now
        found.stamps["cancelling_at"] = self._wall(found, now - found.created)
        self._advance(found, now)
        return web.json_response(self._object(found))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if not self.router.authorized(request):
            return self.router.unauthorized()
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return openai_error(400, "Invalid 'limit': expected an integer from 1 to 100.", "invalid_request_error",
                                param="limit").to_response()
        now = asyncio.get_running_loop().time()
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        for batch in page:
            self._advance(batch, now)
        data = [self._object(b) for b in page]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None,
                                  "has_more": len(newest_first) > limit})


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _roll(seed: int, custom_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}:error:{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _request_id(batch: Batch, outcome: Outcome) -> str:
    return f"batch_req_{hashlib.blake2b(f'{batch.id}:{outcome.custom_id}'.encode(), digest_size=12).hexdigest()}"
