"""The transport seam (transport.py) and the secrets promises it keeps as a class (reliability.md §4).

- Only transport.py opens HTTP sessions and builds an Authorization header.
- The HF token goes to Hugging Face hosts and loopback only; elsewhere when the spec opts in; never over
  plain http beyond loopback. The spec refuses what would break that, and credentials inside a url.
- A token the server echoes is not stored; an answer past max_answer_bytes is a failure row, read no further.
- A whole job runs through a MockTransport with no socket.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import random
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from jobkit import read_rows, run, write_spec, write_topics

from batchrun.dispatch import DispatchConfig, Dispatcher
from batchrun.endpoints import DataPlane
from batchrun.errors import SpecError, register_secret
from batchrun.records import Row, RowFailure, RowResult
from batchrun.retry import RetryPolicy
from batchrun.spec import DEFAULT_MAX_ANSWER_BYTES, DEFAULT_MAX_IMAGE_ANSWER_BYTES, answer_cap, parse_spec
from batchrun.tasks import build_task
from batchrun.transport import (
    AnswerTooLarge,
    MockTransport,
    Request,
    Response,
    auth_headers,
    token_problem,
    token_sent_to,
    use_transport,
)

PACKAGE = Path(__file__).resolve().parents[2] / "batchrun"
CANARY = "hf_CANARY_transport_0123456789abcdef"


def forms(secret: str) -> list[str]:
    return [secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe="")]


# ---------------------------------------------------------------------------------------- one seam


def test_only_the_transport_opens_sessions_or_builds_an_authorization_header() -> None:
    pattern = re.compile(r"ClientSession\(|TCPConnector\(|[\"']Authorization[\"']\s*[:\]]|Bearer \{")
    offenders = []
    files = [p for p in PACKAGE.rglob("*.py") if "emulator" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 50  # the package, not an empty folder
    for path in files:
        if path.name == "transport.py" and path.parent == PACKAGE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []
    assert pattern.search((PACKAGE / "transport.py").read_text())  # the check does see what it looks for


# ---------------------------------------------------------------------------------------- host policy


@pytest.mark.parametrize(("url", "send_token", "sent"), [
    ("https://xyz.us-east-1.aws.endpoints.huggingface.cloud", False, True),
    ("https://api.endpoints.huggingface.cloud/v2", False, True),
    ("https://huggingface.co", False, True),
    ("https://router.huggingface.co/v1", False, True),
    ("https://hf.co", False, True),
    ("https://me-my-space.hf.space", False, True),
    ("http://127.0.0.1:8080", False, True),
    ("http://127.3.2.1:8080/generate", False, True),
    ("http://localhost:80", False, True),
    ("http://[::1]:8080", False, True),
    ("https://api.example.com", False, False),
    ("https://api.example.com", True, True),
    ("https://huggingface.co.evil.example", False, False),
    ("https://evilhuggingface.co", False, False),
    ("https://hf.space", False, False),
    ("https://endpoints.huggingface.cloud.example.org", False, False),
    ("http://xyz.endpoints.huggingface.cloud", False, False),  # plain http beyond loopback: never
    ("http://api.example.com", True, False),
    ("http://10.0.0.5:8080", True, False),
    ("http://localhost.example.com", True, False),
])
def test_the_token_goes_only_to_hugging_face_hosts_and_loopback(url: str, send_token: bool, sent: bool) -> None:
    assert token_sent_to(url, send_token=send_token) is sent
    assert (token_problem(url, send_token=send_token) is None) is sent
    headers = auth_headers(url, CANARY, send_token=send_token)
    assert headers == ({"Authorization": f"Bearer {CANARY}"} if sent else {})
    assert auth_headers(url, None, send_token=send_token) == {}


# ---------------------------------------------------------------------------------------- a whole job, no socket


def _chat_answer(text: str) -> Response:
    doc = {"object": "chat.completion", "id": "", "created": 1, "model": "tgi",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    return Response(200, {"Content-Type": "application/json"}, json.dumps(doc).encode())


@pytest.mark.parametrize(("url", "gets_token"), [
    ("https://api.example.com", False),
    ("https://xyz.endpoints.huggingface.cloud", True),
])
def test_a_whole_job_runs_through_a_mock_transport_and_the_token_goes_only_where_it_may(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, gets_token: bool,
) -> None:
    monkeypatch.setenv("HF_TOKEN", CANARY)

    def no_socket(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a socket was connected")

    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(socket.socket, "connect_ex", no_socket)
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        if request.method == "GET" and request.url.endswith("/info"):
            return Response(200, {"Content-Type": "application/json"}, b'{"model_id": "org/model", "model_sha": "abc"}')
        assert request.method == "POST" and request.url == url + "/v1/chat/completions"
        prompt = json.loads(request.body or b"{}")["messages"][-1]["content"]
        auth = (request.headers or {}).get("Authorization", "none")
        # A server that echoes what it was sent: the token, raw, base64 and url-encoded, must be stored nowhere.
        sent = auth.removeprefix("Bearer ")
        return _chat_answer(f"{prompt} | {auth} | {' '.join(forms(sent))}")

    spec = write_spec(tmp_path, endpoint={"url": url}, input_path=write_topics(tmp_path / "in.parquet", 7),
                      retries={"max_attempts": 1})
    outcome, lines = run(spec, transport=MockTransport(handler))
    assert outcome.exit_code == 0, lines
    posts = [r for r in seen if r.method == "POST"]
    assert len(posts) == 7 and any(r.url.endswith("/info") for r in seen)
    for request in seen:
        assert ("Authorization" in (request.headers or {})) is gets_token
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert sorted(row["id"] for row in rows) == [f"row-{i:05d}" for i in range(7)]
    if gets_token:
        assert all("***" in row["generated_text"] for row in rows), rows[0]
    texts = [p.read_bytes().decode("latin-1") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    texts += lines
    for text in texts:
        for form in forms(CANARY):
            assert form not in text


def test_a_mock_transport_is_used_by_everything_inside_use_transport() -> None:
    from batchrun.endpoints.url import UrlEndpoint

    calls: list[str] = []

    def handler(request: Request) -> Response:
        calls.append(request.url)
        return Response(200, {}, b'{"model_id": "org/m"}')

    async def main() -> str | None:
        with use_transport(MockTransport(handler)):
            return (await UrlEndpoint("https://api.example.com/v1/chat/completions", token=CANARY).check()).model

    assert asyncio.run(main()) == "org/m"
    assert calls == ["https://api.example.com/info"]


# ---------------------------------------------------------------------------------------- answers


def test_the_mock_transport_caps_answers_too() -> None:
    async def main() -> None:
        transport = MockTransport(lambda request: Response(200, {}, b"x" * 11))
        assert (await transport.send(Request("GET", "http://h/", max_bytes=11))).body == b"x" * 11
        with pytest.raises(AnswerTooLarge):
            await transport.send(Request("GET", "http://h/", max_bytes=10))

    asyncio.run(main())


class Scripted:
    """A TGI-like server played through a MockTransport: ``handler(request, prompt, nth)`` answers each
    request (``nth`` counts the requests for that prompt, 1 for the first); every request's headers are kept."""

    def __init__(self, handler: Callable[[Request, str, int], Response]) -> None:
        self.handler = handler
        self.headers: list[dict[str, str]] = []
        self.by_prompt: collections.Counter[str] = collections.Counter()

    @property
    def count(self) -> int:
        return len(self.headers)

    def __call__(self, request: Request) -> Response:
        self.headers.append(dict(request.headers or {}))
        body = json.loads(request.body or b"{}")
        prompt = body["inputs"] if "inputs" in body else body["messages"][-1]["content"]
        self.by_prompt[prompt] += 1
        return self.handler(request, prompt, self.by_prompt[prompt])


def _tgi_ok(text: str) -> Response:
    doc = [{"generated_text": text, "details": {"finish_reason": "length", "generated_tokens": 3}}]
    return Response(200, {"Content-Type": "application/json", "x-prompt-tokens": "4"}, json.dumps(doc).encode())


def _dispatch(server: Scripted, prompts: list[str], *, token: str | None = None,
              **config: Any) -> dict[Any, RowResult | RowFailure]:
    """Every prompt through a Dispatcher to ``server`` (at a loopback url, so the token goes), by row id."""
    config.setdefault("policy", RetryPolicy(max_attempts=3, backoff_base=0.001, backoff_cap=0.005,
                                            max_retry_after=2.0))
    config.setdefault("max_concurrency", 16)
    config.setdefault("request_timeout_s", 5.0)
    records: list[RowResult | RowFailure] = []

    async def rows() -> AsyncIterator[Row]:
        for i, prompt in enumerate(prompts):
            yield Row(position=i, id=f"id-{i}", columns={"prompt": prompt})

    async def main() -> None:
        with use_transport(MockTransport(server)):
            task = build_task("text-generation", column="prompt", parameters={"max_new_tokens": 8})
            await Dispatcher(plane=DataPlane(url="http://127.0.0.1:9/", token=token), task=task,
                             config=DispatchConfig(**config), on_record=records.append,
                             rng=random.Random(0)).run(rows())

    asyncio.run(main())
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "a row was recorded twice"
    return {r.id: r for r in records}


def test_a_token_the_server_echoes_is_not_stored_in_the_answer() -> None:
    token = "hf_canary_ECHO_not_real_xyz"

    def handler(request: Request, prompt: str, nth: int) -> Response:
        sent = (request.headers or {})["Authorization"].removeprefix("Bearer ")
        return _tgi_ok(f"{prompt}: {' / '.join(forms(sent))}")

    server = Scripted(handler)
    records = _dispatch(server, ["a", "b"], token=token)
    assert server.headers[0]["Authorization"] == f"Bearer {token}"  # loopback gets it
    for record in records.values():
        assert isinstance(record, RowResult)
        text = record.output["generated_text"]
        assert text.endswith("*** / *** / ***")
        for form in forms(token):
            assert form not in repr(record)


def test_a_huge_error_page_is_judged_by_its_status() -> None:
    def handler(request: Request, prompt: str, nth: int) -> Response:
        if nth == 1:
            return Response(503, {"Retry-After": "0"}, b"<html>" + b"x" * 100_000)
        return _tgi_ok("fine")

    [record] = _dispatch(Scripted(handler), ["a"], max_answer_bytes=1024).values()
    assert isinstance(record, RowResult) and record.attempts == 2  # a 503, retried; not answer_too_large


# ---------------------------------------------------------------------------------------- the spec


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "j", "task": "chat-completion", "input": {"parquet": "in.parquet"},
                            "prompt": {"column": "q"}, "endpoint": {"url": "https://api.example.com"}}
    spec.update(overrides)
    return spec


@pytest.mark.parametrize(("where", "spec"), [
    ("endpoint.url", _spec(endpoint={"url": "https://user:s3cretpw@api.example.com/v1"})),
    ("endpoint.url", _spec(endpoint={"url": "http://s3cretpw@127.0.0.1:8080"})),
    ("endpoint.api_url", _spec(endpoint={"name": "e", "namespace": "n",
                                         "api_url": "https://u:s3cretpw@api.endpoints.huggingface.cloud/v2"})),
    ("output.push_to_hub.endpoint", _spec(output={"push_to_hub": {"repo": "org/ds",
                                                                 "endpoint": "https://u:s3cretpw@huggingface.co"}})),
])
def test_credentials_in_a_url_are_refused_and_not_repeated(where: str, spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec(spec)
    assert error.value.key == where
    assert "s3cretpw" not in str(error.value)
    assert "credentials" in str(error.value) and "HF_TOKEN" in str(error.value)


@pytest.mark.parametrize(("spec", "where", "says"), [
    (_spec(endpoint={"url": "http://api.example.com", "send_token": True}), "endpoint.url", "plain http"),
    (_spec(endpoint={"name": "e", "namespace": "n", "api_url": "https://cp.example.com/v2"}),
     "endpoint.api_url", "send_token: true"),
    (_spec(endpoint={"name": "e", "namespace": "n", "api_url": "http://cp.example.com/v2", "send_token": True}),
     "endpoint.api_url", "plain http"),
    (_spec(endpoint={"name": "e", "namespace": "n", "api_url": "http://cp.example.com/v2"}),
     "endpoint.api_url", "plain http"),
    (_spec(output={"push_to_hub": {"repo": "org/ds", "endpoint": "https://hub.example.com"}}),
     "output.push_to_hub.endpoint", "send_token: true"),
    (_spec(output={"push_to_hub": {"repo": "org/ds", "endpoint": "http://hub.example.com", "send_token": True}}),
     "output.push_to_hub.endpoint", "plain http"),
    (_spec(endpoint={"url": "https://api.example.com", "send_token": "yes"}), "endpoint.send_token", "true or false"),
])
def test_a_spec_cannot_send_the_token_where_it_does_not_belong(spec: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec(spec)
    assert error.value.key == where and says in str(error.value)


def test_what_the_spec_may_say_about_the_token() -> None:
    assert parse_spec(_spec()).endpoint.send_token is False
    assert parse_spec(_spec(endpoint={"url": "http://plain.example.com"})).endpoint.url  # sent no token: allowed
    assert parse_spec(_spec(endpoint={"url": "https://api.example.com", "send_token": True})).endpoint.send_token
    opted = parse_spec(_spec(endpoint={"name": "e", "namespace": "n", "api_url": "https://cp.example.com/v2",
                                       "send_token": True}))
    assert opted.endpoint.api_url == "https://cp.example.com/v2"
    assert parse_spec(_spec(endpoint={"name": "e", "namespace": "n",
                                      "api_url": "http://127.0.0.1:9/v2"})).endpoint.api_url
    push = parse_spec(_spec(output={"push_to_hub": {"repo": "org/ds", "endpoint": "http://localhost:1"}}))
    assert push.output.push_to_hub is not None and not push.output.push_to_hub.send_token


def test_max_answer_bytes_is_read_from_the_spec_with_a_default_per_task() -> None:
    assert answer_cap(parse_spec(_spec())) == DEFAULT_MAX_ANSWER_BYTES == 8 * 2**20
    assert answer_cap(parse_spec(_spec(max_answer_bytes="1MiB"))) == 2**20
    image = parse_spec({"name": "j", "task": "text-to-image", "input": {"parquet": "in.parquet"},
                        "prompt": {"column": "q"}, "endpoint": {"url": "https://api.example.com"}})
    assert answer_cap(image) == DEFAULT_MAX_IMAGE_ANSWER_BYTES == 64 * 2**20
    with pytest.raises(SpecError) as error:
        parse_spec(_spec(max_answer_bytes=0))
    assert error.value.key == "max_answer_bytes"


def test_validate_names_the_hosts_the_token_goes_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchrun.cli import main

    monkeypatch.setenv("HF_TOKEN", CANARY)
    register_secret(CANARY)
    data = write_topics(tmp_path / "in.parquet", 3)
    printed = {}
    for url in ("https://api.example.com", "https://xyz.endpoints.huggingface.cloud"):
        spec = write_spec(tmp_path, endpoint={"url": url}, input_path=data, name="j" + str(len(printed)))
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["validate", str(spec)]) == 0
        printed[url] = out.getvalue()
    assert "token: found; not sent to api.example.com" in printed["https://api.example.com"]
    assert "token: found; sent to endpoint: xyz.endpoints.huggingface.cloud" in printed[
        "https://xyz.endpoints.huggingface.cloud"]
    assert CANARY not in "".join(printed.values())


def test_push_will_not_send_the_token_over_plain_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from batchrun.cli import main

    monkeypatch.setenv("HF_TOKEN", CANARY)

    def handler(request: Request) -> Response:
        if request.url.endswith("/info"):
            return Response(404, {}, b"")
        return _chat_answer("fine")

    spec = write_spec(tmp_path, endpoint={"url": "https://api.example.com"},
                      input_path=write_topics(tmp_path / "in.parquet", 2))
    assert run(spec, transport=MockTransport(handler))[0].exit_code == 0
    out = str(tmp_path / "out" / "job")
    assert main(["push", out, "--repo", "org/ds", "--endpoint", "http://hub.example.com"]) == 2
    said = capsys.readouterr()
    assert "plain http" in said.err and "nothing was pushed" in said.err and CANARY not in said.err + said.out


@pytest.mark.parametrize(("variable", "placeholder", "endpoint"), [
    ("HF_TOKEN", "x", {"url": "http://127.0.0.1:9"}),  # a local TGI, any token will do
    ("BATCHRUN_TEST_API_KEY", "EMPTY", {"url": "http://127.0.0.1:9/v1", "model": "m",  # a local vLLM's usual key
                                        "api_key_env": "BATCHRUN_TEST_API_KEY"}),
])
def test_a_placeholder_key_is_not_masked_in_the_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        variable: str, placeholder: str,
                                                        endpoint: dict[str, Any]) -> None:
    # A value too short to be a credential is not a secret: masking it rewrote every answer that held it.
    monkeypatch.setattr("batchrun.errors._SECRETS", set())
    monkeypatch.setattr("batchrun.errors._SECRET_BYTES", ())
    monkeypatch.setenv(variable, placeholder)
    text = "Sets: the EMPTY set, x + x = 2x."
    sent: list[str] = []

    def handler(request: Request) -> Response:
        if request.url.endswith("/info"):
            return Response(404, {}, b"")
        if request.url.endswith("/chat/completions"):
            sent.append(dict(request.headers or {}).get("Authorization", ""))
        return _chat_answer(text)

    spec = write_spec(tmp_path, endpoint=endpoint, input_path=write_topics(tmp_path / "in.parquet", 2))
    outcome, _ = run(spec, transport=MockTransport(handler))
    assert outcome.exit_code == 0
    assert [row["generated_text"] for row in read_rows(tmp_path / "out" / "job" / "data")] == [text, text]
    assert sent == [f"Bearer {placeholder}"] * 2  # it is still sent: only its masking is left out


def test_a_real_length_key_is_masked_in_the_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchrun.errors._SECRETS", set())
    monkeypatch.setattr("batchrun.errors._SECRET_BYTES", ())
    monkeypatch.setenv("HF_TOKEN", CANARY)

    def handler(request: Request) -> Response:
        return Response(404, {}, b"") if request.url.endswith("/info") else _chat_answer(f"echo {CANARY}!")

    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"},
                      input_path=write_topics(tmp_path / "in.parquet", 1))
    assert run(spec, transport=MockTransport(handler))[0].exit_code == 0
    assert [row["generated_text"] for row in read_rows(tmp_path / "out" / "job" / "data")] == ["echo ***!"]
