"""The commands that read what jobs wrote: `runs`, `compare`, `preview`, `export` and `push`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from batchrun.errors import redact
from batchrun.facts import ExitCode

from .terminal import echo


def cmd_runs(args: argparse.Namespace) -> int:
    from batchrun.errors import OutputError
    from batchrun.runs import find_runs, format_runs

    root = Path(args.folder)
    if not root.is_dir():
        raise OutputError(f"{root} is not a folder")
    lines = find_runs(root)
    if not lines:
        print(f"{root}: no runs (no state/job.json within {root})")
        return 0
    print(format_runs(lines, root))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from batchrun.compare import CompareError, compare_runs, format_report, parse_fail_if
    from batchrun.compare_html import write_compare_html

    thresholds = parse_fail_if(args.fail_if) if args.fail_if else []
    if args.html and not Path(args.html).parent.is_dir():  # refused before the runs are read
        raise CompareError(f"--html {args.html}: no such folder {Path(args.html).parent}")
    run_a, run_b = (_step_folder(run, args.step, sending=True) for run in (args.run_a, args.run_b))
    report = compare_runs(run_a, run_b)
    report.check_thresholds(thresholds)
    if args.json:
        print(json.dumps({**report.to_dict(), "verdict": report.verdict(thresholds)}, indent=2, default=str))
    else:
        print(format_report(report, thresholds))
    if args.html:
        print(f"report: {write_compare_html(report, args.html, thresholds)}", file=sys.stderr)
    return ExitCode.THRESHOLD_CROSSED if report.verdict(thresholds)["crossed"] else ExitCode.OK


def _step_folder(root: str, step: str | None, *, sending: bool = False) -> Path:
    """A job of several steps is read through one of its steps (compare, push): ``--step``, or its last
    (``sending``: its last that sends requests)."""
    from batchrun.errors import OutputError
    from batchrun.steps import step_folder

    try:
        return step_folder(root, step, sending=sending)
    except ValueError as exc:
        raise OutputError(str(exc)) from None


def cmd_preview(args: argparse.Namespace) -> int:
    from batchrun.errors import OutputError
    from batchrun.output import OutputStore
    from batchrun.preview import write_preview

    root = Path(args.output)
    if not root.is_dir():
        raise OutputError(f"{root} is not an output folder (no such directory)")
    if OutputStore.job_of(root) is None:  # the page would be written into any folder named by mistake
        raise OutputError(f"{root} is not a batchrun output folder (no state/job.json): nothing to preview")
    if args.limit < 0:
        raise OutputError(f"--limit must be 0 or more, got {args.limit}")
    html = Path(args.html) if args.html else root / "preview.html"
    try:
        written = write_preview(root, html, limit=args.limit)
    except OSError as exc:
        raise OutputError(f"cannot write the preview {html}: {exc}") from None
    print(written)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from batchrun.export import export_output

    counts = export_output(args.output, fmt=args.format, to=args.to, errors=args.errors)
    where = f"{counts.failures} failure(s) to {args.errors}" if args.errors else f"{counts.failures} failure(s)"
    print(f"wrote {counts.results} result(s) to {args.to}; {where}"
          + ("" if args.errors else " in the same file"))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from batchrun.errors import OutputError
    from batchrun.output import OutputStore
    from batchrun.publish import PublishError, Target, push_output
    from batchrun.steps import steps_of_output

    if args.all_steps:  # a job of several steps: each step its own config, named after it
        steps = steps_of_output(args.output)
        if steps is None:
            raise OutputError(f"{args.output} is not the output of a job of several steps: --all-steps does not apply")
        for step in steps:
            code = cmd_push(argparse.Namespace(**{**vars(args), "all_steps": False, "step": step["name"],
                                                  "config": step["name"]}))
            if code:
                return code
        return 0
    root = _step_folder(args.output, args.step)
    job = OutputStore.job_of(root) if root.is_dir() else None  # a split job: its shards' one spec
    if job is None:
        raise OutputError(f"{root} is not a batchrun output folder (no state/job.json)")
    # The spec's output.push_to_hub gives what the command line does not.
    stored = ((job.get("spec") or {}).get("output") or {}).get("push_to_hub") or {}
    repo = args.repo or stored.get("repo")
    if not repo:
        raise PublishError("--repo ORG/NAME is required (the job's spec has no output.push_to_hub.repo)")
    target = Target(
        repo=repo,
        config=args.config or stored.get("config") or "default",
        split=args.split or stored.get("split") or "train",
        private=args.private or bool(stored.get("private")),
        include_failed=args.include_failed or bool(stored.get("include_failed")),
        endpoint=args.endpoint or stored.get("endpoint"),
    )
    if target.endpoint:  # the token goes with every Hub call: a url typed here counts as the opt-in
        from batchrun.transport import token_problem

        problem = token_problem(target.endpoint, send_token=bool(args.endpoint or stored.get("send_token")))
        if problem is not None:
            raise PublishError(f"the token would not go to {redact(target.endpoint)}: {problem}; nothing was pushed")
    result = push_output(root, target, echo=echo)
    print(result.describe())
    return 0
