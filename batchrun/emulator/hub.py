"""The Hugging Face Hub, as far as huggingface_hub and ``datasets`` use it for dataset repos.

It lives on the emulator's control port (the URL to give ``HF_ENDPOINT``) and keeps repos in memory:
each repo is a chain of commits, each commit a full snapshot ``path -> blob``, and a ``main`` branch
pointing at the head. What it serves (see docs/hub.md for what it does not):

- ``POST /api/repos/create``, ``GET /api/{type}s/{id}[/revision/{rev}]`` (repo_info), ``GET .../refs``,
  ``GET .../commits/{rev}``;
- ``POST .../preupload/{rev}`` (every file is ``regular``: its bytes travel inside the commit) and
  ``POST .../commit/{rev}`` (NDJSON; ``parentCommit`` checked, 412 when the head moved);
- ``GET .../tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}`` (list_repo_tree, HfFileSystem);
- ``HEAD``/``GET /{datasets/}{id}/resolve/{rev}/{path}`` with ranges (hf_hub_download, HfFileSystem);
- ``POST /api/validate-yaml``.

Storage Buckets (``/api/buckets/...``) are ``batchrun.emulator.hub_buckets``, their bytes in the Xet CAS of
``batchrun.emulator.xet_cas``; both are registered on the same application by :meth:`EmulatedHub.add_routes`.

Test hooks: :meth:`EmulatedHub.move_head` (a racing commit now), :meth:`EmulatedHub.race_next_commit`
(one lands just before the next commit is checked, so that commit gets its 412) and
:meth:`EmulatedHub.fail_next_commits` (429 or 5xx answers). They are also routes under
``/emulator/hub/`` for a demo run by ``batchrun emulate``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from batchrun.emulator.hub_buckets import EmulatedBuckets
from batchrun.emulator.xet_cas import XetCas

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub calls a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, bytes]
    written: list[str] = field(default_factory=list)  # paths the commit added or replaced (for tests)


@dataclass
class HubRepo:
    """One repo: its commits, its branches, and the faults waiting for its next commits."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    races: int = 0
    failures: list[tuple[int, float | None]] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[self.branches["main"]]

    def resolve(self, revision: str) -> Commit | None:
        """A branch name, a full commit sha or an unambiguous prefix of one (7+ characters)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7:
            found = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def commit(self, title: str, files: dict[str, bytes], branch: str = "main") -> Commit:
        """A new commit on ``branch`` holding exactly ``files``."""
        parent = self.branches.get(branch)
        before = self.commits[parent].files if parent else {}
        now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        digest = hashlib.sha1(f"{self.repo_id}\0{parent}\0{title}\0{len(self.commits)}\0".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_oid(files[path]).encode())
        written = sorted(p for p, data in files.items() if before.get(p) != data)
        commit = Commit(oid=digest.hexdigest(), parent=parent, title=title, date=now, files=dict(files),
                        written=written)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


def _error(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    all_headers = dict(headers or {})
    if code:
        all_headers["X-Error-Code"] = code
    all_headers["X-Error-Message"] = message
    return web.json_response({"error": message}, status=status, headers=all_headers)


class EmulatedHub:
    """In-memory dataset (and model) repos behind the Hub's HTTP API. Token: None turns auth off."""

    def __init__(self, token: str | None) -> None:
        self._expected_auth = f"Bearer {token}" if token is not None else None
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.log: list[dict[str, Any]] = []
        self.cas = XetCas()  # the Xet storage behind buckets, on the same port
        self.buckets = EmulatedBuckets(self.cas, self._authorized)
        # The router's providers' inferenceProviderMapping of a model (the emulator wires its router in).
        self.provider_mapping: Callable[[str], dict[str, dict[str, str]]] | None = None

    @property
    def base_url(self) -> str:
        return self.cas.base_url

    @base_url.setter
    def base_url(self, url: str) -> None:
        self.cas.base_url = url

    # ----- the API a test or a demo uses directly

    def create_repo(self, repo_id: str, repo_type: str = "dataset", *, private: bool = False) -> HubRepo:
        """A new repo with its first commit (a ``.gitattributes``), as the Hub makes it."""
        now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        repo = HubRepo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now)
        repo.commit("initial commit", {".gitattributes": GITATTRIBUTES})
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo(self, repo_id: str, repo_type: str = "dataset") -> HubRepo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "dataset") -> dict[str, bytes]:
        """The files at the head of ``main``."""
        return dict(self.repo(repo_id, repo_type).head.files)

    def seed(self, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset", *, title: str = "seed") -> str:
        """Create the repo if needed and commit ``files`` (added or replaced); returns the commit sha."""
        repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_id, repo_type)
        return repo.commit(title, {**repo.head.files, **files}).oid

    def seed_folder(self, repo_id: str, folder: str | Path, repo_type: str = "dataset") -> str:
        """Commit every file under ``folder`` (a local dataset) to ``repo_id``, keeping relative paths."""
        root = Path(folder)
        if root.is_file():
            return self.seed(repo_id, {f"data/{root.name}": root.read_bytes()}, repo_type)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return self.seed(repo_id, files, repo_type)

    def move_head(self, repo_id: str, repo_type: str = "dataset") -> str:
        """Someone else commits now (a file of their own under ``racers/``): the head moves."""
        repo = self.repo(repo_id, repo_type)
        n = len(repo.commits)
        return repo.commit(f"racing commit {n}", {**repo.head.files, f"racers/commit-{n}.txt": b"racer\n"}).oid

    def race_next_commit(self, repo_id: str, repo_type: str = "dataset", count: int = 1) -> None:
        """The next ``count`` commits to the repo each find that someone committed just before them."""
        self.repo(repo_id, repo_type).races += count

    def fail_next_commits(self, repo_id: str, status: int = 503, count: int = 1, *, retry_after: float | None = None,
                          repo_type: str = "dataset") -> None:
        """The next ``count`` commits to the repo are answered ``status`` (429, 500, 503 ...) and change nothing."""
        self.repo(repo_id, repo_type).failures.extend([(status, retry_after)] * count)

    def commits_of(self, repo_id: str, repo_type: str = "dataset") -> list[Commit]:
        """The commits of ``main``, newest first."""
        repo = self.repo(repo_id, repo_type)
        out: list[Commit] = []
        oid: str | None = repo.branches["main"]
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    # ----- routes

    def add_routes(self, app: web.Application) -> None:
        """Register the Hub's routes on the control plane's application."""
        r = app.router
        self.cas.add_routes(app)
        self.buckets.add_routes(app)
        r.add_post("/api/repos/create", self._create)
        r.add_post("/api/validate-yaml", self._validate_yaml)
        base = "/api/{rtype:models|datasets|spaces}/{ns}/{name}"
        r.add_get(base, self._info)
        r.add_get(base + "/revision/{rev}", self._info)
        r.add_get(base + "/refs", self._refs)
        r.add_get(base + "/commits/{rev}", self._commits)
        r.add_get(base + "/tree/{rev}", self._tree)
        r.add_get(base + "/tree/{rev}/{path:.+}", self._tree)
        r.add_post(base + "/paths-info/{rev}", self._paths_info)
        r.add_post(base + "/preupload/{rev}", self._preupload)
        r.add_post(base + "/commit/{rev}", self._commit)
        hooks = "/emulator/hub/{rtype:models|datasets|spaces}/{ns}/{name}"
        r.add_post(hooks + "/move-head", self._hook_move_head)
        r.add_post(hooks + "/fail-commits", self._hook_fail_commits)
        for prefix in ("/{rtype:datasets|spaces}", ""):
            r.add_route("HEAD", prefix + "/{ns}/{name}/resolve/{rev}/{path:.+}", self._resolve)
            r.add_get(prefix + "/{ns}/{name}/resolve/{rev}/{path:.+}", self._resolve, allow_head=False)

    # ----- plumbing

    def _authorized(self, request: web.Request) -> bool:
        return self._expected_auth is None or request.headers.get("Authorization") == self._expected_auth

    def _record(self, request: web.Request, status: int) -> None:
        self.log.append({"method": request.method, "path": request.path, "status": status})

    def _find(self, request: web.Request) -> tuple[HubRepo | None, web.Response | None]:
        """The repo of the request's path, or the 404 (or 401) the Hub would answer."""
        info = request.match_info
        repo_type = REPO_TYPES.get(info.get("rtype", "models"), "model")
        repo = self.repos.get((repo_type, f"{info['ns']}/{info['name']}"))
        if repo is None or (repo.private and not self._authorized(request)):
            return None, _error(404, "Repository not found", "RepoNotFound")
        return repo, None

    def _at(self, request: web.Request) -> tuple[HubRepo | None, Commit | None, web.Response | None]:
        repo, refusal = self._find(request)
        if repo is None:
            return None, None, refusal
        commit = repo.resolve(request.match_info.get("rev", "main"))
        if commit is None:
            return repo, None, _error(404, "Invalid rev id", "RevisionNotFound")
        return repo, commit, None

    def _answer(self, request: web.Request, response: web.Response) -> web.Response:
        self._record(request, response.status)
        return response

    # ----- repos

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._answer(request, _error(401, "Invalid username or password."))
        body = await request.json()
        name, org = body.get("name"), body.get("organization")
        repo_type = body.get("type") or "model"
        if not org or not isinstance(name, str) or not _NAME.match(name) or not _NAME.match(org):
            return self._answer(request, _error(400, f"invalid repo name {org}/{name}"))
        repo_id = f"{org}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.base_url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return self._answer(request, web.json_response(
                {"error": f"You already created this {repo_type} repo", "url": url}, status=409))
        self.create_repo(repo_id, repo_type, private=body.get("visibility") == "private" or bool(body.get("private")))
        return self._answer(request, web.json_response({"url": url, "name": repo_id, "id": repo_id}))

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        body = await request.json()
        content = body.get("content") or ""
        if content.startswith("---"):
            header = content.split("---", 2)
            try:
                meta = yaml.safe_load(header[1]) if len(header) == 3 else None
            except yaml.YAMLError as exc:
                return self._answer(request, web.json_response(
                    {"errors": [{"message": f"invalid YAML: {exc}"}]}, status=400))
            if meta is not None and not isinstance(meta, dict):
                return self._answer(request, web.json_response(
                    {"errors": [{"message": "the metadata must be a mapping"}]}, status=400))
        return self._answer(request, web.json_response({"warnings": []}))

    async def _info(self, request: web.Request) -> web.Response:
        repo, commit, refusal = self._at(request)
        mapped = self._provider_mapping(request)
        if mapped is not None and (refusal is not None or self._expanded(request)):
            # A model the router serves: what `?expand[]=inferenceProviderMapping` asks (huggingface_hub's
            # _fetch_inference_provider_mapping), or that model's info when the Hub holds no repo for it.
            model_id = f"{request.match_info['ns']}/{request.match_info['name']}"
            info: dict[str, Any] = {"_id": hashlib.sha1(model_id.encode()).hexdigest()[:24], "id": model_id}
            if self._expanded(request):  # the Hub answers only the expanded properties
                info["inferenceProviderMapping"] = mapped
            else:  # hf-inference's client checks the pipeline tag before it sends
                tasks = {m["task"] for m in mapped.values()}
                info.update(pipeline_tag="text-to-image" if "text-to-image" in tasks else "text-generation", tags=[])
            return self._answer(request, web.json_response(info))
        if refusal is not None:
            return self._answer(request, refusal)
        assert repo is not None and commit is not None
        blobs = request.query.get("blobs") in ("1", "true", "True")
        siblings = []
        for path in sorted(commit.files):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
            siblings.append(entry)
        payload = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "createdAt": repo.created_at,
            "lastModified": commit.date, "siblings": siblings, "cardData": _card_data(commit.files.get("README.md")),
        }
        return self._answer(request, web.json_response(payload))

    def _provider_mapping(self, request: web.Request) -> dict[str, dict[str, str]] | None:
        """The router's providers' mapping of the requested model, or None (not a model, or no router serves it)."""
        if self.provider_mapping is None or request.match_info.get("rtype") != "models":
            return None
        return self.provider_mapping(f"{request.match_info['ns']}/{request.match_info['name']}") or None

    @staticmethod
    def _expanded(request: web.Request) -> bool:
        asked = [*request.query.getall("expand", []), *request.query.getall("expand[]", [])]
        return "inferenceProviderMapping" in asked

    async def _refs(self, request: web.Request) -> web.Response:
        repo, refusal = self._find(request)
        if repo is None:
            return self._answer(request, refusal or _error(404, "Repository not found", "RepoNotFound"))
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in repo.branches.items()]
        return self._answer(request, web.json_response({"branches": branches, "converts": [], "tags": []}))

    async def _commits(self, request: web.Request) -> web.Response:
        repo, commit, refusal = self._at(request)
        if refusal is not None:
            return self._answer(request, refusal)
        assert repo is not None and commit is not None
        items: list[dict[str, Any]] = []
        current: Commit | None = commit
        while current is not None:
            items.append({"id": current.oid, "title": current.title, "message": "", "date": current.date,
                          "authors": [{"user": repo.repo_id.split("/")[0]}]})
            current = repo.commits.get(current.parent) if current.parent else None
        return self._answer(request, web.json_response(items))

    # ----- trees

    async def _tree(self, request: web.Request) -> web.Response:
        _repo, commit, refusal = self._at(request)
        if refusal is not None:
            return self._answer(request, refusal)
        assert commit is not None
        folder = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive") in ("1", "true", "True")
        expand = request.query.get("expand") in ("1", "true", "True")
        if folder and folder in commit.files:
            return self._answer(request, _error(404, f"{folder} is a file, not a folder", "EntryNotFound"))
        if folder and not any(p.startswith(folder + "/") for p in commit.files):
            return self._answer(request, _error(404, f"no folder {folder} at this revision", "EntryNotFound"))
        entries = [e for e in _entries(commit, expand) if _under(e["path"], folder, recursive)]
        return self._answer(request, web.json_response(entries))

    async def _paths_info(self, request: web.Request) -> web.Response:
        _repo, commit, refusal = self._at(request)
        if refusal is not None:
            return self._answer(request, refusal)
        assert commit is not None
        if request.content_type == "application/json":
            body = await request.json()
            paths, expand = list(body.get("paths") or []), bool(body.get("expand"))
        else:
            form = await request.post()
            paths = [str(p) for p in form.getall("paths", [])]
            expand = str(form.get("expand", "")).lower() in ("1", "true")
        by_path = {e["path"]: e for e in _entries(commit, expand)}
        found = [by_path[p.strip("/")] for p in paths if p.strip("/") in by_path]
        return self._answer(request, web.json_response(found))

    # ----- commits

    async def _preupload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._answer(request, _error(401, "Invalid username or password."))
        _repo, commit, refusal = self._at(request)
        if refusal is not None:
            return self._answer(request, refusal)
        assert commit is not None
        body = await request.json()
        files = []
        for item in body.get("files") or []:
            existing = commit.files.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(existing) if existing is not None else None})
        return self._answer(request, web.json_response({"files": files, "commitOid": commit.oid}))

    async def _commit(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._answer(request, _error(401, "Invalid username or password."))
        repo, refusal = self._find(request)
        if repo is None:
            return self._answer(request, refusal or _error(404, "Repository not found", "RepoNotFound"))
        branch = request.match_info["rev"]
        if branch not in repo.branches:
            return self._answer(request, _error(404, "Invalid rev id", "RevisionNotFound"))
        lines = [json.loads(line) for line in (await request.read()).splitlines() if line.strip()]
        if repo.failures:
            status, retry_after = repo.failures.pop(0)
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
            return self._answer(request, _error(status, "the emulated Hub was told to fail this commit", None, headers))
        if repo.races:
            repo.races -= 1
            self.move_head(repo.repo_id, repo.repo_type)
        header: dict[str, Any] = next((line["value"] for line in lines if line.get("key") == "header"), {})
        parent = header.get("parentCommit")
        head = repo.commits[repo.branches[branch]]
        if parent is not None and not head.oid.startswith(parent):
            return self._answer(request, _error(
                412, "A commit has happened since. Please refresh and try again.", "PreconditionFailed"))
        files, problem = _apply(dict(head.files), lines)
        if problem is not None:
            return self._answer(request, _error(400 if "LFS" not in problem else 422, problem))
        title = header.get("summary") or "commit"
        new = repo.commit(title, files, branch)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return self._answer(request, web.json_response({
            "success": True, "commitOid": new.oid, "hookOutput": "",
            "commitUrl": f"{self.base_url}/{prefix}{repo.repo_id}/commit/{new.oid}",
        }))

    # ----- downloads

    async def _resolve(self, request: web.Request) -> web.Response:
        _repo, commit, refusal = self._at(request)
        if refusal is not None:
            return self._answer(request, refusal)
        assert commit is not None
        path = request.match_info["path"]
        data = commit.files.get(path)
        if data is None:
            return self._answer(request, _error(404, "Entry not found", "EntryNotFound",
                                                {"X-Repo-Commit": commit.oid}))
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return self._answer(request, web.Response(status=200, headers=headers))
        span = _range(request.headers.get("Range"), len(data))
        if span is None:
            return self._answer(request, web.Response(status=200, body=data, headers=headers))
        start, end = span
        if start >= len(data):
            return self._answer(request, web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"}))
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return self._answer(request, web.Response(status=206, body=data[start:end + 1], headers=headers))

    # ----- hooks over HTTP (for a demo under `batchrun emulate`)

    async def _hook_move_head(self, request: web.Request) -> web.Response:
        repo, refusal = self._find(request)
        if repo is None:
            return self._answer(request, refusal or _error(404, "Repository not found", "RepoNotFound"))
        return self._answer(request, web.json_response({"sha": self.move_head(repo.repo_id, repo.repo_type)}))

    async def _hook_fail_commits(self, request: web.Request) -> web.Response:
        repo, refusal = self._find(request)
        if repo is None:
            return self._answer(request, refusal or _error(404, "Repository not found", "RepoNotFound"))
        body = await request.json() if request.can_read_body else {}
        self.fail_next_commits(repo.repo_id, int(body.get("status", 503)), int(body.get("count", 1)),
                               retry_after=body.get("retry_after"), repo_type=repo.repo_type)
        return self._answer(request, web.json_response({"failures": len(repo.failures)}))


def _card_data(readme: bytes | None) -> dict[str, Any] | None:
    """The YAML header of a README, as the Hub returns it in ``cardData``."""
    if not readme:
        return None
    text = readme.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    parts = text.split("---", 2)
    try:
        data = yaml.safe_load(parts[1]) if len(parts) == 3 else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _entries(commit: Commit, expand: bool) -> list[dict[str, Any]]:
    """Every file and folder of a commit as the tree API lists them, folders first at each level."""
    last = {"id": commit.oid, "title": commit.title, "date": commit.date}
    folders: set[str] = set()
    for path in commit.files:
        parts = path.split("/")[:-1]
        folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    entries: list[dict[str, Any]] = []
    for folder in sorted(folders):
        inside = sorted(p for p in commit.files if p.startswith(folder + "/"))
        oid = hashlib.sha1("\0".join(f"{p}:{git_blob_oid(commit.files[p])}" for p in inside).encode()).hexdigest()
        entry: dict[str, Any] = {"type": "directory", "oid": oid, "path": folder}
        if expand:
            entry["lastCommit"] = last
        entries.append(entry)
    for path in sorted(commit.files):
        data = commit.files[path]
        entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        if expand:
            entry["lastCommit"] = last
        entries.append(entry)
    return entries


def _under(path: str, folder: str, recursive: bool) -> bool:
    if folder:
        if not path.startswith(folder + "/"):
            return False
        rest = path[len(folder) + 1:]
    else:
        rest = path
    return recursive or "/" not in rest


def _apply(files: dict[str, bytes], lines: list[dict[str, Any]]) -> tuple[dict[str, bytes], str | None]:
    """The files after a commit's operations, or the reason the Hub would refuse them."""
    for line in lines:
        key, value = line.get("key"), line.get("value") or {}
        if key == "file":
            if value.get("encoding") != "base64":
                return files, "file content must be base64"
            files[value["path"]] = base64.b64decode(value["content"])
        elif key == "deletedFile":
            if value["path"] not in files:
                return files, f"A file with this name doesn't exist: {value['path']}"
            del files[value["path"]]
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        elif key == "lfsFile":
            return files, "LFS and Xet uploads are not emulated: the emulated Hub answers 'regular' for every file"
        elif key not in ("header", None):
            return files, f"the emulated Hub does not support commit operation {key!r}"
    return files, None


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for a single ``bytes=`` range, or None for the whole file."""
    if not header or not header.startswith("bytes="):
        return None
    spec = header[len("bytes="):].split(",")[0].strip()
    first, _, last = spec.partition("-")
    if not first:  # a suffix: the last N bytes
        n = int(last)
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    return start, min(end, size - 1)
