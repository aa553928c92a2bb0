"""What a fresh interpreter loads: the task registry, the spec and validate of a text job import no more than they
need.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------- registry


def test_importing_the_registry_and_the_spec_loads_neither_pyarrow_nor_pillow() -> None:
    code = ("import sys, batchrun.spec, batchrun.tasks; "
            "print(sorted(m for m in ('pyarrow', 'PIL', 'numpy', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("job", ["poems", "quickstart", "textgen", "conversations", "structured", "openai_batch"])
def test_validate_of_a_text_job_loads_neither_pillow_nor_datasets_nor_aiohttp(job: str) -> None:
    # validate's whole code path, in a fresh interpreter: the modules it leaves behind are what it imported.
    code = ("import io, sys; from batchrun.cli import main; out, sys.stdout = sys.stdout, io.StringIO(); "
            f"code = main(['validate', 'jobs/{job}.yaml']); sys.stdout = out; "
            "print(code, sorted(m for m in ('PIL', 'datasets', 'aiohttp') if m in sys.modules))")
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert done.stdout.strip() == "0 []", done.stderr
