"""The end-of-run notification: a short JSON summary posted to a webhook, whatever the run's exit.

    notify:
      webhook: https://hooks.slack.com/services/...   # or ${NIGHTLY_WEBHOOK}: read from the environment
      attempts: 3                                      # tries, with a short backoff between them
      timeout: 10s

The body fits a Slack-compatible incoming webhook: ``text`` is one readable line, and the same
figures follow as fields (``status``, ``exit_code``, ``rows``, ``cost_usd``, ``model``, ``revision``,
``compare``). A notification never changes the job's outcome: a webhook that is down is retried a
few times, then a warning is printed. The url is a secret as far as messages go (a Slack webhook's
path is its credential), and no token is ever put in the body.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchrun.facts import ExitCode

__all__ = ["NotifySpec", "build_payload", "parse_notify_spec", "post_notification"]

_ENV = re.compile(r"^\$\{(\w+)\}$")
#: A ``${VAR}`` anywhere in the url (``https://hooks.slack.com/services/${SLACK_PATH}``).
_REFERENCE = re.compile(r"\$\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class NotifySpec:
    """Where and how the end-of-run summary is posted."""

    webhook: str
    attempts: int = 3
    timeout_s: float = 10.0

    def url(self) -> str | None:
        """The webhook url, with each ``${VAR}`` in it read from the environment now (None when one is unset)."""
        if self.unset_variables():
            return None
        return _REFERENCE.sub(lambda m: os.environ[m.group(1)], self.webhook)

    def unset_variables(self) -> list[str]:
        """The variables the url names (``${VAR}``, the whole url or part of it) that the environment lacks."""
        return [name for name in _REFERENCE.findall(self.webhook) if not os.environ.get(name)]


def parse_notify_spec(data: Any) -> NotifySpec | None:
    """``notify:`` as a NotifySpec; raises ``ValueError((key, problem))`` for the spec parser to word."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(("notify", "expected a mapping such as {webhook: URL}"))
    unknown = sorted(str(k) for k in data if k not in ("webhook", "attempts", "timeout"))
    if unknown:
        raise ValueError((f"notify.{unknown[0]}", "unknown key; expected one of webhook, attempts, timeout"))
    webhook = data.get("webhook")
    if not isinstance(webhook, str) or not (webhook.startswith(("http://", "https://")) or _ENV.match(webhook)):
        raise ValueError(("notify.webhook", "expected an http(s) url, or ${ENV_VAR} naming one"))
    if "${" in _REFERENCE.sub("", webhook):
        raise ValueError(("notify.webhook", "a ${...} must name an environment variable (letters, digits, _)"))
    attempts = data.get("attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise ValueError(("notify.attempts", f"expected an integer from 1 to 10, got {attempts!r}"))
    timeout = data.get("timeout", 10.0)
    if isinstance(timeout, str) and timeout.endswith("s") and timeout[:-1].replace(".", "", 1).isdigit():
        timeout = float(timeout[:-1])
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(("notify.timeout", f"expected seconds above 0 (e.g. 10s), got {timeout!r}"))
    return NotifySpec(webhook=webhook, attempts=attempts, timeout_s=float(timeout))


def build_payload(summary: Mapping[str, Any], verdict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON posted: a ``text`` line for chat, and the figures as fields for machines."""
    rows = summary.get("rows") or {}
    cost = (summary.get("cost") or {}).get("usd")
    provenance = summary.get("provenance") or {}
    status = {ExitCode.OK: "ok", ExitCode.ROWS_FAILED: "failed rows", ExitCode.STOPPED_EARLY: "stopped early"}.get(
        summary.get("exit_code", -1), "error")
    parts = [f"batchrun {summary.get('job')}: {summary.get('outcome')} (exit {summary.get('exit_code')})",
             f"{rows.get('total_ok', rows.get('ok', 0))} ok, {rows.get('total_failed', rows.get('failed', 0))} failed"]
    if cost is not None:
        parts.append(f"${cost:.2f}")
    if provenance.get("revision"):
        parts.append(f"{provenance.get('model')}@{str(provenance['revision'])[:12]}")
    if verdict is not None:
        parts.append(f"compare: {verdict.get('verdict')}")
    payload: dict[str, Any] = {
        "text": "; ".join(parts),
        "job": summary.get("job"),
        "status": status,
        "outcome": summary.get("outcome"),
        "exit_code": summary.get("exit_code"),
        "rows": {k: rows.get(k) for k in ("ok", "failed", "total_ok", "total_failed", "pending")},
        "cost_usd": cost,
        "model": provenance.get("model"),
        "revision": provenance.get("revision"),
        "run_id": provenance.get("run_id"),
        "output": summary.get("output"),
        "started_at": summary.get("started_at"),
        "ended_at": provenance.get("ended_at"),
    }
    if verdict is not None:
        payload["compare"] = dict(verdict)
    return payload


async def post_notification(
    spec: NotifySpec, payload: Mapping[str, Any], *, echo: Callable[[str], None] = print,
    backoff_s: float = 0.5,
) -> bool:
    """POST ``payload``; retried on a network error or a 5xx/429 answer. Never raises; True when delivered."""
    import json

    from batchrun.errors import redact, register_secret
    from batchrun.transport import Request, TransportError, current_transport

    url = spec.url()
    if not url:
        echo(f"notify: the webhook {spec.webhook} is not set in the environment; nothing was posted")
        return False
    register_secret(url)  # a webhook's url is its credential: never printed
    problem = ""
    for attempt in range(spec.attempts):
        if attempt:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            answer = await current_transport().send(Request(
                "POST", url, {"Content-Type": "application/json"}, json.dumps(dict(payload)).encode(),
                timeout=spec.timeout_s, max_bytes=2**20,
            ))
        except (TransportError, OSError) as exc:
            problem = type(exc).__name__
            continue
        if answer.status < 300:
            return True
        problem = f"HTTP {answer.status}"
        if answer.status < 500 and answer.status != 429:
            break  # the webhook refuses this body: trying again would not help
    echo(redact(f"warning: the notification was not delivered ({problem}); the job's outcome is unchanged"))
    return False
