"""``GET /info`` is asked in one way (transport.read_info), and a run asks it once per server at its start.

The url endpoint's check reads it; packing's server limits and provenance's first reading reuse that
answer; only the revision watch asks again, on its own schedule (every interval and at the end).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobkit import read_rows, run, write_spec, write_topics

from batchrun.packing import ServerLimits
from batchrun.transport import MockTransport, Request, Response, Unreached, read_info, use_transport

JSON = {"Content-Type": "application/json"}
TGI_INFO = {"model_id": "org/model", "model_sha": "abc", "version": "3.3.6"}


def _ask(handler: Any, url: str = "https://api.example.com/v1/chat/completions") -> Any:
    async def main() -> Any:
        with use_transport(MockTransport(handler)):
            return await read_info(url)

    return asyncio.run(main())


# ---------------------------------------------------------------------------------------- read_info


def test_read_info_asks_the_servers_root_and_answers_the_parsed_document() -> None:
    asked: list[Request] = []

    def handler(request: Request) -> Response:
        asked.append(request)
        return Response(200, JSON, json.dumps(TGI_INFO).encode())

    answer = _ask(handler)
    assert answer.status == 200 and answer.document == TGI_INFO and answer.reason is None
    assert [r.url for r in asked] == ["https://api.example.com/info"]
    assert asked[0].timeout == 10.0 and asked[0].max_bytes == 2**20  # facts' CHECK_TIMEOUT_S and answer cap


@pytest.mark.parametrize(("answer", "status", "reason"), [
    (Response(404, {}, b"Not Found"), 404, "HTTP 404 on /info"),
    (Response(200, {}, b"<html>a proxy</html>"), 200, "/info answered something other than a JSON object"),
    (Response(200, JSON, b"[1, 2]"), 200, "/info answered something other than a JSON object"),
    (Response(200, JSON, b"\xff\xfe"), 200, "/info answered something other than a JSON object"),
])
def test_read_info_says_why_an_answer_has_no_document(answer: Response, status: int, reason: str) -> None:
    got = _ask(lambda request: answer)
    assert (got.status, got.document, got.reason) == (status, None, reason)
    assert got.body == answer.body


def test_read_info_without_an_answer_names_the_transports_error_and_does_not_raise() -> None:
    def handler(request: Request) -> Response:
        raise Unreached("connection refused")

    got = _ask(handler)
    assert got.status is None and got.document is None and got.reason == "Unreached: connection refused"


def test_the_tightest_limits_are_the_lowest_each_server_says() -> None:
    limits = ServerLimits.tightest([
        ServerLimits(32, 16384, None), ServerLimits(12, None, 512), ServerLimits(),
    ])
    assert limits == ServerLimits(12, 16384, 512)
    assert ServerLimits.tightest([]) == ServerLimits()


# ---------------------------------------------------------------------------------------- a whole job


class Server:
    """Counts every request; answers ``/info`` with ``info`` and the data plane as TGI or TEI would."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.requests: list[Request] = []

    def info_asks(self) -> int:
        return sum(1 for r in self.requests if r.method == "GET" and r.url.endswith("/info"))

    def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        if request.method == "GET" and request.url.endswith("/info"):
            return Response(200, JSON, json.dumps(self.info).encode())
        body = json.loads(request.body or b"{}")
        if request.url.endswith("/embed"):
            limit = self.info["max_client_batch_size"]
            if len(body["inputs"]) > limit:  # TEI's Validation error (422 from 1.9.0)
                message = f"batch size {len(body['inputs'])} > maximum allowed batch size {limit}"
                return Response(422, JSON, json.dumps({"error": message, "error_type": "Validation"}).encode())
            return Response(200, JSON, json.dumps([[0.5, 0.25] for _ in body["inputs"]]).encode())
        doc = {"object": "chat.completion", "id": "", "created": 1, "model": "tgi",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        return Response(200, JSON, json.dumps(doc).encode())


def test_a_url_job_asks_info_once_at_its_start_then_only_the_revision_watch_asks(tmp_path: Path) -> None:
    server = Server(TGI_INFO)
    spec = write_spec(tmp_path, endpoint={"url": "https://api.example.com"},
                      input_path=write_topics(tmp_path / "in.parquet", 7))
    outcome, lines = run(spec, transport=MockTransport(server), revision_poll_s=3600.0)
    assert outcome.exit_code == 0, lines
    gets = [i for i, r in enumerate(server.requests) if r.method == "GET"]
    posts = [i for i, r in enumerate(server.requests) if r.method == "POST"]
    assert len(posts) == 7
    # The check's one before anything is sent, and the watch's own at the end (its interval never came).
    assert len(gets) == 2 and gets[0] < min(posts) and gets[1] > max(posts)
    assert outcome.summary["provenance"]["revision"] == "abc"


def _texts(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"id": [f"row-{i:05d}" for i in range(n)],
                             "text": [f"passage {i}" for i in range(n)]}), path)
    return path


def _embedding_job(tmp_path: Path, endpoint: Any, n: int) -> Path:
    return write_spec(tmp_path, endpoint=endpoint, input_path=_texts(tmp_path / "in.parquet", n), name="emb",
                      task="feature-extraction", prompt={"column": "text", "template": None, "system": None},
                      parameters={}, output={"shard_rows": 5000})


def _embed_sizes(server: Server) -> list[int]:
    return [len(json.loads(r.body or b"{}")["inputs"]) for r in server.requests if r.url.endswith("/embed")]


def test_a_packing_url_job_takes_the_servers_limits_from_the_checks_info(tmp_path: Path) -> None:
    server = Server({"model_id": "BAAI/bge", "max_client_batch_size": 12, "max_concurrent_requests": 512})
    outcome, lines = run(_embedding_job(tmp_path, {"url": "https://api.example.com"}, 50),
                         transport=MockTransport(server))
    assert outcome.exit_code == 0, lines
    assert server.info_asks() == 1  # the check's, reused for the limits (no revision: no watch)
    assert _embed_sizes(server) and max(_embed_sizes(server)) == 12 and sum(_embed_sizes(server)) == 50
    assert len(read_rows(tmp_path / "out" / "emb" / "data")) == 50


def test_with_several_tei_endpoints_packs_fit_the_tightest_ones_limit_and_none_is_refused(tmp_path: Path) -> None:
    roomy = Server({"model_id": "BAAI/bge", "max_client_batch_size": 32, "max_concurrent_requests": 512})
    tight = Server({"model_id": "BAAI/bge", "max_client_batch_size": 5, "max_concurrent_requests": 512})

    def handler(request: Request) -> Response:
        return (tight if request.url.startswith("https://tight.example.com") else roomy)(request)

    # The roomy one is listed, and ready, first: its limit alone would be refused by the other.
    endpoint = [{"url": "https://roomy.example.com"}, {"url": "https://tight.example.com"}]
    outcome, lines = run(_embedding_job(tmp_path, endpoint, 60), transport=MockTransport(handler))
    assert outcome.exit_code == 0, lines
    assert roomy.info_asks() == 1 and tight.info_asks() == 1  # each endpoint's check, and nothing more
    sizes = _embed_sizes(roomy) + _embed_sizes(tight)
    assert sum(sizes) == 60 and max(sizes) == 5  # none over the tight one's limit, so none refused and split
    assert sorted(row["id"] for row in read_rows(tmp_path / "out" / "emb" / "data")) == [
        f"row-{i:05d}" for i in range(60)]
