"""Every example job in jobs/ passes `batchrun validate` from a fresh clone, as a new user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobkit import REPO, cli

JOBS = sorted(path.relative_to(REPO) for path in (REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[path.stem for path in JOBS])
def test_the_example_job_validates(job: Path) -> None:
    result = cli("validate", str(job))
    assert result.returncode == 0, result.stderr
    assert "nothing was sent" in result.stderr + result.stdout
