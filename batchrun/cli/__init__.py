"""The `batchrun` command.

    batchrun validate JOB.yaml     check everything, spend nothing
    batchrun schema                the job spec's JSON Schema, for editors that complete and check job files
    batchrun run JOB.yaml          run or resume the job (Ctrl-C is safe; run again to resume)
    batchrun status JOB.yaml       done / failed / remaining, from the output folder alone
    batchrun preview OUTPUT        a static HTML contact sheet of the results (images with prompts)
    batchrun export OUTPUT --to F  the committed rows as JSON lines, plain or in OpenAI's batch output format
    batchrun push OUTPUT --repo ORG/NAME   publish the output as a dataset on the Hugging Face Hub
    batchrun runs DIR              the runs under a folder, one line each
    batchrun compare A B           two runs side by side (--html, --fail-if for a scheduled job)
    batchrun endpoint status|pause|resume NAME --namespace NS
    batchrun endpoint up|down JOB.yaml   bracket a job's shards: the endpoint stays up between the two
    batchrun emulate               a local Inference Endpoint emulator on loopback

Exit codes (reliability.md §6): 0 every row succeeded; 1 finished with failed rows; 2 nothing ran
(bad spec, input or auth); 3 stopped early and resumable.
"""

from __future__ import annotations

import argparse
import sys

from batchrun.errors import BatchrunError, redact
from batchrun.facts import ExitCode

from .endpoints import _bracket_line as _bracket_line  # the tests read it here, as before
from .outputs import cmd_compare, cmd_export, cmd_preview, cmd_push, cmd_runs
from .parser import build_parser
from .terminal import QuietPipe, setup_logging

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """The `batchrun` command: parse ``argv`` (default: the command line), run it, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    stdout, sys.stdout = sys.stdout, QuietPipe(sys.stdout)
    try:
        return _main(args)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _read_from_stores(args: argparse.Namespace) -> None:
    """A reader given an output in an object store (s3://, gs://) reads a local copy of its committed union."""
    if args.func not in (cmd_preview, cmd_export, cmd_push, cmd_compare, cmd_runs):
        return
    from batchrun.output.remote import readable

    for name in ("output", "folder", "run_a", "run_b"):
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" in value:
            setattr(args, name, str(readable(value)))


def _main(args: argparse.Namespace) -> int:
    try:
        _read_from_stores(args)
        return int(args.func(args) or 0)
    except BatchrunError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.STOPPED_EARLY
    except Exception:  # a bug: the endpoint was released on the way out; say so, and where it broke
        import traceback

        print(redact(traceback.format_exc()), file=sys.stderr)
        print(
            "error: batchrun stopped on an internal error (above). The endpoint was released and every "
            "committed row is kept: run the same command again to resume.",
            file=sys.stderr,
        )
        return ExitCode.STOPPED_EARLY
