"""The README's quickstart, run as a user runs it: the installed `batchrun` console script, a process of its own.

Most tests call `batchrun.cli.main([...])` in-process (tests/jobkit.py `cli`); these few keep the whole
path from the shell: the entry point, the interpreter's start, a real exit code and real output streams.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from jobkit import REPO, read_ids

pytestmark = pytest.mark.end_to_end


def _console_script() -> str:
    """The `batchrun` that `pip install -e .` put beside this interpreter (or, failing that, on PATH)."""
    beside = Path(sys.executable).parent / "batchrun"
    found = str(beside) if beside.exists() else shutil.which("batchrun")
    if found is None:
        pytest.skip("no batchrun console script is installed beside this interpreter or on PATH")
    return found


def test_the_readme_quickstart_runs_the_200_row_job_on_the_emulator_and_pauses_it(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run([_console_script(), "run", "jobs/quickstart.yaml", "--output", str(out), "--progress", "off"],
                            cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert len(set(read_ids(out / "data"))) == 200
    assert "paused" in result.stderr and "Traceback" not in result.stderr


def test_python_dash_m_batchrun_answers_help_and_exits_zero():
    result = subprocess.run([sys.executable, "-m", "batchrun", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "validate" in result.stdout
