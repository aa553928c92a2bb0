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
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import BatchrunError, redact
from .facts import GRACE_S, ExitCode

if TYPE_CHECKING:  # the commands load what they use when they run: `batchrun --help` stays quick
    from .emulator import Emulator
    from .endpoints.base import BracketResult
    from .endpoints.control_plane import EndpointSnapshot
    from .output import OutputStatus
    from .spec import JobSpec

__all__ = ["main"]

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


class _RedactingFilter(logging.Filter):
    """Scrubs registered secrets from every log record, whatever logger produced it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _echo(message: str) -> None:
    print(redact(message), file=sys.stderr, flush=True)


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _load(args: argparse.Namespace) -> JobSpec:
    from .spec import load_spec

    spec = load_spec(args.job, output_override=getattr(args, "output", None))
    return _this_run_folder(spec, args)


def _spec_of_output(folder: Path) -> JobSpec:
    """The spec an output folder was written with (its state/job.json): a job run from Python has no file."""
    import dataclasses

    from .errors import OutputError
    from .output import OutputStore
    from .spec import INPUT_KINDS, parse_spec

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

    from .provenance import has_template, resolve_output, template_root
    from .runs import find_runs

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


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from .spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .preflight import preflight, unencodable_note

    spec = _load(args)
    steps = spec.steps
    if steps:  # a job of several steps: the first is checked whole; the others read rows not written yet
        import dataclasses

        from .steps import step_folders

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
        if e.price is not None:
            where += f", ${e.price.input_per_mtok:g}/${e.price.output_per_mtok:g} per 1M tokens in/out"
    note = pre.endpoint_check.note if pre.endpoint_check is not None else None
    print(f"endpoint: {where}" + (f" [{note}]" if note else " (not contacted; --check-endpoint asks it)"), file=out)
    print(f"token: {_token_line(spec) if pre.token else 'none'}", file=out)
    print("nothing was sent.", file=out)
    return 0


def _token_line(spec: Any) -> str:
    """Where the token goes (transport.token_problem), for ``validate``."""
    from .transport import token_destinations

    sent, withheld = token_destinations(spec)
    line = "found" + (f"; sent to {', '.join(sent)}" if sent else "")
    if withheld:
        line += (f"; not sent to {', '.join(withheld)} (not a Hugging Face host: endpoint.send_token: true "
                 "sends it, over https only)")
    return line


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunOptions, run_job

    spec = _load(args)
    if args.shard is not None:  # one shard of the job, writing its part of the output (shards.py)
        from .shards import JobShard, sharded_spec

        spec = sharded_spec(spec, JobShard.parse(args.shard, count=args.shard_count or spec.shards))
        _echo(f"shard {spec.shard}: output {spec.output.path} (state in state/shards/{spec.shard.folder})")
        if spec.budget.max_usd is not None:
            _echo(f"note: budget.max_usd (${spec.budget.max_usd:g}) holds for each shard on its own: the shards of "
                  "a job do not add up their spending (docs/shards.md)")
    options = RunOptions(
        fresh=args.fresh,
        retry_failed=args.retry_failed,
        progress=args.progress,
        summary_interval_s=args.summary_every,
        grace_s=args.grace,
        echo=_echo,
        compare_with=args.compare_with,
    )
    try:
        if spec.steps:  # a job of several steps: each run as a job of its own (steps.py)
            from .steps import run_steps

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
    from .notify import build_payload, post_notification

    summary = {"job": spec.name, "outcome": f"did not run: {redact(str(exc))}", "exit_code": exc.exit_code,
               "rows": {}, "output": spec.output.path}
    asyncio.run(post_notification(spec.notify, build_payload(summary), echo=_echo))


def cmd_runs(args: argparse.Namespace) -> int:
    from .errors import OutputError
    from .runs import find_runs, format_runs

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

    from .compare import CompareError, compare_runs, format_report, parse_fail_if
    from .compare_html import write_compare_html

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
    from .errors import OutputError
    from .steps import step_folder

    try:
        return step_folder(root, step, sending=sending)
    except ValueError as exc:
        raise OutputError(str(exc)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from .cost import Spent
    from .output import OutputStore, read_lock, read_status

    spec = _spec_of_output(Path(args.job)) if Path(args.job).is_dir() else _load(args)
    # An object store is counted from its commit records, without reading a part.
    root: str | Path = spec.output.path if "://" in spec.output.path else Path(spec.output.path)
    if spec.steps:
        return _print_steps_status(spec, Path(root))
    shown = root
    if OutputStore.shard_names(root):  # a split job: the union of its shards
        from .shards import print_union

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
    from .batches import describe_batches

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
    from .output import OutputStore, read_status
    from .steps import step_folders

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
    from .sources import open_source

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
    from .preflight import compare_identity

    if not job:
        return
    stored = dict(job.get("identity") or {})
    stored.pop("input", None)  # the input's content is checked by run; status does not read it all
    changed = compare_identity(stored, dict(spec.identity()))
    if changed:
        print(f"  warning: the spec no longer matches this output ({'; '.join(changed)}); `batchrun run` would "
              "refuse to resume it: restore those values, use --output DIR, or run with --fresh")


def cmd_preview(args: argparse.Namespace) -> int:
    from .errors import OutputError
    from .output import OutputStore
    from .preview import write_preview

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
    from .export import export_output

    counts = export_output(args.output, fmt=args.format, to=args.to, errors=args.errors)
    where = f"{counts.failures} failure(s) to {args.errors}" if args.errors else f"{counts.failures} failure(s)"
    print(f"wrote {counts.results} result(s) to {args.to}; {where}"
          + ("" if args.errors else " in the same file"))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .errors import OutputError
    from .output import OutputStore
    from .publish import PublishError, Target, push_output
    from .steps import steps_of_output

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
        from .transport import token_problem

        problem = token_problem(target.endpoint, send_token=bool(args.endpoint or stored.get("send_token")))
        if problem is not None:
            raise PublishError(f"the token would not go to {redact(target.endpoint)}: {problem}; nothing was pushed")
    result = push_output(root, target, echo=_echo)
    print(result.describe())
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    # Every problem (bad flag, file that is not an emulator config, busy port) is an EmulatorError: one line, exit 2.
    from .emulator import EmulatorConfig, describe, load_emulator_config, serve
    from .emulator.config import check_loopback_host
    from .errors import EmulatorError

    if args.host is not None:
        check_loopback_host(args.host, key="--host")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise EmulatorError(f"--port {args.port}: expected 0..65535 (0 picks a free port)")
    config = load_emulator_config(args.config) if args.config else EmulatorConfig()
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["control_port"] = args.port
    if args.host is not None:
        overrides["host"] = args.host
    if overrides:
        import dataclasses

        config = dataclasses.replace(config, **overrides)

    def ready(emu: Emulator) -> None:
        print(describe(emu), flush=True)

    try:
        asyncio.run(serve(config, ready=ready))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_endpoint(args: argparse.Namespace) -> int:
    from huggingface_hub import get_token

    from .endpoints.control_plane import HfControlPlane
    from .errors import SpecError, register_secret

    if args.action in ("up", "down"):
        return _endpoint_bracket(args)
    if args.namespace is None:
        raise SpecError(None, "--namespace", f"`batchrun endpoint {args.action} NAME` needs --namespace NS (the user "
                        "or organization that owns the endpoint)")
    token = get_token()
    register_secret(token)

    async def act() -> EndpointSnapshot:
        control = HfControlPlane(name=args.name, namespace=args.namespace, token=token, api_url=args.api_url)
        if args.action == "pause":
            return await control.pause()
        if args.action == "resume":
            return await control.resume()
        if args.action == "scale-to-zero":
            return await control.scale_to_zero()
        return await control.get()

    snap = asyncio.run(act())
    print(f"{snap.namespace}/{snap.name}: {snap.state}" + (f" ({snap.message})" if snap.message else ""))
    print(f"  url: {snap.url or '-'}")
    print(f"  replicas: {snap.ready_replicas}/{snap.target_replicas} ready "
          f"(min {snap.min_replica}, max {snap.max_replica})")
    print(f"  scale-to-zero timeout: {snap.scale_to_zero_timeout} min")
    print(f"  model: {snap.repository} ({snap.task})")
    return 0


def _endpoint_bracket(args: argparse.Namespace) -> int:
    """`batchrun endpoint up|down JOB.yaml`: bracket the shards of a job by hand (docs/shards.md)."""
    from .endpoints import open_endpoint
    from .endpoints.shared_endpoint import BRACKET
    from .errors import SpecError
    from .preflight import _resolve_token
    from .spec import load_spec
    from .stop import Stop

    spec = load_spec(args.name, output_override=args.output)
    managed = [e for e in spec.all_endpoints if e.name is not None]
    if not managed:
        raise SpecError(spec.file, "endpoint", f"`batchrun endpoint {args.action} JOB.yaml` brackets a Dedicated "
                        "endpoint that the job manages (endpoint: {name, namespace}); this job sends to a url or to "
                        "the built-in emulator (local:), which each run starts and stops itself: nothing to bracket")
    token = _resolve_token(spec)

    async def bracket() -> list[BracketResult | BaseException]:
        opened = [open_endpoint(spec, token=token, stop=Stop(), echo=_echo, endpoint=e, user=BRACKET)
                  for e in managed]
        # Each endpoint to its end, whatever another one does: one failing must not cut the others short.
        return list(await asyncio.gather(*(e.up() if args.action == "up" else e.down() for e in opened),
                                         return_exceptions=True))

    failures = []
    for result in asyncio.run(bracket()):
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            print(_bracket_line(result, args.name))
    if failures:
        for failure in failures[1:]:
            _echo(f"error: {redact(str(failure))}")
        raise failures[0]
    return 0


def _bracket_line(result: BracketResult, job: str) -> str:
    """What `batchrun endpoint up|down JOB.yaml` says of one endpoint."""
    from .endpoints.base import Bracketed

    if result.outcome is Bracketed.UP:
        return f"{result.ref}: ready; the job's shards share it until `batchrun endpoint down {job}`"
    if result.outcome is Bracketed.IN_USE:
        return f"{result.ref}: still in use, left to the last shard to put down: {result.note}"
    if result.outcome is Bracketed.NOT_BRACKETED:
        return f"{result.ref}: nothing to bracket ({result.note})"
    return f"{result.ref}: {result.final_action}" + (f" ({result.note})" if result.note else "")


def build_parser() -> argparse.ArgumentParser:
    # Longer than most functions on purpose: the whole command line, read in one place, is its own help.
    parser = argparse.ArgumentParser(
        prog="batchrun",
        description="Run big offline inference jobs against Hugging Face Inference Endpoints: resume the endpoint, "
        "fan requests out with backpressure and retries, write Parquet, resume after any crash, pause the endpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batchrun {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v events, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check a job spec, its input and output; sends nothing",
                       description="Check the spec, read the input schema, render the prompt for the first rows, "
                       "check the output folder and the token. Sends no request and changes no endpoint.")
    p.add_argument("job", help="job spec file (YAML), e.g. jobs/quickstart.yaml")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output.path)")
    p.add_argument("--check-endpoint", action="store_true",
                   help="also read the endpoint's state from the control plane (read-only, costs nothing)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the job spec's JSON Schema (editor completion and checks)",
                       description=SCHEMA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_schema)

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

    p = sub.add_parser("status", help="done / failed / remaining rows, from the output folder alone")
    p.add_argument("job", help="job spec file (YAML), or the output folder itself")
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output.path)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("preview", help="write a static HTML contact sheet of an output folder",
                       description="Write one self-contained HTML page showing the first results of an output "
                       "folder: generated images with their prompt and seed, input images with their answer, or a "
                       "table of answers. It opens from disk; nothing is served.")
    p.add_argument("output", metavar="OUTPUT", help="the job's output folder (output.path or --output)")
    p.add_argument("--html", metavar="FILE", default=None,
                   help="where to write the page (default: OUTPUT/preview.html)")
    p.add_argument("--limit", type=int, default=60, metavar="N", help="show at most N results (default: 60)")
    p.set_defaults(func=cmd_preview)

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

    p = sub.add_parser("runs", help="list the runs under a folder, one line each",
                       description="One line per output folder under FOLDER (up to 4 levels down), oldest first: "
                       "when it started, the model revision served, rows ok and failed, p50 latency, cost and the "
                       "run's exit code.")
    p.add_argument("folder", metavar="FOLDER", help="e.g. out/nightly (the part of output.path before {date})")
    p.set_defaults(func=cmd_runs)

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

    p = sub.add_parser("emulate", help="run the local Inference Endpoint emulator until stopped",
                       description="Serve a local Inference Endpoint emulator on loopback: the control plane "
                       "(/v2/endpoint/...) and one data plane per endpoint (TGI or text-to-image).")
    p.add_argument("--port", type=int, default=None, help="control-plane port (default: from config, else a free one)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--config", metavar="FILE", help="emulator config (YAML); see docs/emulator.md")
    p.set_defaults(func=cmd_emulate)
    return parser


class _QuietPipe:
    """``sys.stdout`` for the length of a command. Once its reader has gone (``batchrun status | head``),
    the rest of the output is dropped without a word, as Unix tools do, and the command ends with its
    own exit code (a BrokenPipeError is not a failure of the job, and compare's verdict still counts)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self._stream.write(text))
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        # What is still buffered, and whatever the interpreter flushes on the way out, goes to /dev/null.
        import os

        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # a stream with no descriptor (a test's capture)
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    stdout, sys.stdout = sys.stdout, _QuietPipe(sys.stdout)
    try:
        return _main(args)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _read_from_stores(args: argparse.Namespace) -> None:
    """A reader given an output in an object store (s3://, gs://) reads a local copy of its committed union."""
    if args.func not in (cmd_preview, cmd_export, cmd_push, cmd_compare, cmd_runs):
        return
    from .output.remote import readable

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
