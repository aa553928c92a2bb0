"""The commands that act on a job spec: `validate`, `run`, `status` and `schema`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrun.errors import BatchrunError, redact

from .terminal import echo

if TYPE_CHECKING:  # the commands load what they use when they run: `batchrun --help` stays quick
    from batchrun.output import OutputStatus
    from batchrun.spec import JobSpec


def _load(args: argparse.Namespace) -> JobSpec:
    from batchrun.spec import load_spec

    spec = load_spec(args.job, output_override=getattr(args, "output", None))
    return _this_run_folder(spec, args)


def _spec_of_output(folder: Path) -> JobSpec:
    """The spec an output folder was written with (its state/job.json): a job run from Python has no file."""
    import dataclasses

    from batchrun.errors import OutputError
    from batchrun.output import OutputStore
    from batchrun.spec import INPUT_KINDS, parse_spec

    job = OutputStore(folder).load_job()
    if not job or not isinstance(job.get("spec"), dict):
        raise OutputError(f"{folder}: not a batchrun output folder (no state/job.json)")
    raw = job["spec"]
    given = raw.get("input")
    in_memory = not (isinstance(given, dict) and any(kind in given for kind in INPUT_KINDS))
    spec = parse_spec(raw, file=str(OutputStore(folder).state_dir / "job.json"), in_memory=in_memory)
    return dataclasses.replace(spec, output=dataclasses.replace(spec.output, path=str(folder)))


def _this_run_folder(spec: JobSpec, args: argparse.Namespace) -> JobSpec:
    """A templated output.path ({date}, {time}, {run_id}): `--resume RUN` picks a run; `status` shows
    the latest; `run` leaves it to the runner, which gives the run a new folder."""
    import dataclasses

    from batchrun.provenance import has_template, resolve_output, template_root
    from batchrun.runs import find_runs

    resume = getattr(args, "resume", None)
    path = None
    if resume is not None:
        path, _ = resolve_output(spec.output.path, resume=resume)
    elif has_template(spec.output.path) and args.func in (cmd_status, cmd_validate):
        runs = find_runs(template_root(spec.output.path))
        path = str(runs[-1].folder) if runs and args.func is cmd_status else resolve_output(spec.output.path)[0]
    if path is None:
        return spec
    return dataclasses.replace(spec, output=dataclasses.replace(spec.output, path=path))


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from batchrun.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from batchrun.preflight import preflight, unencodable_note

    spec = _load(args)
    steps = spec.steps
    if steps:  # a job of several steps: the first is checked whole; the others read rows not written yet
        import dataclasses

        from batchrun.steps import step_folders

        first = steps[0].job
        assert first is not None
        folder = str(step_folders(spec.output.path, spec)[steps[0].name])
        spec = dataclasses.replace(first, output=dataclasses.replace(first.output, path=folder), file=spec.file)
    pre = asyncio.run(preflight(spec, check_endpoint=args.check_endpoint))
    out = sys.stdout
    if steps:
        print(f"steps: {', '.join(s.name + ' (' + (s.job.task if s.job else 'filter') + ')' for s in steps)}; "
              f"the first is checked below, the others when the rows they read are written", file=out)
    print(f"spec ok: {spec.file or args.job} (job {spec.name!r}, task {spec.task})", file=out)
    print(f"input: {pre.source.description}", file=out)
    print(f"  columns: {', '.join(f'{f.name} ({f.type})' for f in pre.source.schema)}", file=out)
    print(f"  rows: {pre.count if pre.count is not None else 'unknown until read (streamed)'}", file=out)
    replaced = unencodable_note(pre.unencodable)
    if replaced:
        print(f"  note: {replaced}", file=out)
    for row_id, prompt in pre.prompt_previews:
        shown = prompt if len(prompt) <= 200 else prompt[:197] + "..."
        print(f"  prompt for id {row_id!r}: {shown}", file=out)
    print(f"output: {spec.output.path} (writable)", file=out)
    e = spec.endpoint
    where = e.url or (f"{e.namespace}/{e.name}" if e.name else "the built-in emulator (local)")
    if e.per_token:  # a serverless target: where, which model, and its price
        where = (f"Inference Providers, provider {e.provider}, model {e.model}" if e.provider is not None
                 else f"{e.url}, model {e.model}")
        where += " (the built-in emulator's router)" if e.router_url == "local" else ""
        if e.price is not None and e.price.input_per_mtok is None:  # a provider's images
            from batchrun.cost import ImagePrice

            where += f", {ImagePrice(e.price.per_image or 0.0, e.price.per_megapixel or 0.0)}"
        elif e.price is not None:
            where += f", ${e.price.input_per_mtok:g}/${e.price.output_per_mtok:g} per 1M tokens in/out"
    note = pre.endpoint_check.note if pre.endpoint_check is not None else None
    print(f"endpoint: {where}" + (f" [{note}]" if note else " (not contacted; --check-endpoint asks it)"), file=out)
    print(f"token: {_token_line(spec) if pre.token else 'none'}", file=out)
    print("nothing was sent.", file=out)
    return 0


def _token_line(spec: Any) -> str:
    """Where the token goes (transport.token_problem), for ``validate``."""
    from batchrun.transport import token_destinations

    sent, withheld = token_destinations(spec)
    line = "found" + (f"; sent to {', '.join(sent)}" if sent else "")
    if withheld:
        line += (f"; not sent to {', '.join(withheld)} (not a Hugging Face host: endpoint.send_token: true "
                 "sends it, over https only)")
    return line


def cmd_run(args: argparse.Namespace) -> int:
    from batchrun.runner import RunOptions, run_job

    spec = _load(args)
    if args.shard is not None:  # one shard of the job, writing its part of the output (shards.py)
        from batchrun.shards import JobShard, sharded_spec

        spec = sharded_spec(spec, JobShard.parse(args.shard, count=args.shard_count or spec.shards))
        echo(f"shard {spec.shard}: output {spec.output.path} (state in state/shards/{spec.shard.folder})")
        if spec.budget.max_usd is not None:
            echo(f"note: budget.max_usd (${spec.budget.max_usd:g}) holds for each shard on its own: the shards of "
                  "a job do not add up their spending (docs/shards.md)")
    options = RunOptions(
        fresh=args.fresh,
        retry_failed=args.retry_failed,
        progress=args.progress,
        summary_interval_s=args.summary_every,
        grace_s=args.grace,
        echo=echo,
        compare_with=args.compare_with,
    )
    try:
        if spec.steps:  # a job of several steps: each run as a job of its own (steps.py)
            from batchrun.steps import run_steps

            outcome = asyncio.run(run_steps(spec, options))
        else:
            outcome = asyncio.run(run_job(spec, options))
    except BatchrunError as exc:  # nothing ran (exit 2): a scheduled job still says so
        _notify_error(spec, exc)
        raise
    return outcome.exit_code


def _notify_error(spec: JobSpec, exc: BatchrunError) -> None:
    if spec.notify is None:
        return
    from batchrun.notify import build_payload, post_notification

    summary = {"job": spec.name, "outcome": f"did not run: {redact(str(exc))}", "exit_code": exc.exit_code,
               "rows": {}, "output": spec.output.path}
    asyncio.run(post_notification(spec.notify, build_payload(summary), echo=echo))


def cmd_status(args: argparse.Namespace) -> int:
    from batchrun.cost import Spent
    from batchrun.output import OutputStore, read_lock, read_status

    spec = _spec_of_output(Path(args.job)) if Path(args.job).is_dir() else _load(args)
    # An object store is counted from its commit records, without reading a part.
    root: str | Path = spec.output.path if "://" in spec.output.path else Path(spec.output.path)
    if spec.steps:
        return _print_steps_status(spec, Path(root))
    shown = root
    if OutputStore.shard_names(root):  # a split job: the union of its shards
        from batchrun.shards import print_union

        return print_union(root, shown=shown)
    status = read_status(root)
    lock = read_lock(root)
    if status.job is None and not status.data_shards and not status.failed_shards:
        print(f"{shown}: no run yet (nothing written)")
        return 0
    print(f"output: {shown}")
    if lock is not None and lock.running:
        who = lock.holder.describe() if lock.holder is not None else "a process whose record cannot be read"
        print(f"  running now: {who}")
    unit = "rows"
    if spec.samples > 1:  # counted in (id, sample) units
        unit = "samples"
        print(f"  {spec.samples} samples per row: the counts below are samples, each an (id, sample) pair")
    print(f"  ok: {status.ok} {unit} in {status.data_shards} shard(s)")
    print(f"  failed: {status.failed} final, {status.failed_retryable} retryable (tried again on the next run)")
    from batchrun.batches import describe_batches

    batches = describe_batches(OutputStore(root))
    if batches:
        print(f"  {batches}")
    _print_remaining(spec, status)
    spent = Spent.from_record((OutputStore.parts(root)[0] if "://" in str(root) else OutputStore(root)).load_spend())
    if spent.runs:
        print(f"  spent: ${spent.usd:.4f} over {spent.runs} run(s) ({spent.replica_hours:.3f} replica-hours)"
              + (f" of budget.max_usd ${spec.budget.max_usd:g}" if spec.budget.max_usd is not None else ""))
    if status.last_summary:
        s = status.last_summary
        print(f"  last run: {s.get('outcome')} at {s.get('started_at')} (exit {s.get('exit_code')})")
    _print_mismatch(spec, status.job)
    return 0


def _print_steps_status(spec: JobSpec, root: Path) -> int:
    """A job of several steps: each step's rows, from its own folder, in order."""
    from batchrun.output import OutputStore, read_status
    from batchrun.steps import step_folders

    print(f"output: {root} ({len(spec.steps)} steps)")
    for step in spec.steps:
        folder = step_folders(root, spec)[step.name]
        what = f"filter {step.filter}" if step.job is None else (step.job.task + (f", filter {step.filter}"
                                                                                 if step.filter else ""))
        if not OutputStore(folder).exists():
            print(f"  step {step.name} ({what}): not run yet")
            continue
        status = read_status(folder)
        print(f"  step {step.name} ({what}): {status.ok} ok, {status.failed} failed, "
              f"{status.failed_retryable} retryable; {folder}")
    last = OutputStore(root).load_summary() if OutputStore(root).exists() else None
    if last:
        print(f"  last run: {last.get('outcome')} at {last.get('started_at')} (exit {last.get('exit_code')})")
    return 0


def _print_remaining(spec: JobSpec, status: OutputStatus) -> None:
    """How much of the input the output covers, said plainly even when the input shrank (a lower limit)."""
    from batchrun.sources import open_source

    try:
        total = open_source(spec.input).count()
    except BatchrunError:
        return
    if total is None:
        return
    total *= spec.samples  # units of (id, sample), like the counts
    recorded = status.ok + status.failed
    if recorded > total:
        print(f"  remaining: 0 of {total}; the output holds {recorded - total} more rows than the input now gives "
              "(input.limit was lowered, or the input shrank): they stay, and the next run sends nothing for them")
        return
    print(f"  remaining: {total - recorded} of {total} (including retryable failures)")


def _print_mismatch(spec: JobSpec, job: dict[str, Any] | None) -> None:
    """Warn when the spec no longer matches the output, which `batchrun run` would refuse."""
    from batchrun.preflight import compare_identity

    if not job:
        return
    stored = dict(job.get("identity") or {})
    stored.pop("input", None)  # the input's content is checked by run; status does not read it all
    changed = compare_identity(stored, dict(spec.identity()))
    if changed:
        print(f"  warning: the spec no longer matches this output ({'; '.join(changed)}); `batchrun run` would "
              "refuse to resume it: restore those values, use --output DIR, or run with --fresh")
