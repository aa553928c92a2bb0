"""The command line: one small function per subcommand, in the order `batchrun --help` lists them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from batchrun import __version__
from batchrun.facts import GRACE_S

from .endpoints import cmd_emulate, cmd_endpoint
from .jobs import cmd_run, cmd_schema, cmd_status, cmd_validate
from .outputs import cmd_compare, cmd_export, cmd_preview, cmd_push, cmd_runs

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EPILOG = """\
exit codes: 0 every row succeeded, 1 the job finished but some rows failed,
            2 nothing ran (bad spec, input or token), 3 stopped early (resumable);
            batchrun compare: 4 a --fail-if threshold was crossed

The token comes from huggingface_hub: the HF_TOKEN environment variable or `hf auth login`.
It is never accepted on the command line and never printed.

examples:
  batchrun validate jobs/quickstart.yaml
  batchrun run jobs/quickstart.yaml
  batchrun status jobs/quickstart.yaml
  batchrun preview out/images --limit 100
  batchrun export out/openai_batch --format openai-batch --to results.jsonl
  batchrun push out/quickstart --repo my-org/quickstart-answers
  batchrun emulate --port 8080
"""

EXPORT_DESCRIPTION = """\
Write the rows an output folder has committed (never a shard still being written) as JSON lines.

  --format jsonl          one result row a line, every column (bytes as base64 text)
  --format openai-batch   OpenAI's batch output format, for the output of an input.openai_batch job:
                          {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
                          read by code written for OpenAI's batch files and by vLLM's BatchRequestOutput

Failed rows (retryable ones too: run the job again first to retry them) become lines with an error:
{"response": null (or the status code), "error": {"code", "message"}} in the openai-batch format, the
failure columns (error_type, error, status, ...) in jsonl. They go to --errors FILE if given, else
into the same file as the results.
"""


SCHEMA_DESCRIPTION = """\
Print the JSON Schema of a job spec file: every key, its type, range and default, and unknown keys
refused at every level. Editors that use the YAML language server (VS Code's YAML extension, Neovim,
JetBrains IDEs) then complete and check job files as you type:

  batchrun schema > batchrun.schema.json

and make this the first line of a job file (the path is relative to the job file):

  # yaml-language-server: $schema=../batchrun.schema.json

The schema checks the spec's shape; `batchrun validate JOB.yaml` checks the rest (the task's keys,
the template's columns, the input, the output folder, the token's hosts).
"""


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `batchrun` command line, its help included."""
    parser = argparse.ArgumentParser(
        prog="batchrun",
        description="Run big offline inference jobs on Hugging Face Inference Endpoints (resumed, then paused on "
        "every way out), Inference Providers, OpenAI-compatible APIs and their batch APIs, or TEI: requests fanned "
        "out with backpressure, rate limits and retries, results in Parquet exactly once, resumable after any crash.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batchrun {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v events, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_validate(sub)
    _add_schema(sub)
    _add_run(sub)
    _add_status(sub)
    _add_preview(sub)
    _add_export(sub)
    _add_push(sub)
    _add_runs(sub)
    _add_compare(sub)
    _add_endpoint(sub)
    _add_emulate(sub)
    return parser


def _add_validate(sub: Subparsers) -> None:
    p = sub.add_parser("validate", help="check a job spec, its input and output; sends nothing",
                       description="Check the spec, read the input schema, render the prompt for the first rows, "
                       "check the output folder and the token. Sends no request and changes no endpoint.")
    p.add_argument("job", help="job spec file (YAML), e.g. jobs/quickstart.yaml")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output.path)")
    p.add_argument("--check-endpoint", action="store_true",
                   help="also read the endpoint's state from the control plane (read-only, costs nothing)")
    p.set_defaults(func=cmd_validate)


def _add_schema(sub: Subparsers) -> None:
    p = sub.add_parser("schema", help="print the job spec's JSON Schema (editor completion and checks)",
                       description=SCHEMA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_schema)


def _add_run(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="run or resume a job",
                       description="Run the job. Rows already done are skipped, so running it again resumes. "
                       "Ctrl-C, SIGTERM or SIGHUP (a closed terminal) stops reading, lets requests in flight finish, "
                       "commits, pauses the endpoint and exits 3; a second signal, or SIGQUIT, abandons requests in "
                       "flight at once.")
    p.add_argument("job", help="job spec file (YAML)")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output.path)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: move the previous output aside (to DIR.previous-TIMESTAMP; nothing is deleted)")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "off"], default="auto",
                   help="progress display: a bar on a terminal, periodic lines otherwise (default: auto)")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry the final failures of earlier runs too (a 404 or 422 whose cause is fixed): their "
                   "rows are sent again and each one's new record replaces its old failure; good rows are kept")
    p.add_argument("--summary-every", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="seconds between progress lines when not on a terminal (default: 30)")
    p.add_argument("--grace", type=_positive_seconds, default=GRACE_S, metavar="SECONDS",
                   help=f"on Ctrl-C, SIGTERM or SIGHUP, how long requests in flight may finish (default: {GRACE_S:g}); "
                   "a second signal, or SIGQUIT, abandons them at once. The endpoint is released either way.")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="with output.path holding {date}, {time} or {run_id}: resume this run (its folder or run "
                   "id) instead of starting a new folder")
    p.add_argument("--compare-with", metavar="RUN", default=None,
                   help="at the end, compare with RUN (a folder, or `previous`: the latest earlier run beside this "
                   "one); the verdict goes to the notification. Never changes the exit code")
    p.add_argument("--shard", metavar="I/N",
                   help="run shard I (from 0) of N of the job, into the job's output; 'auto' reads "
                   "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, or Kubernetes' JOB_COMPLETION_INDEX with "
                   "--shard-count (docs/shards.md)")
    p.add_argument("--shard-count", type=int, metavar="N", default=None,
                   help="the number of shards, for --shard auto under a scheduler that does not say it "
                   "(default: the spec's `shards`)")
    p.set_defaults(func=cmd_run)


def _add_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="done / failed / remaining rows, from the output folder alone")
    p.add_argument("job", help="job spec file (YAML), or the output folder itself")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output.path)")
    p.set_defaults(func=cmd_status)


def _add_preview(sub: Subparsers) -> None:
    p = sub.add_parser("preview", help="write a static HTML contact sheet of an output folder",
                       description="Write one self-contained HTML page showing the first results of an output "
                       "folder: generated images with their prompt and seed, input images with their answer, or a "
                       "table of answers. It opens from disk; nothing is served.")
    p.add_argument("output", metavar="OUTPUT", help="the job's output folder (output.path or --output)")
    p.add_argument("--html", metavar="FILE", default=None,
                   help="where to write the page (default: OUTPUT/preview.html)")
    p.add_argument("--limit", type=int, default=60, metavar="N", help="show at most N results (default: 60)")
    p.set_defaults(func=cmd_preview)


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="write an output folder's committed rows as JSON lines",
                       description=EXPORT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                       "  batchrun export out/openai_batch --format openai-batch --to results.jsonl "
                       "--errors errors.jsonl\n"
                       "  batchrun export out/quickstart --to quickstart.jsonl")
    p.add_argument("output", metavar="OUTPUT", help="the job's output folder (output.path or --output)")
    p.add_argument("--format", choices=["jsonl", "openai-batch"], default="jsonl",
                   help="jsonl: one result row a line; openai-batch: OpenAI's batch output lines (default: jsonl)")
    p.add_argument("--to", metavar="FILE", required=True, help="the file to write (replaced whole when complete)")
    p.add_argument("--errors", metavar="FILE", default=None,
                   help="write failed rows here instead of into --to (default: into --to)")
    p.set_defaults(func=cmd_export)


def _add_push(sub: Subparsers) -> None:
    p = sub.add_parser("push", help="publish an output folder as a dataset repo on the Hugging Face Hub",
                       description="Publish the committed shards of an output folder as a dataset repo, with a "
                       "generated card: only the shards the repo lacks are uploaded, in one commit with the card, "
                       "against the revision read (a racing commit makes it read again). Safe to run again at any "
                       "time, also while the job runs. See docs/hub.md.")
    p.add_argument("output", metavar="OUTPUT", help="the job's output folder (output.path or --output)")
    p.add_argument("--repo", metavar="ORG/NAME", default=None,
                   help="the dataset repo (default: the spec's output.push_to_hub.repo)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    p.add_argument("--config", metavar="NAME", default=None,
                   help="the config to push as (default: 'default'); one repo may hold several jobs as configs")
    p.add_argument("--split", metavar="NAME", default=None, help="the split name (default: train)")
    p.add_argument("--step", metavar="NAME", default=None,
                   help="a job of several steps: the step pushed (default: its last)")
    p.add_argument("--all-steps", action="store_true",
                   help="a job of several steps: push every step, each as the config named after it")
    p.add_argument("--include-failed", action="store_true",
                   help="also push the failed rows, as a config of their own ('failed', or CONFIG-failed)")
    p.add_argument("--endpoint", metavar="URL", default=None,
                   help="the Hub's base url (default: huggingface_hub's, which honours HF_ENDPOINT)")
    p.set_defaults(func=cmd_push)


def _add_runs(sub: Subparsers) -> None:
    p = sub.add_parser("runs", help="list the runs under a folder, one line each",
                       description="One line per output folder under FOLDER (up to 4 levels down), oldest first: "
                       "when it started, the model revision served, rows ok and failed, p50 latency, cost and the "
                       "run's exit code.")
    p.add_argument("folder", metavar="FOLDER", help="e.g. out/nightly (the part of output.path before {date})")
    p.set_defaults(func=cmd_runs)


def _add_compare(sub: Subparsers) -> None:
    p = sub.add_parser("compare", help="compare two runs (answers, latency, failures, cost, revision)",
                       description="Join two output folders on id (and sample) and report what changed: ids in one "
                       "run only, identical answers and the similarity of the rest, finish reasons, lengths, "
                       "latency, failures, cost, scores, model revision and parameters.",
                       epilog="exit codes: 0 no --fail-if threshold crossed; 4 a threshold was crossed; "
                       "2 a run cannot be read or --fail-if is malformed.\n"
                       "metrics: changed, similarity, failed_rate, p50_latency, p95_latency, cost, missing, "
                       "revision_changed, score_<name>; VALUEx means VALUE times run A's figure.\n"
                       "example: batchrun compare out/nightly/2026-01-14 out/nightly/2026-01-15 --html r.html "
                       "--fail-if 'changed>0.2,failed_rate>0.01,p95_latency>1.5x'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", metavar="RUN_A", help="the earlier run's output folder")
    p.add_argument("run_b", metavar="RUN_B", help="the later run's output folder")
    p.add_argument("--step", metavar="NAME", default=None,
                   help="a job of several steps: the step compared (default: its last that sends requests)")
    p.add_argument("--html", metavar="FILE", default=None, help="also write a self-contained HTML report")
    p.add_argument("--fail-if", metavar="THRESHOLDS", default=None,
                   help="comma-separated METRIC>VALUE / METRIC<VALUE; exit 4 when one is crossed")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_compare)


def _add_endpoint(sub: Subparsers) -> None:
    p = sub.add_parser("endpoint", help="look at, pause or resume a Dedicated Inference Endpoint; bracket a job's "
                       "shards", description="For the morning after a bad night: see an endpoint's state, or pause "
                       "it (status|pause|resume|scale-to-zero NAME --namespace NS). For a job split into shards: "
                       "`up JOB.yaml` resumes and scales the job's endpoint before the array and keeps it up until "
                       "`down JOB.yaml`, which puts it back as the user had it once no shard still uses it "
                       "(docs/shards.md).")
    p.add_argument("action", choices=["status", "pause", "resume", "scale-to-zero", "up", "down"])
    p.add_argument("name", help="endpoint name; for up and down, the job spec (JOB.yaml)")
    p.add_argument("--namespace", default=None, help="user or organization that owns the endpoint")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="up and down: the job's output folder, when the shards run with --output")
    p.add_argument("--api-url", metavar="URL", default=None,
                   help="control-plane base ending in /v2 (default: huggingface_hub's own)")
    p.set_defaults(func=cmd_endpoint)


def _add_emulate(sub: Subparsers) -> None:
    p = sub.add_parser("emulate", help="run the local Inference Endpoint emulator until stopped",
                       description="Serve a local Inference Endpoint emulator on loopback: the control plane "
                       "(/v2/endpoint/...) and one data plane per endpoint (TGI or text-to-image).")
    p.add_argument("--port", type=int, default=None, help="control-plane port (default: from config, else a free one)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--config", metavar="FILE", help="emulator config (YAML); see docs/emulator.md")
    p.set_defaults(func=cmd_emulate)
