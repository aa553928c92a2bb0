"""Validation at the edge: a loaded mapping becomes a :class:`JobSpec`, or a :class:`SpecError` naming
the file, the key and what was expected."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import urllib.parse
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
    ENDPOINT_KINDS,
    IMAGE_FORMATS,
    INPUT_KINDS,
    LIFECYCLE_KEYS,
    MAX_SAMPLES,
    ON_FINISH,
    OPENAI_BATCH_ID,
    OPENAI_BATCH_TASK,
    SEED_MAX,
    BatchSpec,
    BudgetSpec,
    ConcurrencySpec,
    DatasetSpec,
    EndpointSpec,
    ImageSpec,
    InputSpec,
    JobSpec,
    LimitsSpec,
    OutputSpec,
    PackingSpec,
    PriceSpec,
    PromptSpec,
    PushSpec,
    RetrySpec,
    ScaleSpec,
    StepSpec,
    _template_fields,
)
from batchrun.spec._shape import INVALID, Shape, declared, default_of, spec_keys
from batchrun.spec._units import per_row_job_seed
from batchrun.spec._yaml import _AliasBomb, _DuplicateKey, _SpecLoader, _yaml_error
from batchrun.task_kinds import TASK_KINDS, TaskKind

# --------------------------------------------------------------------------------------------------
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
# Validation. One small parser object so that every check knows the file it reports against.

# Every key's shape and default is declared once, on its config field (spec._shape.key); `file`, `raw`,
# `endpoints` and `shard` are fields but not keys.
_JOB_KEYS = spec_keys(JobSpec)
# The input section names its kind by its key (parquet, jsonl, dataset or openai_batch), so it is not one to one.
_INPUT_KEYS = (*INPUT_KINDS, *(key for key in spec_keys(InputSpec) if key not in INPUT_KINDS))
_DATASET_KEYS = spec_keys(DatasetSpec)
_PROMPT_KEYS = spec_keys(PromptSpec)
_IMAGE_KEYS = spec_keys(ImageSpec)
# The tasks that take an image section, and the keys each takes, from the task registry.
_IMAGE_KEYS_BY_TASK = {kind.name: kind.image_keys for kind in TASK_KINDS.values() if kind.image_keys}
# Every name a route uses for its output token limit; a job may only use its own route's name.
_TOKEN_LIMIT_PARAMETERS = tuple(
    dict.fromkeys(k.token_limit_parameter for k in TASK_KINDS.values() if k.token_limit_parameter)
)
# The toolkit's documented text-to-image parameters, and what each must be.
_TEXT_TO_IMAGE_PARAMETERS = {
    "negative_prompt": "a string",
    "num_inference_steps": "a positive integer",
    "guidance_scale": "a number",
    "width": "a positive integer",
    "height": "a positive integer",
}
_ENDPOINT_KEYS = spec_keys(EndpointSpec)
_SCALE_KEYS = spec_keys(ScaleSpec)
_PRICE_KEYS = spec_keys(PriceSpec)
# The tasks a serverless target serves through batchrun (OpenAI's chat and completions routes).
_SERVERLESS_TASKS = ("chat-completion", "text-generation")
# The keys of a serverless target (the router, a url's API): refused for the other kinds.
_PER_TOKEN_KEYS = ("model", "router_url", "api_key_env", "price", "mode", "batch")
_BATCH_KEYS = spec_keys(BatchSpec)
_LIMITS_KEYS = spec_keys(LimitsSpec)
_BUDGET_KEYS = spec_keys(BudgetSpec)
_CONCURRENCY_KEYS = spec_keys(ConcurrencySpec)
_RETRY_KEYS = spec_keys(RetrySpec)
_OUTPUT_KEYS = spec_keys(OutputSpec)


def _default_label(kind: str, url: str | None, local: Any, name: str | None, index: int,
                   provider: str | None = None) -> str:
    """How an endpoint of the list form is named when it has no ``label``: its name, provider, host or place."""
    if kind == "name" and name:
        return name
    if kind == "provider" and provider:
        return provider
    if kind == "url" and url:
        import yarl

        host = yarl.URL(url)
        return f"{host.host}:{host.port}" if host.port else str(host.host)
    if isinstance(local, Mapping) and local.get("name"):
        return str(local["name"])
    return f"endpoint-{index}"


def _url_label_forms(url: str) -> list[str]:
    """A url's labels, shortest first: host:port, then with its path, its query, its scheme."""
    import yarl

    u = yarl.URL(url)
    host = f"{u.host}:{u.port}" if u.port else str(u.host)
    path = u.raw_path.rstrip("/")
    query = f"?{u.raw_query_string}" if u.raw_query_string else ""
    return [host, host + path, host + path + query, f"{u.scheme}://{host}{path}{query}"]


def _distinct_url_labels(endpoints: list[EndpointSpec], *, given: list[bool]) -> list[EndpointSpec]:
    """Urls on one host and port get default labels that tell them apart: each the shortest form of its
    url (host:port, then with the path...) that no other endpoint's label shares. Labels the spec gave
    are kept as they are."""
    forms = [_url_label_forms(e.url) if e.url is not None and not given[i] else None
             for i, e in enumerate(endpoints)]
    level = [0] * len(endpoints)

    def label(i: int) -> str | None:
        options = forms[i]
        return endpoints[i].label if options is None else options[level[i]]

    changed = True
    while changed:
        changed = False
        labels = [label(i) for i in range(len(endpoints))]
        for i, options in enumerate(forms):
            if options is not None and level[i] + 1 < len(options) and labels.count(labels[i]) > 1:
                level[i] += 1
                changed = True
    return [e if forms[i] is None else dataclasses.replace(e, label=label(i)) for i, e in enumerate(endpoints)]


_REQUIRED: Any = object()  # a key with no default: missing is an error
_DECLARED: Any = object()  # the default the key's config field declares
# The shapes of the values a key's config field does not hold as read (the field's own shape is for the
# JSON Schema): an input's path under its kind's key, a url checked further, a seed checked against 2**63.
_STRING = Shape("string")
_COUNT = Shape("integer", minimum=1)
_NATURAL = Shape("integer", minimum=0)


class _Parser:
    """Builds the config objects from a loaded mapping; every check reports against ``file``."""

    def __init__(self, file: str | None, *, in_memory: bool = False) -> None:
        self.file = file
        self.in_memory = in_memory

    def error(self, key: str, problem: str) -> SpecError:
        return SpecError(self.file, key, problem)

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
            if spec.task not in _SERVERLESS_TASKS:
                raise self.error(f"{where}.{'provider' if e.provider else 'model'}", (
                    f"task {spec.task} is not served through a serverless target by batchrun (it serves "
                    f"{', '.join(_SERVERLESS_TASKS)} there)"))
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

    def input(self, data: Any) -> InputSpec:
        if self.in_memory:
            return self.memory_input(data)
        data = self.section(data, "input", _INPUT_KEYS)
        kind = self.exactly_one(data, "input", INPUT_KINDS)
        path = None
        dataset = None
        if kind == "dataset":
            dataset = self.dataset(data["dataset"])
        else:
            path = self.read(data, kind, _STRING, prefix="input.")
        limit = self.key(InputSpec, data, "limit", prefix="input.")
        keep = data.get("keep_columns")
        keep_columns = None
        if keep is not None:
            if not isinstance(keep, list) or not all(isinstance(c, str) and c for c in keep):
                raise self.error("input.keep_columns", f"expected a list of column names, got {_describe(keep)}")
            keep_columns = tuple(keep)
        allow_empty = self.key(InputSpec, data, "allow_empty", prefix="input.")
        id_column = self.key(InputSpec, data, "id_column", prefix="input.")
        if kind == "openai_batch":
            if id_column is not None:
                raise self.error("input.id_column", "does not apply to input.openai_batch: the ids are its custom_id")
            id_column = OPENAI_BATCH_ID
        return InputSpec(
            kind=kind,
            path=path,
            dataset=dataset,
            id_column=id_column,
            limit=limit,
            keep_columns=keep_columns,
            allow_empty=allow_empty,
        )

    def memory_input(self, data: Any) -> InputSpec:
        """The input section of a job whose rows come from Python: the options only, no kind."""
        data = self.section(data if data is not None else {}, "input", _INPUT_KEYS)
        named = [kind for kind in INPUT_KINDS if kind in data]
        if named:
            raise self.error(f"input.{named[0]}", "the rows are given in Python (input=...): leave the input's "
                                                  "kind out of the spec, or do not pass input=")
        keep = data.get("keep_columns")
        if keep is not None and not (isinstance(keep, list) and all(isinstance(c, str) and c for c in keep)):
            raise self.error("input.keep_columns", f"expected a list of column names, got {_describe(keep)}")
        return InputSpec(
            kind="memory",
            id_column=self.key(InputSpec, data, "id_column", prefix="input."),
            limit=self.key(InputSpec, data, "limit", prefix="input."),
            keep_columns=None if keep is None else tuple(keep),
            allow_empty=self.key(InputSpec, data, "allow_empty", prefix="input."),
        )

    def dataset(self, data: Any) -> DatasetSpec:
        if isinstance(data, str):
            # `dataset: user/name` is the common case; let it stand for `dataset: {path: user/name}`.
            data = {"path": data}
        data = self.section(data, "input.dataset", _DATASET_KEYS)
        if "path" not in data:
            raise self.error(
                "input.dataset.path", "is required (a Hub dataset id, a folder, or a builder like 'parquet')"
            )
        data_files = data.get("data_files")
        if data_files is not None and not _is_data_files(data_files):
            raise self.error(
                "input.dataset.data_files",
                f"expected a path, a list of paths, or a mapping of split to paths, got {_describe(data_files)}",
            )
        options = data.get("options")
        if options is None:
            options = {}
        elif not isinstance(options, Mapping):
            raise self.error(
                "input.dataset.options", f"expected a mapping of builder keywords, got {_describe(options)}"
            )
        prefix = "input.dataset."
        return DatasetSpec(
            path=self.key(DatasetSpec, data, "path", prefix=prefix),
            name=self.key(DatasetSpec, data, "name", prefix=prefix),
            split=self.key(DatasetSpec, data, "split", prefix=prefix),
            data_files=data_files,
            data_dir=self.key(DatasetSpec, data, "data_dir", prefix=prefix),
            revision=self.key(DatasetSpec, data, "revision", prefix=prefix),
            options=dict(options),
        )

    def prompt(self, data: Any, kind: TaskKind) -> PromptSpec:
        data = self.section(data, "prompt", _PROMPT_KEYS)
        messages_column = self.messages_column(data, kind)
        source = self.exactly_one(data, "prompt", ("template", "column")) if messages_column is None else None
        template = column = None
        if source == "template":
            template = self.key(PromptSpec, data, "template", prefix="prompt.", default=_REQUIRED)
            try:
                fields = _template_fields(template)
            except ValueError as exc:
                problem = f"expected a template with {{column}} placeholders: {exc}"
                raise self.error("prompt.template", problem) from None
            if not fields:
                raise self.error(
                    "prompt.template",
                    "expected at least one {column} placeholder; use prompt.column for a column as it is",
                )
        elif source == "column":
            column = self.key(PromptSpec, data, "column", prefix="prompt.", default=_REQUIRED)
        system = self.key(PromptSpec, data, "system", prefix="prompt.")
        if system is not None and not kind.takes_system:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.takes_system)
            raise self.error("prompt.system", f"only applies to tasks {owners}, not {kind.name}")
        image_column = self.key(PromptSpec, data, "image_column", prefix="prompt.")
        schema_column = self.key(PromptSpec, data, "schema_column", prefix="prompt.")
        texts_column = self.key(PromptSpec, data, "texts_column", prefix="prompt.")
        if (texts_column is None) == kind.takes_texts:
            which = "is required for" if kind.takes_texts else "only applies to task rerank, not"
            raise self.error("prompt.texts_column", f"{which} {kind.name} (the column of candidate texts)")
        if messages_column is not None and image_column is not None:
            raise self.error(
                "prompt.image_column",
                "does not apply with prompt.messages_column: a conversation carries its images as image parts "
                "of its messages' content",
            )
        if kind.image_column == "required" and image_column is None and messages_column is None:
            raise self.error(
                "prompt.image_column", f"is required for task {kind.name} (the input column holding the image)"
            )
        if kind.image_column == "forbidden" and image_column is not None:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.image_column == "required")
            raise self.error("prompt.image_column", f"only applies to task {owners}, not {kind.name}")
        return PromptSpec(
            template=template, column=column, system=system, image_column=image_column,
            messages_column=messages_column,
            schema_column=schema_column,
            texts_column=texts_column,
        )

    def messages_column(self, data: Mapping[str, Any], kind: TaskKind) -> str | None:
        """``prompt.messages_column``: the conversation is the whole prompt, so nothing else may build one."""
        if "messages_column" not in data:
            return None
        if not kind.takes_messages:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.takes_messages)
            raise self.error("prompt.messages_column", f"only applies to tasks {owners}, not {kind.name}")
        both = [key for key in ("template", "column") if key in data]
        if both:
            raise self.error(
                "prompt.messages_column",
                f"is the whole prompt (each row's conversation); remove prompt.{' and prompt.'.join(both)}, "
                "or drop messages_column to build a one-turn prompt from the row",
            )
        name: str = self.key(PromptSpec, data, "messages_column", prefix="prompt.", default=_REQUIRED)
        return name

    def image(self, data: Any, kind: TaskKind) -> ImageSpec | None:
        task = kind.name
        if not kind.image_keys:
            if data is not None:
                raise self.error("image", f"only applies to tasks {' and '.join(_IMAGE_KEYS_BY_TASK)}, not {task}")
            return None
        if data is None:
            return ImageSpec()
        data = self.section(data, "image", _IMAGE_KEYS)
        allowed = kind.image_keys
        for key in data:
            if key not in allowed:
                owner = next(t for t, keys in _IMAGE_KEYS_BY_TASK.items() if key in keys)
                raise self.error(
                    f"image.{key}", f"only applies to task {owner}, not {task}; expected one of {', '.join(allowed)}"
                )
        fmt = data.get("format", default_of(ImageSpec, "format"))
        if isinstance(fmt, str) and fmt.lower() == "jpg":
            fmt = "jpeg"
        if not isinstance(fmt, str) or fmt.lower() not in IMAGE_FORMATS:
            hint = _suggest(fmt.lower(), IMAGE_FORMATS) if isinstance(fmt, str) else ""
            raise self.error("image.format", f"expected one of {', '.join(IMAGE_FORMATS)}, got {_describe(fmt)}{hint}")
        seed = self.read(data, "seed", _NATURAL, prefix="image.", default=default_of(ImageSpec, "seed"))
        if seed > SEED_MAX:
            raise self.error("image.seed", f"expected a non-negative integer below 2**63, got {seed}")
        return ImageSpec(
            format=fmt.lower(),
            seed_column=self.key(ImageSpec, data, "seed_column", prefix="image."),
            seed=seed,
            max_side=self.key(ImageSpec, data, "max_side", prefix="image."),
            base_dir=self.key(ImageSpec, data, "base_dir", prefix="image."),
        )

    def text_to_image_parameters(self, parameters: Mapping[str, Any]) -> None:
        if "seed" in parameters:
            raise self.error(
                "parameters.seed",
                "is set per row for text-to-image: name a column with image.seed_column, or let batchrun "
                "derive each row's seed from its id (change image.seed to draw a different set)",
            )
        for key, expected in _TEXT_TO_IMAGE_PARAMETERS.items():
            if key not in parameters:
                continue
            value = parameters[key]
            if expected == "a string":
                ok = isinstance(value, str)
            elif expected == "a number":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise self.error(f"parameters.{key}", f"expected {expected}, got {_describe(value)}")

    def endpoint_list(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """``endpoint:`` as one mapping (one endpoint, as always) or a list (several, multi-endpoint).

        With the list form, ``endpoint_defaults`` gives keys every item gets unless it sets its own, and
        ``mixed_models`` allows endpoints serving different models.
        """
        data = job["endpoint"]
        mixed = job.get("mixed_models", False)
        if not isinstance(mixed, bool):
            raise self.error("mixed_models", f"expected true or false, got {_describe(mixed)}")
        defaults = job.get("endpoint_defaults")
        if not isinstance(data, list):
            for key in ("endpoint_defaults", "mixed_models"):
                if key in job:
                    raise self.error(key, "only applies when endpoint is a list of endpoints")
            return {"endpoint": self.endpoint(data)}
        if not data:
            raise self.error("endpoint", "expected at least one endpoint in the list")
        if defaults is not None:
            self.section(defaults, "endpoint_defaults", LIFECYCLE_KEYS)
        endpoints = []
        for index, item in enumerate(data):
            where = f"endpoint[{index}]"
            item = self.section(item, where, _ENDPOINT_KEYS)
            if defaults and "url" not in item and "provider" not in item:
                item = {**defaults, **item}
            endpoints.append(self.endpoint(item, where=where, index=index))
        endpoints = _distinct_url_labels(endpoints, given=["label" in item for item in data])
        labels = [e.label for e in endpoints]
        for index, label in enumerate(labels):
            if label in labels[:index]:
                raise self.error(f"endpoint[{index}].label", f"{label!r} names two endpoints; give each its own label")
        return {"endpoint": endpoints[0], "endpoints": tuple(endpoints), "mixed_models": mixed,
                "endpoint_defaults": dict(defaults) if defaults else None}

    # One of the longer checks: the three ways to name an endpoint and the keys each allows are read together.
    def endpoint(self, data: Any, *, where: str = "endpoint", index: int | None = None) -> EndpointSpec:
        data = self.section(data, where, _ENDPOINT_KEYS)
        kind = self.exactly_one(data, where, ENDPOINT_KINDS)
        prefix = where + "."
        label = self.key(EndpointSpec, data, "label", prefix=prefix)
        url = local = name = namespace = None
        serverless = self.serverless(data, kind, prefix)
        if kind in ("local", "name") and data.get("limits") is not None:
            raise self.error(f"{prefix}limits", "only applies to an endpoint given by url (or a serverless target): a "
                             "Dedicated endpoint's capacity is found by the adaptive concurrency limit")
        if kind == "provider":
            for key in (*LIFECYCLE_KEYS, "send_token"):
                if key in data:
                    raise self.error(f"{prefix}{key}", "only applies to an endpoint given by name or local; the "
                                     "Inference Providers router has no lifecycle and always gets the HF token")
        elif kind == "url":
            url = self.read(data, "url", _STRING, prefix=prefix)
            if not re.match(r"^https?://[^/\s]+", url):
                raise self.error(f"{prefix}url", f"expected an http:// or https:// URL, got {_no_userinfo(url)!r}")
            for key in LIFECYCLE_KEYS:
                if key in data:
                    raise self.error(
                        f"{prefix}{key}",
                        "only applies to an endpoint given by name or local; "
                        "batchrun does not manage the lifecycle of a url",
                    )
        elif kind == "local":
            local = data["local"]
            if local is None:
                local = {}
            if not isinstance(local, Mapping):
                raise self.error(
                    f"{prefix}local", f"expected a mapping of emulator settings (or {{}}), got {_describe(local)}"
                )
            local = dict(local)
        else:
            name = self.key(EndpointSpec, data, "name", prefix=prefix, default=_REQUIRED)
            if "namespace" not in data:
                raise self.error(
                    f"{prefix}namespace",
                    "is required with endpoint.name (the user or organization that owns the endpoint)",
                )
        if "namespace" in data:
            if kind != "name":
                raise self.error(f"{prefix}namespace", "only applies together with endpoint.name")
            namespace = self.key(EndpointSpec, data, "namespace", prefix=prefix, default=_REQUIRED)

        api_url = self.read(data, "api_url", _STRING, prefix=prefix, default=None)
        if api_url is not None:
            api_url = api_url.rstrip("/")
            if not re.match(r"^https?://", api_url) or not api_url.endswith("/v2"):
                raise self.error(
                    f"{prefix}api_url",
                    f"expected the control plane's base URL ending in /v2, got {_no_userinfo(api_url)!r}",
                )
        send_token = self.key(EndpointSpec, data, "send_token", prefix=prefix)
        if url is not None:  # an API key is held to the rules of a token sent (https beyond loopback)
            self.token_url(url, f"{prefix}url", send_token or bool(serverless.get("api_key_env")),
                           f"{prefix}send_token")
        if api_url is not None:  # huggingface_hub sends the token to every control-plane call
            self.token_url(api_url, f"{prefix}api_url", send_token, f"{prefix}send_token", always=True)
        on_finish = data.get("on_finish")
        if on_finish is not None and on_finish not in ON_FINISH:
            hint = _suggest(on_finish, ON_FINISH) if isinstance(on_finish, str) else ""
            raise self.error(f"{prefix}on_finish", f"expected one of {', '.join(ON_FINISH)}, got {on_finish!r}{hint}")
        price = self.key(EndpointSpec, data, "price_per_replica_hour", prefix=prefix)
        return EndpointSpec(
            url=url,
            local=local,
            name=name,
            namespace=namespace,
            api_url=api_url,
            scale=self.scale(data.get("scale")),
            ready_timeout=self.key(EndpointSpec, data, "ready_timeout", prefix=prefix),
            on_finish=on_finish,
            idle_backstop=self.key(EndpointSpec, data, "idle_backstop", prefix=prefix),
            price_per_replica_hour=price,
            send_token=send_token,
            label=label if label is not None or index is None else _default_label(
                kind, url, local, name, index, serverless.get("provider")),
            **serverless,
            limits=self.limits(data.get("limits"), prefix + "limits"),
        )

    def serverless(self, data: Mapping[str, Any], kind: str, prefix: str) -> dict[str, Any]:
        """The keys of a serverless target, billed per token: ``provider`` + ``model`` (the router), or
        ``url`` + ``model`` (an OpenAI-compatible API, its key in the environment variable ``api_key_env``).

        The key is looked up now, so that a missing variable is found before anything runs; its value is
        never kept in the spec."""
        if kind not in ("url", "provider"):
            for key in _PER_TOKEN_KEYS:
                if key in data:
                    raise self.error(f"{prefix}{key}", "only applies with endpoint.provider or endpoint.url")
            return {}
        if kind == "url" and "model" not in data:
            for key in ("router_url", "api_key_env", "price", "mode", "batch"):
                if key in data:
                    raise self.error(f"{prefix}{key}", "only applies with endpoint.model (an OpenAI-compatible API "
                                     "billed per token) or endpoint.provider")
            return {}
        values: dict[str, Any] = {"model": self.key(EndpointSpec, data, "model", prefix=prefix, default=_REQUIRED)}
        if kind == "provider":
            values["provider"] = self.key(EndpointSpec, data, "provider", prefix=prefix)
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", values["provider"]):
                raise self.error(f"{prefix}provider", f"expected a provider name (or auto), got {values['provider']!r}")
            if ":" in values["model"] or not re.fullmatch(r"[\w.-]+/[\w.-]+", values["model"]):
                raise self.error(f"{prefix}model", f"expected a model id ORG/NAME (the provider goes in "
                                 f"endpoint.provider), got {values['model']!r}")
            if "api_key_env" in data:
                raise self.error(f"{prefix}api_key_env", "only applies with endpoint.url: the router takes the "
                                 "Hugging Face token (HF_TOKEN, or `hf auth login`)")
            router_url = self.read(data, "router_url", _STRING, prefix=prefix, default=None)
            if router_url is not None and router_url != "local":
                router_url = router_url.rstrip("/")
                if not re.match(r"^https?://[^/\s]+", router_url) or not router_url.endswith("/v1"):
                    raise self.error(f"{prefix}router_url", "expected the router's base URL ending in /v1, or "
                                     f"local, got {_no_userinfo(router_url)!r}")
                self.token_url(router_url, f"{prefix}router_url", False, f"{prefix}send_token", always=True)
            values["router_url"] = router_url
        else:
            if "router_url" in data:
                raise self.error(f"{prefix}router_url", "only applies with endpoint.provider")
            variable = self.read(data, "api_key_env", _STRING, prefix=prefix, default=None)
            if variable is not None:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
                    raise self.error(f"{prefix}api_key_env", f"expected an environment variable name, got {variable!r}")
                if not os.environ.get(variable):
                    raise self.error(f"{prefix}api_key_env", f"the environment variable {variable} is not set: "
                                     "export the API key in it (the key is never written in the spec)")
                if "send_token" in data:
                    raise self.error(f"{prefix}send_token", "does not apply with api_key_env: the API key goes to "
                                     "endpoint.url, and the Hugging Face token does not")
            values["api_key_env"] = variable
        if data.get("price") is not None:
            price = self.section(data["price"], f"{prefix}price", _PRICE_KEYS)
            values["price"] = PriceSpec(**{k: self.key(PriceSpec, price, k, prefix=f"{prefix}price.")
                                           for k in _PRICE_KEYS})
        values.update(self.mode(data, prefix))
        return values

    def limits(self, data: Any, where: str) -> LimitsSpec | None:
        if data is None:
            return None
        data = self.section(data, where, _LIMITS_KEYS)
        prefix = where + "."
        return LimitsSpec(rpm=self.key(LimitsSpec, data, "rpm", prefix=prefix),
                          tpm=self.key(LimitsSpec, data, "tpm", prefix=prefix))

    def mode(self, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """``mode`` and its ``batch`` section: the batch API's limits and polling (batchrun/batches/)."""
        mode = self.key(EndpointSpec, data, "mode", prefix=prefix)
        if data.get("batch") is None:
            return {"mode": mode}
        if mode == "online":  # flex takes its discount from it
            raise self.error(f"{prefix}batch", "only applies with mode: batch (or flex, for its discount)")
        batch = self.section(data["batch"], f"{prefix}batch", _BATCH_KEYS)
        return {"mode": mode, "batch": BatchSpec(**{k: self.key(BatchSpec, batch, k, prefix=f"{prefix}batch.")
                                                   for k in _BATCH_KEYS})}

    def scale(self, data: Any) -> ScaleSpec | None:
        if data is None:
            return None
        data = self.section(data, "endpoint.scale", _SCALE_KEYS)
        prefix = "endpoint.scale."
        for key in _SCALE_KEYS:
            if key not in data:
                raise self.error(prefix + key, "is required")
        low = self.key(ScaleSpec, data, "min_replica", prefix=prefix)
        high = self.key(ScaleSpec, data, "max_replica", prefix=prefix)
        if low > high:
            raise self.error("endpoint.scale.min_replica", f"expected at most max_replica ({high}), got {low}")
        return ScaleSpec(min_replica=low, max_replica=high)

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

    # -- shapes --------------------------------------------------------------------------------

    def token_url(self, url: str, key: str, send_token: bool, opt_in_key: str, *, always: bool = False) -> None:
        """Refuse a url with credentials in it, and one the HF token must not reach: plain http beyond
        loopback when it would be sent (``send_token``, or ``always`` for huggingface_hub's calls), a
        host other than Hugging Face's unless ``send_token`` (``always``; a plain url then goes without it)."""
        from batchrun.transport import token_problem

        if urllib.parse.urlsplit(url).username is not None or "@" in urllib.parse.urlsplit(url).netloc:
            raise self.error(key, (
                f"{_no_userinfo(url)!r} has credentials in it (user:password@), which would be stored in job.json, "
                "summary.json and a published dataset card; remove them. batchrun sends the Hugging Face token "
                "(HF_TOKEN, or `hf auth login`) as a Bearer token: to give it to a host other than Hugging Face's, "
                f"set {opt_in_key}: true (https only)"))
        problem = token_problem(url, send_token=send_token)
        if problem is None:
            return
        if url.lower().startswith("http://") and (send_token or always):
            raise self.error(key, f"{problem}; use https (the token never goes over plain http beyond loopback)")
        if always:
            raise self.error(key, f"{problem} ({opt_in_key}: true), and huggingface_hub sends it on every call")

    def section(self, data: Any, key: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.error(key, f"expected a mapping with keys among {', '.join(allowed)}, got {_describe(data)}")
        self.keys(data, key + ".", allowed)
        return data

    def keys(self, data: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                label = key if isinstance(key, str) else repr(key)
                hint = _suggest(key, allowed) if isinstance(key, str) else ""
                raise self.error(
                    prefix + label, f"unknown key{hint or ''}; expected one of {', '.join(allowed)}"
                )

    def exactly_one(self, data: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
        present = [c for c in choices if c in data]
        if len(present) != 1:
            got = "none" if not present else " and ".join(present)
            raise self.error(key, f"expected exactly one of {', '.join(choices)}, got {got}")
        return present[0]

    # -- scalars -------------------------------------------------------------------------------
    # A missing key (or an explicit null, but for a boolean) gets the default; a missing key with no
    # default is "required". Every message names the full key path and the value it got.

    def key(
        self, spec_class: type, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _DECLARED,
    ) -> Any:
        """Key ``key`` of ``data``, read as ``spec_class`` declares it: its shape, and its default unless given."""
        shape, declared_default = declared(spec_class)[key]
        if default is _DECLARED:
            default = _REQUIRED if declared_default is dataclasses.MISSING else declared_default
        return self.read(data, key, shape, prefix=prefix, default=default)

    def read(
        self, data: Mapping[str, Any], key: str, shape: Shape, *, prefix: str = "", default: Any = _REQUIRED,
    ) -> Any:
        """Key ``key`` of ``data`` in ``shape``, ``default`` if it is missing or null."""
        value = data.get(key)
        if value is None:
            if shape.kind == "boolean" and key in data:
                raise self.error(prefix + key, "expected true or false, got null")
            if default is _REQUIRED:
                null = shape.kind == "string" and key in data
                raise self.error(prefix + key, "expected a string, got null" if null else "is required")
            return default
        converted = shape.convert(value)
        if converted is INVALID:
            raise self.error(prefix + key, f"expected {shape.expected}, got {_describe(value)}")
        return converted


def _no_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, for messages."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", url)


def _is_data_files(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_data_files(v) and not isinstance(v, Mapping) for k, v in value.items())
    return False


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
    if _URL.match(path.strip()) and not re.match(r"^(s3|gs)://[^/\s]+/[^/\s]", path.strip()):
        # Path() would make "hf://buckets/x" a local folder "hf:/buckets/x": only the stores the commit
        # protocol supports (docs/object-storage.md) are taken, with a bucket and a prefix of the job's own.
        return (f"expected a local folder or s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, got the URL "
                f"{_no_userinfo(path)!r}: other stores (hf://, file://...) have no conditional writes batchrun "
                "uses; write to a local (or mounted) folder and push it with `batchrun push`")
    if last in ("", ".", ".."):
        # The output folder gets a manifest, shards and a lock of its own; `.` would scatter them
        # among the user's files (and a fresh run would clear them).
        return f"expected a folder of the job's own, like out/{{job name}}, got {path!r}; name a folder"
    return None


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{value!r} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
