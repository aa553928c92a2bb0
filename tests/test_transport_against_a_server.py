"""The transport against a real server on loopback: what a socket proves (an echoed token scrubbed, answers capped as
they stream, a huge error page judged by its status).
"""

from __future__ import annotations

import asyncio
import base64
import urllib.parse

import pytest
from aiohttp import web
from test_dispatch import ScriptedServer, by_id, dispatcher, ok, rows_of

from batchrun.records import RowFailure, RowResult


def forms(secret: str) -> list[str]:
    return [secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe="")]


# ---------------------------------------------------------------------------------------- answers


def test_a_token_the_server_echoes_is_not_stored_in_the_answer() -> None:
    token = "hf_canaryECHO0123456789xyz"

    async def handler(request: web.Request, prompt: str, nth: int) -> web.Response:
        sent = request.headers["Authorization"].removeprefix("Bearer ")
        return ok(f"{prompt}: {' / '.join(forms(sent))}")

    async def main() -> list[RowResult | RowFailure]:
        records: list[RowResult | RowFailure] = []
        async with ScriptedServer(handler) as server:
            await dispatcher(server.url, records, token=token).run(rows_of(["a", "b"]))
            assert server.headers[0]["Authorization"] == f"Bearer {token}"  # loopback gets it
        return records

    records = by_id(asyncio.run(main()))
    for record in records.values():
        assert isinstance(record, RowResult)
        text = record.output["generated_text"]
        assert text.endswith("*** / *** / ***")
        for form in forms(token):
            assert form not in repr(record)


@pytest.mark.parametrize("chunked", [True, False])
def test_an_answer_past_max_answer_bytes_fails_its_row_and_is_read_no_further(chunked: bool) -> None:
    cap = 64 * 1024
    written: list[int] = []

    async def handler(request: web.Request, prompt: str, nth: int) -> web.StreamResponse:
        if prompt == "small":
            return ok("fine")
        if not chunked:  # a Content-Length past the cap: refused before reading
            return web.Response(body=b"x" * (cap * 4), content_type="application/json")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await prepare(response, request)
        sent = 0
        try:
            while sent < 200 * cap:  # endless, as far as the client can tell: it must stop reading first
                await response.write(b"x" * 8192)
                sent += 8192
        except (ConnectionError, RuntimeError):
            pass
        finally:  # also when the server cancels this handler as the client hangs up
            written.append(sent)
        return response

    async def prepare(response: web.StreamResponse, request: web.Request) -> None:
        await response.prepare(request)

    async def main() -> tuple[list[RowResult | RowFailure], int]:
        records: list[RowResult | RowFailure] = []
        async with ScriptedServer(handler) as server:
            await dispatcher(server.url, records, max_answer_bytes=cap, request_timeout_s=30.0).run(
                rows_of(["big", "small"]))
            count = server.count
        return records, count

    records, count = asyncio.run(main())
    outcome = by_id(records)
    big, small = outcome["id-0"], outcome["id-1"]
    assert isinstance(small, RowResult)
    assert isinstance(big, RowFailure) and big.error_type == "answer_too_large"
    assert not big.retryable and big.attempts == 1 and "max_answer_bytes" in big.error
    assert count == 2  # not retried
    if chunked:
        assert written and written[0] < 200 * cap  # the client hung up long before the endless body ended


def test_a_huge_error_page_is_judged_by_its_status() -> None:
    async def handler(request: web.Request, prompt: str, nth: int) -> web.Response:
        if nth == 1:
            return web.Response(status=503, body=b"<html>" + b"x" * 100_000, headers={"Retry-After": "0"})
        return ok("fine")

    async def main() -> list[RowResult | RowFailure]:
        records: list[RowResult | RowFailure] = []
        async with ScriptedServer(handler) as server:
            await dispatcher(server.url, records, max_answer_bytes=1024).run(rows_of(["a"]))
        return records

    [record] = asyncio.run(main())
    assert isinstance(record, RowResult) and record.attempts == 2  # a 503, retried; not answer_too_large
