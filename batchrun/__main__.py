"""`python -m batchrun` is the `batchrun` command."""

import sys

from .cli import main

sys.exit(main())
