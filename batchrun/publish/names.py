"""Names a push checks before it reads or sends anything: the repo id, the config and the split.

Kept apart from the layout (no pyarrow here) so that the spec parser can check them cheaply.
"""

from __future__ import annotations

import re

__all__ = ["failed_config_name", "name_problem", "repo_problem"]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def repo_problem(repo: object) -> str | None:
    """Why ``repo`` is not a dataset repo id ``ORG/NAME`` the Hub accepts, or None."""
    if not isinstance(repo, str) or repo.count("/") != 1:
        return f"expected a repo id like ORG/NAME, got {repo!r}"
    for part in repo.split("/"):
        if not _SEGMENT.match(part) or ".." in part or "--" in part or part.endswith((".", "-", ".git")):
            return (f"{repo!r} is not a valid repo id: each of ORG and NAME is 1-96 letters, digits, '-', '_' or "
                    "'.', not starting or ending with '-' or '.', without '--' or '..'")
    return None


def name_problem(name: object, what: str) -> str | None:
    """Why ``name`` cannot be a config or split name (it becomes a folder and a file prefix), or None."""
    if not isinstance(name, str) or not _NAME.match(name):
        return f"the {what} name must be 1-64 letters, digits, '-' or '_', got {name!r}"
    return None


def failed_config_name(config: str) -> str:
    """The config that holds a data config's failed rows."""
    return "failed" if config == "default" else f"{config}-failed"
