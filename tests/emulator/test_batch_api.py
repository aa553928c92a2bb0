"""The emulator plays OpenAI's batch API on the router's port: files, batches, their life cycle, expiry,
cancel, per-request errors and validation, with the same answers as the online route."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from emulator_helpers import AUTH, TOKEN, run

from batchrun.emulator import BatchConfig, Emulator, EmulatorConfig, ProviderConfig, RouterConfig

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
CHAT = "/v1/chat/completions"


def batch_config(**batch) -> EmulatorConfig:
    provider = ProviderConfig(name="together", models=(LLAMA,), price_input=1.0, price_output=2.0, completions=True)
    return EmulatorConfig(token=TOKEN, endpoints=[], router=RouterConfig(providers=(provider,),
                                                                         batch=BatchConfig(**batch)))


def request_line(custom_id: str, content: str, *, url: str = CHAT, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": LLAMA, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **body}}


def jsonl(lines: list) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


class Api:
    """Plain aiohttp calls to the emulator's OpenAI-compatible API."""

    def __init__(self, session: aiohttp.ClientSession, emu: Emulator) -> None:
        self.session = session
        self.url = emu.router_url

    async def call(self, method: str, path: str, **kwargs) -> tuple[int, dict]:
        async with self.session.request(method, self.url + path, headers=AUTH, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def upload(self, data: bytes, purpose: str = "batch") -> tuple[int, dict]:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", data, filename="requests.jsonl", content_type="application/jsonl")
        return await self.call("POST", "/files", data=form)

    async def content(self, file_id: str) -> list[dict]:
        async with self.session.get(f"{self.url}/files/{file_id}/content", headers=AUTH) as response:
            assert response.status == 200
            return [json.loads(line) for line in (await response.text()).splitlines()]

    async def submit(self, lines: list, **extra) -> dict:
        status, uploaded = await self.upload(jsonl(lines))
        assert status == 200, uploaded
        status, batch = await self.call("POST", "/batches", json={"input_file_id": uploaded["id"], "endpoint": CHAT,
                                                                 "completion_window": "24h", **extra})
        assert status == 200, batch
        return batch

    async def until(self, batch_id: str, *statuses: str, limit_s: float = 10.0) -> tuple[dict, list[dict]]:
        """Poll the batch until its status is one of ``statuses``; returns it and every version seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        seen = []
        while True:
            status, batch = await self.call("GET", f"/batches/{batch_id}")
            assert status == 200
            seen.append(batch)
            if batch["status"] in statuses:
                return batch, seen
            assert loop.time() < deadline, f"batch {batch_id} still {batch['status']} after {limit_s} s"
            await asyncio.sleep(0.01)


def test_files_upload_read_and_delete_in_openais_shapes():
    async def body():
        async with Emulator(batch_config()) as emu, aiohttp.ClientSession() as session:
            api = Api(session, emu)
            data = jsonl([request_line("a", "hello")])
            status, uploaded = await api.upload(data)
            assert status == 200
            assert uploaded["object"] == "file" and uploaded["id"].startswith("file-")
            assert uploaded["bytes"] == len(data) and uploaded["purpose"] == "batch"
            assert uploaded["filename"] == "requests.jsonl" and isinstance(uploaded["created_at"], int)
            assert (await api.call("GET", f"/files/{uploaded['id']}")) == (200, uploaded)
            async with session.get(f"{api.url}/files/{uploaded['id']}/content", headers=AUTH) as response:
                assert await response.read() == data
            assert await api.call("DELETE", f"/files/{uploaded['id']}") == (
                200, {"id": uploaded["id"], "object": "file", "deleted": True})
            status, missing = await api.call("GET", f"/files/{uploaded['id']}")
            assert status == 404 and missing["error"]["type"] == "invalid_request_error"
            async with session.get(f"{api.url}/files/{uploaded['id']}") as response:
                assert response.status == 401  # no token
    run(body())


def test_a_file_over_the_byte_limit_is_refused_at_upload():
    async def body():
        async with Emulator(batch_config(max_file_bytes=100)) as emu, aiohttp.ClientSession() as session:
            status, answer = await Api(session, emu).upload(b"x" * 101)
            assert status == 400 and "too large" in answer["error"]["message"]
    run(body())


def test_a_batch_goes_from_validating_through_growing_counts_to_completed_with_the_online_answers():
    async def body():
        async with Emulator(batch_config(validating_s=0.05, completion_s=0.4, finalizing_s=0.05)) as emu, \
                aiohttp.ClientSession() as session:
            api = Api(session, emu)
            lines = [request_line(f"row-{i}", f"question number {i}", seed=i) for i in range(8)]
            created = await api.submit(lines, metadata={"job": "nightly"})
            assert created["object"] == "batch" and created["id"].startswith("batch_")
            assert created["status"] == "validating" and created["endpoint"] == CHAT
            assert created["completion_window"] == "24h" and created["metadata"] == {"job": "nightly"}
            assert created["output_file_id"] is None and created["errors"] is None
            done, seen = await api.until(created["id"], "completed")
            statuses = [b["status"] for b in seen]
            assert "in_progress" in statuses and statuses.index("in_progress") < statuses.index("completed")
            completed_counts = [b["request_counts"]["completed"] for b in seen if b["status"] == "in_progress"]
            assert completed_counts == sorted(completed_counts) and len(set(completed_counts)) > 1
            assert done["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
            assert done["error_file_id"] is None
            for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at"):
                assert isinstance(done[stamp], int), stamp
            output = await api.content(done["output_file_id"])
            assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
            assert [o["custom_id"] for o in output] != [line["custom_id"] for line in lines]  # not the input order
            for line in output:
                assert line["id"].startswith("batch_req_") and line["error"] is None
                assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
            # Switching modes changes nothing: the online answer of each request is the same text.
            by_id = {o["custom_id"]: o["response"]["body"] for o in output}
            for line in lines[:3]:
                async with session.post(api.url + "/chat/completions", headers=AUTH, json=line["body"]) as r:
                    online = await r.json()
                batch_body = by_id[line["custom_id"]]
                assert batch_body["choices"][0]["message"] == online["choices"][0]["message"]
                assert batch_body["usage"] == online["usage"]
    run(body())


def test_batch_work_is_billed_at_half_the_online_price():
    async def body():
        async with Emulator(batch_config(completion_s=0.05)) as emu, aiohttp.ClientSession() as session:
            api = Api(session, emu)
            lines = [request_line(f"r{i}", f"bill me {i}") for i in range(4)]
            done, _ = await api.until((await api.submit(lines))["id"], "completed")
            output = await api.content(done["output_file_id"])
            prompt = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
            completion = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
            billed = emu.router_stats()["batches"][done["id"]]
            assert billed["prompt_tokens"] == prompt and billed["completion_tokens"] == completion
            assert billed["cost_usd"] == pytest.approx(0.5 * (prompt * 1.0 + completion * 2.0) / 1e6)
            assert emu.router_stats()["providers"]["together"]["cost_usd"] == pytest.approx(billed["cost_usd"])
    run(body())


def test_an_expired_batch_returns_what_completed_and_batch_expired_errors_for_the_rest():
    async def body():
        async with Emulator(batch_config(validating_s=0.0, completion_s=10.0, expire_after_s=0.3)) as emu, \
                aiohttp.ClientSession() as session:
            api = Api(session, emu)
            lines = [request_line(f"r{i}", f"slow {i}") for i in range(100)]
            expired, _ = await api.until((await api.submit(lines))["id"], "expired")
            counts = expired["request_counts"]
            assert counts["total"] == 100 and 0 < counts["completed"] < 100
            assert counts["completed"] + counts["failed"] == 100
            assert isinstance(expired["expired_at"], int)
            output = await api.content(expired["output_file_id"])
            errors = await api.content(expired["error_file_id"])
            assert len(output) == counts["completed"] and len(errors) == counts["failed"]
            assert {o["custom_id"] for o in output}.isdisjoint(e["custom_id"] for e in errors)
            for line in errors:
                assert line["response"] is None and line["error"]["code"] == "batch_expired"
    run(body())


def test_a_cancelled_batch_goes_through_cancelling_and_keeps_what_finished_before_the_cancel():
    async def body():
        async with Emulator(batch_config(validating_s=0.0, completion_s=10.0, cancel_s=0.1)) as emu, \
                aiohttp.ClientSession() as session:
            api = Api(session, emu)
            batch = await api.submit([request_line(f"r{i}", f"cancel {i}") for i in range(100)])
            running, _ = await api.until(batch["id"], "in_progress")
            await asyncio.sleep(0.2)
            status, cancelling = await api.call("POST", f"/batches/{batch['id']}/cancel")
            assert status == 200 and cancelling["status"] == "cancelling"
            assert isinstance(cancelling["cancelling_at"], int)
            cancelled, _ = await api.until(batch["id"], "cancelled")
            done = cancelled["request_counts"]["completed"]
            assert 0 < done < 100 and isinstance(cancelled["cancelled_at"], int)
            assert len(await api.content(cancelled["output_file_id"])) == done
            status, again = await api.call("POST", f"/batches/{batch['id']}/cancel")
            assert status == 409 and running["id"] == batch["id"]
    run(body())


def test_per_request_errors_go_to_the_error_file_and_count_as_failed():
    async def body():
        async with Emulator(batch_config(completion_s=0.05, error_rate=0.3)) as emu, \
                aiohttp.ClientSession() as session:
            api = Api(session, emu)
            lines = [request_line(f"r{i}", f"maybe {i}") for i in range(40)]
            lines.append(request_line("unknown-model", "x") | {"body": {"model": "nobody/nothing", "messages": []}})
            done, _ = await api.until((await api.submit(lines))["id"], "completed")
            counts = done["request_counts"]
            assert counts["total"] == 41 and counts["failed"] >= 2 and counts["completed"] + counts["failed"] == 41
            errors = await api.content(done["error_file_id"])
            assert len(errors) == counts["failed"]
            assert len(await api.content(done["output_file_id"])) == counts["completed"]
            codes = {e["custom_id"]: e["response"]["status_code"] for e in errors}
            assert codes["unknown-model"] == 404
            assert {code for cid, code in codes.items() if cid != "unknown-model"} == {500}
            for line in errors:
                assert line["error"] is None and "error" in line["response"]["body"]
    run(body())


@pytest.mark.parametrize(("lines", "code"), [
    ([request_line("same", "a"), request_line("same", "b")], "duplicate_custom_id"),
    ([request_line("a", "a"), "{not json"], "invalid_json_line"),
    ([request_line("a", "a", url="/v1/completions")], "invalid_url"),
    ([request_line(f"r{i}", "a") for i in range(4)], "too_many_requests"),
])
def test_a_bad_input_file_fails_validation_with_errors(lines, code):
    async def body():
        async with Emulator(batch_config(max_requests=3)) as emu, aiohttp.ClientSession() as session:
            api = Api(session, emu)
            failed, _ = await api.until((await api.submit(lines))["id"], "failed")
            assert failed["errors"]["object"] == "list"
            assert [e["code"] for e in failed["errors"]["data"]] == [code]
            error = failed["errors"]["data"][0]
            assert set(error) == {"code", "message", "param", "line"} and error["message"]
            assert failed["output_file_id"] is None and isinstance(failed["failed_at"], int)
            assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    run(body())


def test_batches_are_listed_newest_first_in_pages_with_has_more():
    async def body():
        async with Emulator(batch_config()) as emu, aiohttp.ClientSession() as session:
            api = Api(session, emu)
            ids = [(await api.submit([request_line("a", f"n{i}")]))["id"] for i in range(5)]
            status, first = await api.call("GET", "/batches", params={"limit": "2"})
            assert status == 200 and first["object"] == "list"
            assert [b["id"] for b in first["data"]] == ids[::-1][:2]
            assert first["has_more"] is True and first["first_id"] == ids[4] and first["last_id"] == ids[3]
            _, rest = await api.call("GET", "/batches", params={"limit": "10", "after": first["last_id"]})
            assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
            status, _ = await api.call("GET", "/batches", params={"limit": "0"})
            assert status == 400
    run(body())


def test_a_batch_request_refused_at_creation_names_the_parameter():
    async def body():
        async with Emulator(batch_config()) as emu, aiohttp.ClientSession() as session:
            api = Api(session, emu)
            _, uploaded = await api.upload(jsonl([request_line("a", "a")]))
            for change, param in (({"endpoint": "/v1/embeddings"}, "endpoint"),
                                  ({"completion_window": "1h"}, "completion_window"),
                                  ({"input_file_id": "file-nope"}, "input_file_id")):
                body = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h", **change}
                status, answer = await api.call("POST", "/batches", json=body)
                assert status in (400, 404) and answer["error"]["param"] == param
            status, answer = await api.call("GET", "/batches/batch_nope")
            assert status == 404
    run(body())


def test_fail_first_makes_the_first_batches_fail_validation_and_the_next_ones_run():
    async def body():
        async with Emulator(batch_config(fail_first=1, completion_s=0.05)) as emu, \
                aiohttp.ClientSession() as session:
            api = Api(session, emu)
            failed, _ = await api.until((await api.submit([request_line("a", "x")]))["id"], "failed")
            assert [e["code"] for e in failed["errors"]["data"]] == ["invalid_file"]
            done, _ = await api.until((await api.submit([request_line("a", "x")]))["id"], "completed")
            assert done["request_counts"]["completed"] == 1
    run(body())


def test_a_completions_batch_answers_like_the_online_completions_route():
    async def body():
        async with Emulator(batch_config(completion_s=0.05)) as emu, aiohttp.ClientSession() as session:
            api = Api(session, emu)
            line = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
                    "body": {"model": LLAMA, "prompt": "Once upon a time", "max_tokens": 6}}
            _, uploaded = await api.upload(jsonl([line]))
            _, batch = await api.call("POST", "/batches", json={"input_file_id": uploaded["id"],
                                                                "endpoint": "/v1/completions",
                                                                "completion_window": "24h"})
            done, _ = await api.until(batch["id"], "completed")
            [output] = await api.content(done["output_file_id"])
            status, online = await api.call("POST", "/completions", json=line["body"])
            assert status == 200 and output["response"]["body"]["object"] == "text_completion"
            assert output["response"]["body"]["choices"] == online["choices"]
    run(body())
