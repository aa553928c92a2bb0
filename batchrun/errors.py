"""Every error batchrun raises, in one place.

    BatchrunError                      base; carries an exit code (reliability.md §6)
    ├── SpecError (ValueError)         the job spec is malformed: file, key path, what was expected   -> 2
    ├── InputError                     the input cannot be read, lacks a column, has duplicate ids    -> 2
    ├── ConfigMismatchError            resume with a changed template/model/task/parameters           -> 2
    ├── BudgetSpentError               the job's budget (over all its runs) is already spent         -> 2
    ├── OutputError                    the output folder is not writable or is damaged                -> 2
    │   ├── OutputLockedError          another run is writing the same output folder                  -> 2
    │   └── ObjectStoreError           an object store refused or failed a request (``key``)          -> 2
    │       └── PreconditionFailed     a conditional write lost: the key exists, or it changed        -> 2
    ├── AuthError (PermissionError)    no token, or the endpoint answered 401/403                     -> 2
    ├── EndpointError                  the endpoint failed or broke once the job had started          -> 3
    │   ├── EndpointNotReadyError (TimeoutError)  it did not become ready within ready_timeout        -> 3
    │   ├── ControlPlaneUnavailableError  the control plane did not answer, or answered 429/5xx       -> 3
    │   └── EndpointUnusableError      found before anything changed: missing, failed, wrong task,
    │                                  unreachable                                                    -> 2
    ├── EmulatorError                  the local emulator cannot start: busy port, non-loopback host,
    │                                  a file that is not an emulator config                          -> 2
    └── JobStopped                     a stop (signal, budget...) came while the endpoint was being
                                       acquired; it was released, and the job can be resumed          -> 3

    RequestFailed                      one request's outcome that is not a success; used inside
                                       dispatch and turned into a retry or a failure row, never
                                       raised out of a job

Errors carry fields, not just strings: callers branch on types and attributes, never on ``str(exc)``.
No message ever contains the HF token: messages are built from spec values, statuses and server
bodies, and server bodies are passed through :func:`redact` before they are stored.
"""

from __future__ import annotations

import base64
import urllib.parse
from typing import TYPE_CHECKING

from batchrun.facts import MIN_SECRET_CHARS, ExitCode

if TYPE_CHECKING:
    from batchrun.holder import Holder

__all__ = [
    "AuthError",
    "BatchrunError",
    "BudgetSpentError",
    "ConfigMismatchError",
    "ControlPlaneUnavailableError",
    "EmulatorError",
    "EndpointError",
    "EndpointNotReadyError",
    "EndpointUnusableError",
    "InputError",
    "JobStopped",
    "ObjectStoreError",
    "OutputError",
    "OutputLockedError",
    "PreconditionFailed",
    "RequestFailed",
    "SpecError",
    "redact",
    "register_secret",
    "secret_forms",
]


class BatchrunError(Exception):
    """Base of every batchrun error. ``exit_code`` is what the CLI exits with."""

    exit_code: ExitCode = ExitCode.NOTHING_RAN


class SpecError(BatchrunError, ValueError):
    """The job spec is invalid. Names the file, the key path and what was expected."""

    def __init__(self, file: str | None, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {problem}")


class InputError(BatchrunError):
    """The input cannot be used: unreadable, missing a column, duplicate ids."""


class ConfigMismatchError(BatchrunError):
    """The output folder holds a job run with a different configuration."""

    def __init__(self, output: str, changed: list[str], *, shard: str | None = None) -> None:
        self.output = output
        self.changed = changed
        if shard is None:
            what, way_out = ("the results of this job", "use another output folder (--output DIR), or pass --fresh "
                             "to set the old output aside and start over")
        else:  # the shards of one job write one folder: the first shard's settings hold for all
            what, way_out = (f"shards of this job (this run is {shard})", "or use another output folder "
                             "(--output DIR) for every shard")
        super().__init__(
            f"{output} holds {what} under other settings: {'; '.join(changed)}. "
            "Mixing two configurations in one output is refused. Restore the previous values to resume, "
            f"{way_out}."
        )


class BudgetSpentError(BatchrunError):
    """The job's budget is already spent by its earlier runs: running again would spend past it."""

    def __init__(self, max_usd: float, spent_usd: float, runs: int) -> None:
        self.max_usd = max_usd
        self.spent_usd = spent_usd
        super().__init__(
            f"budget.max_usd is ${max_usd:g} and this job has already spent ${spent_usd:.4f} over {runs} run(s); "
            "raise budget.max_usd to go on (the output keeps what was spent, in state/spend.json)"
        )


class OutputError(BatchrunError):
    """The output folder cannot be written, or its state is damaged."""


class OutputLockedError(OutputError):
    """Another batchrun run holds the output folder. ``holder`` names it (None: a record that could not be read)."""

    def __init__(self, output: str, holder: Holder | None) -> None:
        self.output = output
        self.holder = holder
        who = holder.describe() if holder is not None else "a process whose record cannot be read"
        super().__init__(
            f"{output} is being written by another batchrun run: {who}. "
            "Wait for it to finish, or stop it; a run is never started twice on one output."
        )


class ObjectStoreError(OutputError):
    """An object store (``s3://``, ``gs://``, ``hf://buckets/``) refused or failed a request about ``key``
    (``missing``: no such key)."""

    def __init__(self, message: str, key: str | None = None, *, missing: bool = False) -> None:
        self.key = key
        self.missing = missing
        super().__init__(message)


class PreconditionFailed(ObjectStoreError):
    """A conditional write lost (HTTP 412): create-if-absent found ``key``, or replace-if-unchanged found it changed."""


class AuthError(BatchrunError, PermissionError):
    """No usable token, or the endpoint refused it (401/403). Stops the whole job."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class EndpointError(BatchrunError):
    """The endpoint cannot be used: not found, failed, wrong task, unreachable."""

    exit_code = ExitCode.STOPPED_EARLY

    def __init__(self, message: str, *, state: str | None = None) -> None:
        self.state = state
        super().__init__(message)


class EndpointNotReadyError(EndpointError, TimeoutError):
    """The endpoint did not become ready within the spec's ``ready_timeout``."""


class ControlPlaneUnavailableError(EndpointError):
    """The control plane could not be reached or answered 5xx/429: worth asking again."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class EndpointUnusableError(EndpointError):
    """Found before anything was changed: the endpoint is missing, failed, serves another task, or
    cannot be reached. Exit code 2 (nothing ran), unlike an endpoint that breaks once the job has
    started (3)."""

    exit_code = ExitCode.NOTHING_RAN


class EmulatorError(BatchrunError):
    """The local Inference Endpoint emulator cannot start or its config is unusable (one line, no traceback)."""

    exit_code = ExitCode.NOTHING_RAN


class JobStopped(BatchrunError):
    """A stop was requested while the endpoint was being acquired: it was released, nothing was sent."""

    exit_code = ExitCode.STOPPED_EARLY

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RequestFailed(BatchrunError):
    """One request did not succeed. Dispatch turns it into a retry or a failure row.

    ``error_type`` is the failure row's short stable name: a :class:`~batchrun.records.FailureType`
    (``timeout``, ``connection``, ``bad_body`` ...) or ``http_<status>``; ``status`` is the HTTP
    status when there was one; ``retry_after`` is the server's Retry-After in seconds, already
    parsed; ``retryable`` is the fixed classification of reliability.md §2. ``model_answered`` says
    the model server itself answered with its JSON error (``{"error": ...}``), as opposed to a
    proxy's page or no answer at all: the endpoint is up, and the failure is this row's, not an outage.
    ``rate_limited``: a 429 over the lane's requests or tokens per window (Retry-After, rate-limit headers,
    ``rate_limit_exceeded``), which the lane's rate gate waits out, as opposed to TGI's refusal for capacity.
    """

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool,
        retry_after: float | None = None,
        model_answered: bool = False,
        unreached: bool = False,
        rate_limited: bool = False,
    ) -> None:
        self.error_type = error_type
        self.message = redact(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.model_answered = model_answered
        self.unreached = unreached  # no connection could be made: the request never reached the server
        self.rate_limited = rate_limited  # a 429 for the lane's rate (batchrun.rate), not for its capacity
        super().__init__(self.message)

    def __repr__(self) -> str:
        return (
            f"RequestFailed(error_type={self.error_type!r}, status={self.status!r}, "
            f"retryable={self.retryable!r}, retry_after={self.retry_after!r}, message={self.message!r})"
        )


# Secrets known to this process. Naughty global state, but a token must be scrubbed from any string
# that might reach a log, a message or a file, wherever that string was built.
_SECRETS: set[str] = set()
_SECRET_BYTES: tuple[bytes, ...] = ()


def register_secret(secret: str | None) -> None:
    """Remember a secret (the HF token) so that :func:`redact` removes it in every encoding.

    A value shorter than :data:`~batchrun.facts.MIN_SECRET_CHARS` is a placeholder, not a credential:
    it is not masked, so that an answer or a message holding the same few letters reads as written.
    """
    if not secret or len(secret) < MIN_SECRET_CHARS:
        return
    _SECRETS.add(secret)
    _SECRETS.add(base64.b64encode(secret.encode()).decode())
    _SECRETS.add(urllib.parse.quote(secret, safe=""))
    global _SECRET_BYTES
    _SECRET_BYTES = tuple(sorted({form.encode() for form in _SECRETS}, key=len, reverse=True))


def secret_forms() -> tuple[bytes, ...]:
    """Every registered secret in each of its forms, as bytes (longest first), to search answers for."""
    return _SECRET_BYTES


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced by ``***``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text
