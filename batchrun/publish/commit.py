"""A push: read the repo, plan, commit once against the revision read; on a race or an outage, read again.

Each attempt is whole: it reads the head sha, the tree and the card, decides what to add and delete,
renders the card, and makes ONE commit holding the new shards and the card, with ``parent_commit``
set to the sha it read. So the card never names a file the commit lacks, and a commit based on a
stale read is refused by the Hub (412) instead of undoing someone else's work. A 412, a 429 or a 5xx
(or a dropped connection) sends the push back to reading, after a jittered backoff that honours
Retry-After, within a budget of attempts. Nothing is written locally until the commit is made; then
``state/hub.json`` records it. A push killed at any point and run again finds the repo as it is and
completes it: shards are named after the local ones, so none lands twice.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun.errors import AuthError, BatchrunError, OutputError, redact, register_secret
from batchrun.output.files import json_bytes, read_json, replace_atomically
from batchrun.output.layout import OutputStore
from batchrun.publish.card import Card, foreign_problem, render_card
from batchrun.publish.card_facts import read_facts
from batchrun.publish.layout import PushPlan, RemoteFile, Target, local_shards, plan_push, same_content

__all__ = ["Pacing", "PublishError", "PushResult", "push_output"]

RETRY_STATUSES = frozenset({409, 412, 429, 500, 502, 503, 504})
HUB_STATE = "hub.json"


class PublishError(BatchrunError):
    """A push refused or failed: a bad target, a repo holding another job's data, the Hub saying no."""


@dataclass(frozen=True, slots=True)
class Pacing:
    """How a push waits between attempts: full-jitter exponential backoff within a budget of attempts."""

    attempts: int = 8
    base_s: float = 1.0
    cap_s: float = 60.0
    max_retry_after_s: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    random: Callable[[], float] = random.random

    def wait_s(self, attempt: int, retry_after: float | None) -> float:
        backoff = self.random() * min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after_s))
        return backoff


@dataclass(slots=True)
class PushResult:
    """What a push did."""

    repo: str
    commit: str | None  # the sha the repo is at after the push
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    held: int = 0  # shards the repo already had
    attempts: int = 1
    up_to_date: bool = False

    def describe(self) -> str:
        if self.up_to_date:
            return f"{self.repo} is up to date ({self.held} shard(s) already there, commit {str(self.commit)[:12]})"
        deleted = f", removed {len(self.deleted)}" if self.deleted else ""
        return (f"pushed {len(self.added)} new shard(s) and the card to {self.repo}{deleted} ({self.held} already "
                f"there; commit {str(self.commit)[:12]}, attempt {self.attempts})")


@dataclass(slots=True)
class _Remote:
    head: str
    files: dict[str, RemoteFile]
    card: str | None


def push_output(output: str | Path, target: Target, *, token: str | None = None, pacing: Pacing | None = None,
                echo: Callable[[str], None] = print) -> PushResult:
    """Publish the committed shards of ``output`` to ``target`` (see the module's docstring).

    Raises PublishError or AuthError before anything is sent for a bad target, a missing token, an
    output with nothing to push or a repo holding another job's data; the output is never changed
    except for ``state/hub.json`` after a commit.
    """
    from huggingface_hub import HfApi, get_token

    pacing = pacing or Pacing()
    problem = target.problem()
    if problem is not None:
        raise PublishError(f"cannot push to the Hub: {problem}")
    from batchrun.output.remote import readable

    root = readable(output)  # an object store: a local copy of its committed union
    if OutputStore.job_of(root) is None:  # a split job keeps it per shard
        raise OutputError(f"{root} is not a batchrun output folder (no state/job.json)")
    token = token or get_token()
    if not token:
        raise AuthError("no Hugging Face token found to push with: set HF_TOKEN or run `hf auth login` "
                        "(a token with write access to the repo)")
    register_secret(token)
    from batchrun import __version__

    api = HfApi(endpoint=target.endpoint, token=token, library_name="batchrun", library_version=__version__)
    for attempt in range(1, pacing.attempts + 1):
        try:
            result = _attempt(api, root, target)
        except Exception as exc:
            status, retry_after = _retryable(exc)
            if status is None or attempt == pacing.attempts:
                if isinstance(exc, BatchrunError):
                    raise
                raise PublishError(f"push to {target.repo} failed: {_describe(exc)}") from None
            wait = pacing.wait_s(attempt, retry_after)
            echo(f"push: {target.repo}: {status}; reading the repo again in {wait:.1f}s "
                 f"(attempt {attempt + 1} of {pacing.attempts})")
            pacing.sleep(wait)
            continue
        result.attempts = attempt
        _record(root, target, result)
        return result
    raise AssertionError("unreachable: the last attempt raises or returns")


def _attempt(api: Any, root: Path, target: Target) -> PushResult:
    """One read-plan-commit round; raises huggingface_hub's errors for the caller to judge."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    # The repo first, then the local files: a file another writer (a shard of the same job) pushed was
    # committed here before it was pushed, so it is listed, and never taken for one to delete.
    remote = _read(api, target)
    shards = local_shards(root, target)
    data = [s for s in shards if s.shard.kind == "data"]
    failed = [s for s in shards if s.shard.kind == "failed"]
    facts = read_facts(root, data, failed)
    card = Card.parse(remote.card)
    problem = foreign_problem(card, list(remote.files), target, facts)
    if problem is not None:
        raise PublishError(problem)
    plan = plan_push(shards, remote.files, target)
    extra: list[Any] = []
    thumbs = facts.thumbnails
    if thumbs is not None and not same_content(thumbs, remote.files.get(target.thumbnails_path())):
        extra.append(CommitOperationAdd(path_in_repo=target.thumbnails_path(), path_or_fileobj=thumbs))
    readme = render_card(remote.card, facts, target, with_thumbnails=thumbs is not None).encode()
    if not plan.changes_data and not extra and remote.card is not None and remote.card.encode() == readme:
        return PushResult(repo=target.repo, commit=remote.head, held=len(plan.held), up_to_date=True)
    operations: list[Any] = [CommitOperationAdd(path_in_repo=s.hub_path, path_or_fileobj=str(s.path)) for s in plan.add]
    operations += [CommitOperationDelete(path_in_repo=path) for path in plan.delete]
    operations += [*extra, CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]
    info = send_commit(api, target, operations, parent=remote.head, message=_message(plan, facts.name))
    return PushResult(repo=target.repo, commit=info.oid, added=[s.hub_path for s in plan.add],
                      deleted=list(plan.delete), held=len(plan.held))


def send_commit(api: Any, target: Target, operations: list[Any], *, parent: str, message: str) -> Any:
    """The one call that changes the repo (a seam: tests stop a push here, before or after it)."""
    return api.create_commit(repo_id=target.repo, repo_type="dataset", operations=operations, parent_commit=parent,
                             commit_message=message, revision="main")


def _read(api: Any, target: Target) -> _Remote:
    """The repo's head, files and card; the repo is created (empty) when it does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(target.repo, repo_type="dataset", revision="main")
    except RepositoryNotFoundError:
        api.create_repo(target.repo, repo_type="dataset", private=target.private, exist_ok=True)
        info = api.repo_info(target.repo, repo_type="dataset", revision="main")
    head = info.sha
    files: dict[str, RemoteFile] = {}
    for entry in api.list_repo_tree(target.repo, repo_type="dataset", revision=head, recursive=True):
        if hasattr(entry, "size"):  # a RepoFile (folders have no size)
            lfs = getattr(entry, "lfs", None)
            files[entry.path] = RemoteFile(path=entry.path, size=entry.size, blob_id=entry.blob_id,
                                           sha256=lfs.sha256 if lfs is not None else None)
    card = None
    if "README.md" in files:
        with tempfile.TemporaryDirectory(prefix="batchrun-card-") as folder:
            path = api.hf_hub_download(target.repo, "README.md", repo_type="dataset", revision=head,
                                       cache_dir=folder)
            card = Path(path).read_text(encoding="utf-8")
    return _Remote(head=head, files=files, card=card)


def _message(plan: PushPlan, job: str) -> str:
    parts = [f"add {len(plan.add)} shard(s)"] if plan.add else []
    if plan.delete:
        parts.append(f"remove {len(plan.delete)}")
    return f"batchrun: {', '.join(parts) or 'update the card'} of job {job}"


def _retryable(exc: BaseException) -> tuple[str | None, float | None]:
    """``(what happened, Retry-After)`` when another attempt may succeed, else ``(None, None)``."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in RETRY_STATUSES:
            words = "someone else committed first (412)" if status == 412 else f"the Hub answered {status}"
            return words, _retry_after(exc.response.headers.get("Retry-After"))
        return None, None
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "ReadError", "WriteError",
    ):
        return f"the connection failed ({type(exc).__name__})", None
    return None, None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    """huggingface_hub's error, on one line and without the token."""
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text}")[:600]


def _record(root: Path, target: Target, result: PushResult) -> None:
    """``state/hub.json``: the last push to each repo/config/split (for people; the repo is the truth)."""
    store = OutputStore(root)
    path = store.state_dir / HUB_STATE
    pushes = read_json(path) or {}
    pushes[f"{target.repo}:{target.config}:{target.split}"] = {
        "repo": target.repo, "config": target.config, "split": target.split, "commit": result.commit,
        "added": len(result.added), "held": result.held, "at": dt.datetime.now(dt.UTC).isoformat(),
    }
    try:
        replace_atomically(path, json_bytes(pushes), store.tmp_dir)
    except OSError as exc:
        raise OutputError(f"pushed to {target.repo} (commit {result.commit}) but could not record it in {path}: "
                          f"{exc}") from exc
