"""A plain url: any TGI or OpenAI-compatible server. Nothing to resume, nothing to release.

Its check asks the server what it serves (TGI's ``GET /info``: ``model_id``, ``model_sha``), which
proves that it answers before anything else is spent, and puts the served model in the job's identity,
so that a resume against another model behind the same url is refused.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from batchrun.cost import CostMeter
from batchrun.endpoints.base import Bracketed, BracketResult, DataPlane, EndpointCheck, LifecycleRecord
from batchrun.errors import AuthError, EndpointUnusableError, RequestFailed, redact
from batchrun.rate import RateLimits
from batchrun.retry import is_paused_answer
from batchrun.transport import read_info, server_root

__all__ = ["UrlEndpoint"]

_NOTHING_TO_BRACKET = ("a url is sent to as it is: batchrun neither resumes nor puts it down, so there is nothing "
                       "to bracket")


class UrlEndpoint:
    """`endpoint: {url: ...}`: used as it is, left as it is."""

    def __init__(self, url: str, *, token: str | None, send_token: bool = False,
                 limits: RateLimits | None = None) -> None:
        self.url = url
        self.limits = limits
        self.ref = redact(url)
        self.record = LifecycleRecord(initial_state="static")
        self.meter = CostMeter(None)
        self._token = token
        self._send_token = send_token

    def __repr__(self) -> str:
        return f"UrlEndpoint({self.ref!r})"

    async def check(self) -> EndpointCheck:
        """Ask ``GET /info``; any HTTP answer proves the server is there, only a TGI one names the model."""
        answer = await read_info(self.url, token=self._token, send_token=self._send_token)
        status = answer.status
        if status is None:
            raise EndpointUnusableError(
                f"cannot reach the endpoint at {self.ref} ({answer.reason}): check endpoint.url and that the server "
                "is running; nothing was sent"
            )
        if status in (401, 403):
            raise AuthError(
                f"the endpoint at {self.ref} refused the token (HTTP {status}): set HF_TOKEN to a token with access, "
                "or run `hf auth login`",
                status=status,
            )
        if status == 400 and is_paused_answer(answer.body):
            raise EndpointUnusableError(
                f"the endpoint at {self.ref} is paused: resume it (for a Dedicated endpoint, `batchrun endpoint "
                "resume NAME --namespace NS`, or let batchrun manage it with endpoint.name), then run the job again"
            )
        info = answer.document or {}
        model = info.get("model_id") if isinstance(info.get("model_id"), str) else None
        revision = info.get("model_sha") if isinstance(info.get("model_sha"), str) else None
        if model:
            note = f"{self.ref}: serves {model}" + (f" at revision {revision}" if revision else "")
        else:
            note = f"{self.ref}: answers (HTTP {status} on /info; the model it serves is not known)"
        details: dict[str, Any] = {k: info[k] for k in ("version", "max_concurrent_requests") if k in info}
        return EndpointCheck(note=note, model=model, revision=revision, details=details,
                             infos={server_root(self.url): answer})

    async def __aenter__(self) -> DataPlane:
        self.record.acquired_at = self.record.ready_at = time.monotonic()
        return DataPlane(url=self.url, token=self._token, send_token=self._send_token, limits=self.limits)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.record.released_at = time.monotonic()
        self.record.final_action = "none"

    def excuses(self, failure: RequestFailed) -> bool:
        return False

    async def up(self) -> BracketResult:
        """Nothing to hold up: a url is used as it is and left as it is."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_NOTHING_TO_BRACKET)

    async def down(self) -> BracketResult:
        """Nothing to put down: a url is used as it is and left as it is."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_NOTHING_TO_BRACKET)

