"""HTTP for the whole of batchrun, in one place: sessions, connection limits, the token and its policy.

Every request batchrun makes itself (the data plane, ``GET /info`` and health checks, provenance's
revision watch, the webhook) goes through a :class:`Transport`, after httpx's ``BaseTransport``::

    response = await transport.send(Request("GET", url, headers=..., timeout=10.0))

    AiohttpTransport   the real one: a pooled aiohttp session per connection pool (one per data-plane
                       route, with its own connection limit), a one-shot session for the odd request
    MockTransport      ``MockTransport(handler)``: ``handler(request) -> Response`` (sync or async)
                       answers every request; no socket is opened. For tests

A job uses the transport :func:`current_transport` returns: :func:`use_transport` (or
``RunOptions(transport=...)``) sets it for everything the job does. A server's ``GET /info`` is asked
in one way, :func:`read_info`, which answers the parsed document or why it could not be read.

Failures are batchrun's own exceptions (:class:`TransportTimeout`, :class:`Unreached`,
:class:`ConnectionFailed`, :class:`AnswerTooLarge`), so no caller imports aiohttp. Only this module
builds an ``Authorization`` header (:func:`auth_headers`), and only for a url the token may go to
(:func:`token_problem`): Hugging Face hosts and loopback, another host when the spec opts in
(``send_token: true``), never plain http beyond loopback. Answers that echo a registered secret have
it replaced by ``***`` (:func:`redact_answer`) before anything reads them.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import ipaddress
import itertools
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from batchrun.errors import BatchrunError, redact, secret_forms

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "AiohttpTransport",
    "AnswerTooLarge",
    "ConnectionFailed",
    "MockTransport",
    "Request",
    "Response",
    "ServerInfo",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "Unreached",
    "auth_headers",
    "current_transport",
    "is_hf_host",
    "is_loopback",
    "read_info",
    "redact_answer",
    "server_root",
    "token_destinations",
    "token_problem",
    "token_sent_to",
    "use_transport",
]

# --------------------------------------------------------------------------- requests and answers


@dataclass(slots=True)
class Request:
    """One request. ``pool`` names the connection pool it goes through (:meth:`Transport.open_pool`;
    None: a one-shot connection); ``max_bytes`` caps the answer's body (None: no cap)."""

    method: str
    url: str
    headers: Mapping[str, str] | None = None
    body: bytes | None = None
    timeout: float | None = None
    pool: str | None = None
    max_bytes: int | None = None


@dataclass(slots=True)
class Response:
    """An answer: its status, headers (case-insensitive from aiohttp) and whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class TransportError(BatchrunError):
    """A request got no complete answer."""


class TransportTimeout(TransportError, TimeoutError):
    """No complete answer within the request's timeout."""


class ConnectionFailed(TransportError):
    """The connection broke: reset, closed mid-answer, bad HTTP from the server."""


class Unreached(ConnectionFailed):
    """No connection could be made (refused, no route, unknown host): the request never left."""


class AnswerTooLarge(TransportError):
    """The answer's body is larger than the request's ``max_bytes``; it was read no further."""

    def __init__(self, limit: int, status: int, headers: Mapping[str, str] | None = None) -> None:
        self.limit = limit
        self.status = status
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        super().__init__(f"the answer is larger than max_answer_bytes ({limit} bytes); it was not read further")


class Transport(Protocol):
    """What sends requests. ``open_pool`` keeps a connection pool (with headers sent on each of its
    requests) until ``close_pool``."""

    def open_pool(self, key: str, *, headers: Mapping[str, str], connections: int) -> None: ...

    async def close_pool(self, key: str) -> None: ...

    async def send(self, request: Request) -> Response: ...


_pool_ids = itertools.count(1)


def new_pool_key(name: str) -> str:
    """A pool name no other pool of this process has."""
    return f"{name}#{next(_pool_ids)}"


# --------------------------------------------------------------------------- aiohttp

_CHUNK = 1 << 16


class AiohttpTransport:
    """The real transport. A pool is an aiohttp session with its own connector (``connections``
    connections at most, kept alive); a request with no pool gets a session of its own."""

    def __init__(self) -> None:
        self._pools: dict[str, aiohttp.ClientSession] = {}
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    def open_pool(self, key: str, *, headers: Mapping[str, str], connections: int) -> None:
        import aiohttp

        session = self._pools.get(key)
        if session is None or session.closed:
            # limit_per_host=0: no separate per-host cap; the total is the pool's connection count.
            connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0)
            self._pools[key] = aiohttp.ClientSession(connector=connector, headers=dict(headers))

    async def close_pool(self, key: str) -> None:
        session = self._pools.pop(key, None)
        if session is not None:
            await session.close()

    def _timeout(self, seconds: float | None) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            import aiohttp

            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def send(self, request: Request) -> Response:
        import aiohttp

        try:
            if request.pool is None:
                async with aiohttp.ClientSession() as session:
                    return await self._send(session, request)
            pooled = self._pools.get(request.pool)
            if pooled is None or pooled.closed:
                raise ConnectionFailed(f"the connection pool {request.pool} is closed")
            return await self._send(pooled, request)
        except TimeoutError:
            raise TransportTimeout(f"no complete answer within {request.timeout:g} s"
                                   if request.timeout else "timed out") from None
        except aiohttp.ClientConnectorError as exc:
            raise Unreached(redact(f"{type(exc).__name__}: {exc}")) from None
        except aiohttp.ClientError as exc:
            # Refused, reset, closed mid-answer (ClientPayloadError), bad HTTP from the server...
            raise ConnectionFailed(redact(f"{type(exc).__name__}: {exc}")) from None

    async def _send(self, session: aiohttp.ClientSession, request: Request) -> Response:
        async with session.request(
            request.method, request.url, data=request.body, headers=request.headers,
            timeout=self._timeout(request.timeout), allow_redirects=False,
        ) as response:
            limit = request.max_bytes
            if limit is None:
                body = await response.read()
            else:
                length = response.content_length
                if length is not None and length <= limit:
                    body = await response.read()  # the length is known and within the cap: read whole
                elif length is not None:
                    raise AnswerTooLarge(limit, response.status, response.headers)
                else:  # no length (chunked): read by chunks, no further than the cap
                    chunks = []
                    size = 0
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise AnswerTooLarge(limit, response.status, response.headers)
                        chunks.append(chunk)
                    body = b"".join(chunks)
            return Response(response.status, response.headers, body)


# --------------------------------------------------------------------------- a scripted transport

Handler = Callable[[Request], "Response | Awaitable[Response]"]


class MockTransport:
    """Answers every request with ``handler(request)`` (a function or a coroutine function); no socket.

    A request sent through a pool carries the pool's headers, merged under its own, as it would on the
    wire. ``handler`` may raise the transport's exceptions to play a timeout or a refused connection.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._pools: dict[str, dict[str, str]] = {}

    def open_pool(self, key: str, *, headers: Mapping[str, str], connections: int) -> None:
        self._pools[key] = dict(headers)

    async def close_pool(self, key: str) -> None:
        self._pools.pop(key, None)

    async def send(self, request: Request) -> Response:
        if request.pool is not None:
            if request.pool not in self._pools:
                raise ConnectionFailed(f"the connection pool {request.pool} is closed")
            request = Request(request.method, request.url, {**self._pools[request.pool], **(request.headers or {})},
                              request.body, request.timeout, request.pool, request.max_bytes)
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            answer = await answer
        assert isinstance(answer, Response), f"the handler answered {answer!r}, not a Response"
        if not isinstance(answer.headers, CIMultiDictProxy):  # as aiohttp's: names in any case
            answer = Response(answer.status, CIMultiDictProxy(CIMultiDict(answer.headers)), answer.body)
        if request.max_bytes is not None and len(answer.body) > request.max_bytes:
            raise AnswerTooLarge(request.max_bytes, answer.status, answer.headers)
        return answer


# --------------------------------------------------------------------------- which transport a job uses

_DEFAULT: AiohttpTransport | None = None
_CURRENT: contextvars.ContextVar[Transport | None] = contextvars.ContextVar("batchrun_transport", default=None)


def current_transport() -> Transport:
    """The transport set by :func:`use_transport`, or the process's aiohttp transport."""
    transport = _CURRENT.get()
    if transport is not None:
        return transport
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = AiohttpTransport()
    return _DEFAULT


@contextlib.contextmanager
def use_transport(transport: Transport | None) -> Iterator[None]:
    """Everything inside (and every task started inside) sends through ``transport`` (None: the default)."""
    if transport is None:
        yield
        return
    token = _CURRENT.set(transport)
    try:
        yield
    finally:
        _CURRENT.reset(token)


# --------------------------------------------------------------------------- where the token may go

#: Hugging Face's own hosts (each with its subdomains), as huggingface_hub's constants name them:
#: the Hub (``ENDPOINT``), Inference Endpoints (``INFERENCE_ENDPOINTS_ENDPOINT`` and endpoint urls),
#: the short domain and Spaces.
HF_DOMAINS = ("huggingface.co", "hf.co", "endpoints.huggingface.cloud", "hf.space")


def _host(url: str) -> tuple[str, str]:
    """(scheme, host) of ``url``, lower case, without brackets."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower().rstrip(".")


def is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains), 127.0.0.0/8 or ::1."""
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_hf_host(host: str) -> bool:
    """A Hugging Face host: one of :data:`HF_DOMAINS` or a subdomain of one (``hf.space`` only its subdomains)."""
    host = host.lower().rstrip(".")
    return any(host.endswith("." + domain) or (host == domain and domain != "hf.space") for domain in HF_DOMAINS)


def token_problem(url: str, *, send_token: bool = False) -> str | None:
    """Why the HF token may not go to ``url`` (None: it may). Loopback always may; a Hugging Face host
    over https may; another host only with ``send_token`` and over https."""
    scheme, host = _host(url)
    if is_loopback(host):
        return None
    if scheme != "https":
        return f"{scheme}://{host} is plain http beyond this machine: the token would cross the network in clear"
    if is_hf_host(host) or send_token:
        return None
    return (f"{host} is not a Hugging Face host: the token goes there only when the spec says so "
            "(send_token: true)")


def token_sent_to(url: str, *, send_token: bool = False) -> bool:
    """Whether the HF token goes to ``url``."""
    return token_problem(url, send_token=send_token) is None


def auth_headers(url: str, token: str | None, *, send_token: bool = False) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when there is a token and it may go to ``url``; else ``{}``."""
    if not token or not token_sent_to(url, send_token=send_token):
        return {}
    return {"Authorization": f"Bearer {token}"}


def token_destinations(spec: Any) -> tuple[list[str], list[str]]:
    """For ``validate``: the hosts a job spec's token goes to ("what: host"), and those it does not.

    The endpoints' urls (a Dedicated endpoint's comes from the control plane), the control plane
    (``api_url``) and the Hub that ``push_to_hub`` publishes to."""
    from huggingface_hub import constants

    sent: list[str] = []
    withheld: list[str] = []
    several = len(spec.all_endpoints) > 1
    for index, endpoint in enumerate(spec.all_endpoints):
        what = f"endpoint[{index}]" if several else "endpoint"
        if endpoint.provider is not None:  # the Inference Providers router (endpoints/providers.py)
            router = endpoint.router_url
            sent.append(f"{what}: the built-in emulator's router (loopback)" if router == "local" else
                        f"{what}: {_host(router or 'https://router.huggingface.co/v1')[1]}")
            if spec.task == "text-to-image" and router != "local":  # the provider's model id, read first
                sent.append(f"hub: {_host(constants.ENDPOINT)[1]} (the model's providers)")
        elif endpoint.api_key_env is not None:  # its own key goes there; the HF token does not
            withheld.append(f"{_host(endpoint.url)[1]} (it gets the key in {endpoint.api_key_env})")
        elif endpoint.url is not None:
            host = _host(endpoint.url)[1]
            if token_sent_to(endpoint.url, send_token=endpoint.send_token):
                sent.append(f"{what}: {host}")
            else:
                withheld.append(host)
        elif endpoint.local is not None:
            sent.append(f"{what}: the built-in emulator (loopback)")
        else:
            api = endpoint.api_url or constants.INFERENCE_ENDPOINTS_ENDPOINT
            sent.append(f"control plane: {_host(api)[1]}")
            sent.append(f"{what}: the url the control plane gives (*.endpoints.huggingface.cloud)")
    push = spec.output.push_to_hub
    if push is not None:
        sent.append(f"hub: {_host(push.endpoint or constants.ENDPOINT)[1]}")
    return sent, withheld


# --------------------------------------------------------------------------- secrets in answers


def redact_answer(body: bytes) -> bytes:
    """``body`` with every registered secret (raw, base64, url-encoded) replaced by ``***``; the same
    object when none is in it, which is the cheap path every answer takes."""
    for secret in secret_forms():
        if secret in body:
            body = body.replace(secret, b"***")
    return body


#: Routes a user may have pasted as part of the url; the server's own routes hang off what precedes them.
_ROUTE_SUFFIXES = ("/v1/chat/completions", "/v1/completions", "/generate_stream", "/generate")


def server_root(url: str) -> str:
    """The url without a pasted route, for the server's own routes (``/info``, ``/health``)."""
    trimmed = url.rstrip("/")
    for suffix in _ROUTE_SUFFIXES:
        if trimmed.endswith(suffix):
            return trimmed[: -len(suffix)]
    return trimmed


# --------------------------------------------------------------------------- a server's GET /info


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A server's answer to ``GET /info`` (TGI's, TEI's: the model, its revision, the server's limits).

    ``document`` is the JSON object a 200 answered; where there is none, ``reason`` says why: no HTTP
    answer at all (``status`` None, ``reason`` naming the transport's error), another status, or a body
    that is not a JSON object. ``body`` is the answer as read (a proxy's page says what it is).
    """

    status: int | None
    document: Mapping[str, Any] | None = None
    body: bytes = field(default=b"", repr=False)
    reason: str | None = None


async def read_info(url: str, *, token: str | None = None, send_token: bool = False,
                    headers: Mapping[str, str] | None = None) -> ServerInfo:
    """Ask the server behind ``url`` (its root, or a route pasted after it) its ``GET /info``: one
    check, within :data:`~batchrun.facts.CHECK_TIMEOUT_S` and :data:`~batchrun.facts.CHECK_MAX_BYTES`.

    The one place batchrun asks it (the url endpoint's check, provenance's revision watch, packing's
    server limits); it never raises for the server's sake: what could not be read is said in the answer.
    """
    import json

    from batchrun.facts import CHECK_MAX_BYTES, CHECK_TIMEOUT_S

    info_url = server_root(url) + "/info"
    sent = {**(headers or {}), **auth_headers(info_url, token, send_token=send_token)}
    try:
        answer = await current_transport().send(
            Request("GET", info_url, sent, timeout=CHECK_TIMEOUT_S, max_bytes=CHECK_MAX_BYTES))
    except TransportError as exc:
        return ServerInfo(None, reason=redact(f"{type(exc).__name__}: {exc}")[:300] or type(exc).__name__)
    if answer.status != 200:
        return ServerInfo(answer.status, body=answer.body, reason=f"HTTP {answer.status} on /info")
    try:
        document = json.loads(answer.body)
    except ValueError:  # UnicodeDecodeError is one
        document = None
    if not isinstance(document, dict):
        return ServerInfo(200, body=answer.body, reason="/info answered something other than a JSON object")
    return ServerInfo(200, document, answer.body)
