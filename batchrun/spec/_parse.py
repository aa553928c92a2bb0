"""Validation at the edge: a loaded mapping becomes a :class:`JobSpec`, or a :class:`SpecError` naming
the file, the key and what was expected."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from batchrun.errors import SpecError
from batchrun.facts import ID_COLUMN
from batchrun.notify import parse_notify_spec
from batchrun.scoring import parse_score_spec
from batchrun.spec._model import (
    MAX_SAMPLES,
    OPENAI_BATCH_TASK,
    BudgetSpec,
    ConcurrencySpec,
    EndpointSpec,
    InputSpec,
    JobSpec,
    OutputSpec,
    PackingSpec,
    PromptSpec,
    PushSpec,
    RetrySpec,
    StepSpec,
)
from batchrun.spec._parse_endpoint import _EndpointParser
from batchrun.spec._parse_input import _InputParser
from batchrun.spec._read import _COUNT, _STRING, _describe, _no_userinfo, _suggest
from batchrun.spec._shape import default_of, spec_keys
from batchrun.spec._units import per_row_job_seed
from batchrun.spec._yaml import _AliasBomb, _DuplicateKey, _SpecLoader, _yaml_error
from batchrun.task_kinds import TASK_KINDS, TaskKind, task_kind

# Loading


def load_spec(path: str | Path, *, output_override: str | None = None, in_memory: bool = False) -> JobSpec:
    """Read and validate the YAML job spec at ``path``.

    ``output_override`` (the CLI's ``--output DIR``) replaces ``output.path``. The job's name
    defaults to the file's stem. ``in_memory``: see :func:`parse_spec`.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "(file)", f"no such file (relative to {Path.cwd()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(file, "(file)", f"cannot read it: {exc}") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass: no arbitrary objects
    except (_DuplicateKey, _AliasBomb) as exc:
        raise SpecError(file, exc.path, exc.problem) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(file, exc) from None
    if data is None:
        raise SpecError(file, "(top level)", "the file is empty; expected a mapping of job keys")
    spec = parse_spec(data, file=file, default_name=Path(path).stem, in_memory=in_memory)
    if output_override is not None:
        problem = _output_path_problem(str(output_override))
        if problem is not None:
            raise SpecError(file, "--output", problem)
        spec = replace(spec, output=replace(spec.output, path=str(output_override)))
    return spec


def parse_spec(data: Any, *, file: str | None = None, default_name: str = "job", in_memory: bool = False) -> JobSpec:
    """Validate a loaded spec mapping and build the :class:`JobSpec`. ``file`` only labels errors.

    ``in_memory``: the rows come from Python (``batchrun.run(spec, input=...)``), so ``input`` is not
    required, and may hold only ``id_column``, ``limit``, ``keep_columns`` and ``allow_empty``. The
    spec's input kind is ``memory``; the caller sets :attr:`InputSpec.memory`.
    """
    return _Parser(file, in_memory=in_memory).job(data, default_name)


# --------------------------------------------------------------------------------------------------
# Validation. One small parser object so that every check knows the file it reports against: the job's own
# sections here, input/prompt/image in _parse_input.py, endpoints in _parse_endpoint.py, reading a key in _read.py.

# Every key's shape and default is declared once, on its config field (spec._shape.key); `file`, `raw`,
# `endpoints` and `shard` are fields but not keys.
_JOB_KEYS = spec_keys(JobSpec)
# Every name a route uses for its output token limit; a job may only use its own route's name.
_TOKEN_LIMIT_PARAMETERS = tuple(
    dict.fromkeys(k.token_limit_parameter for k in TASK_KINDS.values() if k.token_limit_parameter)
)
# The tasks a serverless target serves through batchrun (OpenAI's chat and completions routes).
_SERVERLESS_TASKS = ("chat-completion", "text-generation")
_BUDGET_KEYS = spec_keys(BudgetSpec)
_CONCURRENCY_KEYS = spec_keys(ConcurrencySpec)
_RETRY_KEYS = spec_keys(RetrySpec)
_OUTPUT_KEYS = spec_keys(OutputSpec)


class _Parser(_InputParser, _EndpointParser):
    """Builds the config objects from a loaded mapping; every check reports against ``file``."""

    # -- the sections --------------------------------------------------------------------------

    def job(self, data: Any, default_name: str) -> JobSpec:
        if not isinstance(data, Mapping):
            raise self.error("(top level)", f"expected a mapping of job keys, got {_describe(data)}")
        self.keys(data, "", _JOB_KEYS)
        if "steps" in data:
            return self.steps_job(data, default_name)
        batch_file = isinstance(data.get("input"), Mapping) and "openai_batch" in data["input"]
        # A job on an OpenAI batch file needs neither task nor prompt: its request lines carry both.
        no_prompt = batch_file or data.get("task") == OPENAI_BATCH_TASK  # (the latter is refused just below)
        for required in ("input", "endpoint") if no_prompt else ("task", "input", "prompt", "endpoint"):
            if required not in data and not (required == "input" and self.in_memory):
                raise self.error(required, "is required")

        name = self.key(JobSpec, data, "name", default=default_name)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise self.error("name", f"expected a plain name without path separators, got {name!r}")
        kind = self.task(data.get("task", OPENAI_BATCH_TASK if batch_file else None))
        self.batch_task(kind, batch_file)
        task = kind.name
        prompt = self.prompt(data["prompt"], kind) if kind.takes_prompt else self.no_prompt(data)
        parameters = self.parameters(data.get("parameters"), kind)
        output_schema = self.output_schema(data.get("output_schema"), kind, prompt, parameters)
        output = self.output(data.get("output"), name)
        spec = JobSpec(
            name=name,
            task=task,
            input=self.input(data.get("input")),
            prompt=prompt,
            parameters=parameters,
            **self.endpoint_list(data),
            budget=self.budget(data.get("budget")),
            concurrency=self.concurrency(data.get("concurrency")),
            retries=self.retries(data.get("retries")),
            packing=self.packing(data.get("packing"), kind),
            embedding_dtype=self.embedding_dtype(data, kind),
            request_timeout=self.key(JobSpec, data, "request_timeout"),
            max_answer_bytes=self.key(JobSpec, data, "max_answer_bytes"),
            outage_timeout=self.key(JobSpec, data, "outage_timeout"),
            failure_threshold=self.key(JobSpec, data, "failure_threshold"),
            output=output,
            image=self.image(data.get("image"), kind),
            output_schema=output_schema,
            samples=self.samples(data, kind),
            shards=self.key(JobSpec, data, "shards"),
            score=self.delegated(parse_score_spec, data.get("score")),
            notify=self.delegated(parse_notify_spec, data.get("notify")),
            file=self.file,
            raw=data,
        )
        self.serverless_job(spec)
        return spec

    def serverless_job(self, spec: JobSpec) -> None:
        """A job on serverless targets: a task they serve, and a price wherever a budget must count."""
        several = len(spec.all_endpoints) > 1
        for index, e in enumerate(spec.all_endpoints):
            if not e.per_token:
                continue
            where = f"endpoint[{index}]" if several else "endpoint"
            if e.mode == "batch" and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec.output.path):
                # The batch journal (each batch's rows and ids) lives in the output's state, which an object
                # store's run keeps in a local cache: another machine's rerun would not find paid batches.
                raise self.error(f"{where}.mode", "mode: batch writes to a local (or mounted) output folder: its "
                                 "journal of paid batches must outlive this machine; use output.path on a shared "
                                 "filesystem, or mode: online or flex with an object store")
            if spec.task == "text-to-image" and e.provider is not None:
                self.provider_images_job(spec, e, where)
                continue
            if spec.task not in _SERVERLESS_TASKS:
                raise self.error(f"{where}.{'provider' if e.provider else 'model'}", (
                    f"task {spec.task} is not served through a serverless target by batchrun (it serves "
                    f"{', '.join(_SERVERLESS_TASKS)} there, and text-to-image through endpoint.provider)"))
            for key in ("per_image", "per_megapixel"):
                if e.price is not None and getattr(e.price, key) is not None:
                    raise self.error(f"{where}.price.{key}", "only applies to task text-to-image: this task is "
                                     "billed per token ({input_per_mtok, output_per_mtok})")
            if spec.task == "text-generation":  # OpenAI's /v1/completions: a flat body, no response_format
                if spec.output_schema is not None or spec.prompt.schema_column is not None:
                    raise self.error("output_schema", "on a serverless target, structured output goes through "
                                     "task chat-completion (response_format); /v1/completions does not take it")
                if spec.samples > 1 or per_row_job_seed(spec.parameters.get("seed")) is not None:
                    raise self.error("samples" if spec.samples > 1 else "parameters.seed", (
                        "on a serverless target, several samples and per-row seeds go through task "
                        "chat-completion; /v1/completions takes one fixed parameters.seed"))
            if spec.budget.max_usd is not None and e.provider is None and e.price is None:
                raise self.error(f"{where}.price", "is required with budget.max_usd: an OpenAI-compatible API does "
                                 "not say what it charges, so the budget could not count its tokens")

    def provider_images_job(self, spec: JobSpec, e: EndpointSpec, where: str) -> None:
        """text-to-image through the router: one provider whose route batchrun builds (or auto: preflight picks
        it from the Hub's mapping), priced per image."""
        routes = task_kind(spec.task).provider_routes
        if len(spec.all_endpoints) > 1:
            raise self.error(where, "a text-to-image job through Inference Providers has one endpoint: each "
                             "provider takes its own request shape")
        if e.provider not in routes and e.provider != "auto":
            raise self.error(f"{where}.provider", f"text-to-image goes through the routes of {', '.join(routes)}: "
                             f"pin one of them, or auto for the first the Hub maps to the model (got {e.provider})")
        if e.mode != "online":
            raise self.error(f"{where}.mode", "text-to-image through a provider is sent online only")
        if spec.samples > 1:
            raise self.error("samples", "text-to-image through a provider draws one image per row: give each "
                             "row its own seed with image.seed_column instead")
        if e.price is not None and e.price.input_per_mtok is not None:
            raise self.error(f"{where}.price", "images are billed per image: give price: {per_image: USD} (or "
                             "per_megapixel)")
        if spec.budget.max_usd is not None and e.price is None:
            raise self.error(f"{where}.price", "is required with budget.max_usd: the router does not list its "
                             "image prices, so give price: {per_image: USD}")

    def steps_job(self, data: Mapping[str, Any], default_name: str) -> JobSpec:
        """A job of several steps: each step parsed as a job of its own, job-level keys as its defaults.

        The job keeps ``name``, ``input`` and ``output``; a step's keys replace the job's own (a step's
        ``prompt`` replaces the job's whole ``prompt``). The returned spec is the last step's job under
        the job's name, input and output, with ``steps`` set: a runner reads ``steps``.
        """
        from batchrun.spec._filter import compile_filter, is_function_filter

        steps = data["steps"]
        if not isinstance(steps, list) or not steps:
            raise self.error("steps", f"expected a list of steps (each a mapping with a name), got {_describe(steps)}")
        name = self.key(JobSpec, data, "name", default=default_name)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise self.error("name", f"expected a plain name without path separators, got {name!r}")
        if "input" not in data and not self.in_memory:
            raise self.error("input", "is required")
        output = self.output(data.get("output"), name)
        shared = {key: value for key, value in data.items() if key not in ("steps", "name", "input", "output")}
        parsed: list[StepSpec] = []
        id_column: str | None = None
        for index, step in enumerate(steps):
            where = f"steps[{index}]"
            if not isinstance(step, Mapping):
                raise self.error(where, f"expected a mapping with a name, got {_describe(step)}")
            step_name = step.get("name")
            if not isinstance(step_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", step_name):
                raise self.error(f"{where}.name", f"expected a plain name (letters, digits, - _ .), got {step_name!r}")
            where = f"steps.{step_name}"
            if any(step_name == done.name for done in parsed):
                raise self.error(where, "two steps have this name")
            for key in ("input", "output", "steps"):
                if key in step:
                    raise self.error(f"{where}.{key}", "is the job's, not a step's: set it once, beside steps")
            condition = step.get("filter")
            if condition is not None:
                if index == 0:
                    raise self.error(f"{where}.filter", "the first step reads the job's input: filter a later step")
                if not isinstance(condition, str) or not condition.strip():
                    raise self.error(f"{where}.filter", f"expected a condition such as `score_judge >= 4`, or "
                                                        f"module:function, got {_describe(condition)}")
                if not is_function_filter(condition):  # a function is found when the step runs: validate runs no code
                    try:
                        compile_filter(condition)
                    except ValueError as exc:
                        raise self.error(f"{where}.filter", str(exc)) from None
            if set(step) <= {"name", "filter"} and condition is not None:
                parsed.append(StepSpec(name=step_name, job=None, filter=condition))  # it only filters
                continue
            body = {**shared, **{k: v for k, v in step.items() if k not in ("name", "filter")}}
            body["name"] = f"{name}-{step_name}"
            body["output"] = {k: v for k, v in (data.get("output") or {}).items() if k != "push_to_hub"}
            body["output"]["path"] = f"{output.path}/steps/{step_name}"
            first = index == 0
            if first and "input" in data:
                body["input"] = data["input"]
            try:
                job = _Parser(self.file, in_memory=self.in_memory or not first).job(body, body["name"])
            except SpecError as exc:
                raise self.error(f"{where}.{exc.key}", exc.problem) from None
            if first:
                id_column = job.input.id_column or ID_COLUMN
            else:
                job = replace(job, input=InputSpec(kind="step", path=f"{output.path}/steps/{parsed[-1].name}",
                                                   id_column=id_column, step_filter=condition),
                              raw={**job.raw, "input": {"id_column": id_column}})  # job.json says its ids
            parsed.append(StepSpec(name=step_name, job=job, filter=condition))
        last = next(step.job for step in reversed(parsed) if step.job is not None)
        first_job = parsed[0].job
        assert first_job is not None
        return replace(last, name=name, input=first_job.input, output=output, steps=tuple(parsed), file=self.file,
                       raw=data)

    def task(self, value: Any) -> TaskKind:
        names = tuple(TASK_KINDS)
        if not isinstance(value, str):
            raise self.error("task", f"expected one of {', '.join(names)}, got {_describe(value)}")
        if value not in TASK_KINDS:
            raise self.error("task", f"expected one of {', '.join(names)}, got {value!r}{_suggest(value, names)}")
        return TASK_KINDS[value]

    def batch_task(self, kind: TaskKind, batch_file: bool) -> None:
        """``input.openai_batch`` and task ``openai-batch`` go together (the task may be left out)."""
        if batch_file and kind.name != OPENAI_BATCH_TASK:
            raise self.error(
                "task",
                f"is {kind.name}, but input.openai_batch requests name their own route (their `url`); "
                f"leave task out (it is {OPENAI_BATCH_TASK}) or read another input",
            )
        if not batch_file and kind.name == OPENAI_BATCH_TASK:
            raise self.error("task", f"{OPENAI_BATCH_TASK} reads an OpenAI batch file: set input.openai_batch")

    def no_prompt(self, data: Mapping[str, Any]) -> PromptSpec:
        if "prompt" in data:
            raise self.error(
                "prompt", "does not apply to an input.openai_batch job: each request line's body is sent as it is"
            )
        return PromptSpec()

    def parameters(self, data: Any, kind: TaskKind) -> dict[str, Any]:
        """The route's parameters, passed through, once the ones batchrun owns or the route ignores are refused."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise self.error("parameters", f"expected a mapping of the route's parameters, got {_describe(data)}")
        for key in data:
            if not isinstance(key, str):
                raise self.error("parameters", f"expected string parameter names, got {key!r}")
        if data.get("stream"):
            raise self.error("parameters.stream", "is not supported: batchrun reads whole answers")
        if kind.name == "text-to-image":
            self.text_to_image_parameters(data)
        for key in kind.reserved_parameters:
            if key in data:
                raise self.error(f"parameters.{key}", f"is set by batchrun itself for task {kind.name}; remove it")
        own = kind.token_limit_parameter
        for key in _TOKEN_LIMIT_PARAMETERS:
            if key in data and own is not None and key != own:
                # The route would ignore it without a word, and every answer would run to the server's default.
                raise self.error(
                    f"parameters.{key}",
                    f"task {kind.name} sends to {_route_name(kind)}, which takes {own}; "
                    f"{'remove it' if own in data else 'rename it'}",
                )
        self.per_row_seed(data.get("seed"), kind)
        return dict(data)

    def delegated(self, parse: Any, data: Any) -> Any:
        """A section parsed by its own module, which raises ``ValueError((key, problem))``."""
        try:
            return parse(data)
        except ValueError as exc:
            key, problem = exc.args[0]
            raise self.error(key, problem) from None

    def per_row_seed(self, seed: Any, kind: TaskKind) -> None:
        """``parameters.seed`` is a number, or ``per-row`` / ``per-row:N``: each row its own stable seed."""
        if not isinstance(seed, str):
            return
        if per_row_job_seed(seed) is None:
            raise self.error("parameters.seed", f"expected an integer, per-row or per-row:N, got {seed!r}")
        if kind.seed_path is None:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.seed_path)
            raise self.error("parameters.seed", f"per-row seeds apply to tasks {owners}, not {kind.name}")

    def samples(self, data: Mapping[str, Any], kind: TaskKind) -> int:
        """``samples``: answers per input row, each drawn with its own seed."""
        samples = self.read(data, "samples", _COUNT, default=default_of(JobSpec, "samples"))
        if samples > MAX_SAMPLES:
            raise self.error("samples", f"expected at most {MAX_SAMPLES}, got {samples}")
        if samples > 1 and kind.seed_path is None:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.seed_path)
            raise self.error("samples", f"several samples apply to tasks {owners}, not {kind.name}")
        image = data.get("image")
        if samples > 1 and isinstance(image, Mapping) and image.get("seed_column") is not None:
            raise self.error(
                "samples", "each sample is drawn with its own seed; image.seed_column would draw them all alike"
            )
        return samples

    def output_schema(
        self, data: Any, kind: TaskKind, prompt: PromptSpec, parameters: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The job's JSON Schema, checked against its metaschema now: a bad schema costs nothing."""
        from batchrun.structured import SchemaProblem, load_schema

        wanted = "output_schema" if data is not None else "prompt.schema_column" if prompt.schema_column else None
        if wanted is None:
            return None
        if kind.schema_parameter is None:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.schema_parameter)
            raise self.error(wanted, f"structured output applies to tasks {owners}, not {kind.name}")
        if data is not None and prompt.schema_column is not None:
            raise self.error("output_schema", "give one schema for the job or prompt.schema_column, not both")
        if kind.schema_parameter in parameters:
            raise self.error(
                f"parameters.{kind.schema_parameter}",
                f"is set by batchrun from {wanted} for task {kind.name}; remove it",
            )
        if data is None:
            return None
        try:
            return load_schema(data)
        except SchemaProblem as problem:
            raise self.error("output_schema", str(problem)) from None

    def budget(self, data: Any) -> BudgetSpec:
        if data is None:
            return BudgetSpec()
        data = self.section(data, "budget", _BUDGET_KEYS)
        return BudgetSpec(
            max_usd=self.key(BudgetSpec, data, "max_usd", prefix="budget."),
            deadline=self.key(BudgetSpec, data, "deadline", prefix="budget."),
        )

    def concurrency(self, data: Any) -> ConcurrencySpec:
        if data is None:
            return ConcurrencySpec()
        data = self.section(data, "concurrency", _CONCURRENCY_KEYS)
        high = self.key(ConcurrencySpec, data, "max", prefix="concurrency.")
        initial = self.key(
            ConcurrencySpec, data, "initial", prefix="concurrency.",
            default=min(default_of(ConcurrencySpec, "initial"), high),
        )
        if initial > high:
            raise self.error("concurrency.initial", f"expected at most concurrency.max ({high}), got {initial}")
        return ConcurrencySpec(max=high, initial=initial)

    def packing(self, data: Any, kind: TaskKind) -> PackingSpec:
        """``packing``: only for the tasks that send several rows per request."""
        if data is None:
            return PackingSpec()
        if not kind.packs:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.packs)
            raise self.error("packing", f"applies to tasks {owners}, not {kind.name}")
        data = self.section(data, "packing", spec_keys(PackingSpec))
        return PackingSpec(max_rows=self.key(PackingSpec, data, "max_rows", prefix="packing."),
                           max_tokens=self.key(PackingSpec, data, "max_tokens", prefix="packing."))

    def embedding_dtype(self, data: Mapping[str, Any], kind: TaskKind) -> str:
        """``embedding_dtype``: float32 (the default) or float16, for feature-extraction only."""
        if "embedding_dtype" in data and kind.name != "feature-extraction":
            raise self.error("embedding_dtype", f"applies to task feature-extraction, not {kind.name}")
        dtype: str = self.key(JobSpec, data, "embedding_dtype")
        return dtype

    def retries(self, data: Any) -> RetrySpec:
        if data is None:
            return RetrySpec()
        data = self.section(data, "retries", _RETRY_KEYS)
        p = "retries."
        base = self.key(RetrySpec, data, "backoff_base", prefix=p)
        cap = self.key(RetrySpec, data, "backoff_cap", prefix=p)
        if cap < base:
            raise self.error("retries.backoff_cap", f"expected at least backoff_base ({base:g}), got {cap:g}")
        return RetrySpec(
            max_attempts=self.key(RetrySpec, data, "max_attempts", prefix=p),
            backoff_base=base,
            backoff_cap=cap,
            max_retry_after=self.key(RetrySpec, data, "max_retry_after", prefix=p),
            budget_ratio=self.key(RetrySpec, data, "budget_ratio", prefix=p),
            invalid_output=self.key(RetrySpec, data, "invalid_output", prefix=p),
        )

    def output(self, data: Any, job_name: str) -> OutputSpec:
        if data is None:
            data = {}
        data = self.section(data, "output", _OUTPUT_KEYS)
        return OutputSpec(
            path=self.output_path(data, job_name),
            shard_rows=self.key(OutputSpec, data, "shard_rows", prefix="output."),
            shard_bytes=self.key(OutputSpec, data, "shard_bytes", prefix="output."),
            push_to_hub=self.push_to_hub(data.get("push_to_hub")),
        )

    def push_to_hub(self, data: Any) -> PushSpec | None:
        if data is None:
            return None
        from batchrun.publish.names import name_problem, repo_problem

        p = "output.push_to_hub."
        data = self.section(data, "output.push_to_hub", spec_keys(PushSpec))
        repo = self.key(PushSpec, data, "repo", prefix=p)
        config = data.get("config", default_of(PushSpec, "config"))
        split = data.get("split", default_of(PushSpec, "split"))
        for key, problem in (("repo", repo_problem(repo)),
                             ("config", name_problem(config, "config")),
                             ("split", name_problem(split, "split"))):
            if problem is not None:
                raise self.error(p + key, problem)
        flags = {}
        for key in ("private", "include_failed", "send_token"):
            flags[key] = self.key(PushSpec, data, key, prefix=p)
        endpoint = self.read(data, "endpoint", _STRING, prefix=p, default=None)
        if endpoint is not None:  # huggingface_hub sends the token to every Hub call
            if not re.match(r"^https?://[^/\s]+", endpoint):
                raise self.error(p + "endpoint", f"expected an http:// or https:// URL, got {_no_userinfo(endpoint)!r}")
            self.token_url(endpoint, p + "endpoint", flags["send_token"], p + "send_token", always=True)
        return PushSpec(
            repo=repo, config=config, split=split,
            every=self.key(PushSpec, data, "every", prefix=p),
            endpoint=endpoint, **flags,
        )

    def output_path(self, data: Mapping[str, Any], job_name: str) -> str:
        # Without a path, results go to out/<job name>, the layout the sample jobs use.
        path: str = self.key(OutputSpec, data, "path", prefix="output.", default=f"out/{job_name}")
        problem = _output_path_problem(path)
        if problem is not None:
            raise self.error("output.path", problem)
        return path


def _route_name(kind: TaskKind) -> str:
    label = "the chat route" if kind.route.rstrip("/").endswith("/chat/completions") else "the generation route"
    return f"{label} (POST {kind.route})"


#: A URL's scheme and "://" (s3://, gs://, hf://, file://...).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _output_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be the output folder: it must name a folder of its own."""
    last = path.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not path.strip():
        return "expected a folder for the results, got an empty path"
    if _URL.match(path.strip()) and not re.match(r"^((s3|gs)://|hf://buckets/[^/\s]+/)[^/\s]+/[^/\s]", path.strip()):
        # Path() would make "hf://buckets/x" a local folder "hf:/buckets/x": only the stores the commit
        # protocol supports (docs/object-storage.md) are taken, with a bucket and a prefix of the job's own.
        return (f"expected a local folder, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or hf://buckets/ORG/NAME/PREFIX, "
                f"got the URL {_no_userinfo(path)!r}: other stores (hf:// repositories, file://...) are not "
                "written to; write to a local (or mounted) folder and push it with `batchrun push`")
    if last in ("", ".", ".."):
        # The output folder gets a manifest, shards and a lock of its own; `.` would scatter them
        # among the user's files (and a fresh run would clear them).
        return f"expected a folder of the job's own, like out/{{job name}}, got {path!r}; name a folder"
    return None
