"""Image seeds across processes: derive_seed gives the same seed in another interpreter."""

from __future__ import annotations

import subprocess
import sys

from batchrun.images import (
    derive_seed,
)

# --------------------------------------------------------------------------------------------------
# The output schema


# --------------------------------------------------------------------------------------------------
# Seeds


def test_derive_seed_is_the_same_in_every_process():
    # Computed once; a change here means every derived seed (and so every picture) changed.
    assert derive_seed("row-42") == 1874453070
    assert derive_seed(42) == 726309938
    # A fresh interpreter, with its own string-hash salt, agrees.
    code = "from batchrun.images import derive_seed; print(derive_seed('row-42'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1874453070"


# --------------------------------------------------------------------------------------------------
# Generated images


# --------------------------------------------------------------------------------------------------
# Input images


# --------------------------------------------------------------------------------------------------
# Data URLs
