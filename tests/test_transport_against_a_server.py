"""The transport against a real server on loopback: what a socket proves (answers capped as they stream, or by
their Content-Length, and read no further). What a MockTransport proves as well (an echoed token scrubbed, a
huge error page judged by its status) is in tests/unit/test_transport.py.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from test_dispatch import ScriptedServer, by_id, dispatcher, ok, rows_of

from batchrun.records import RowFailure, RowResult

# ---------------------------------------------------------------------------------------- answers


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
