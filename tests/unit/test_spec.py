"""The job spec: what a valid spec becomes, and what every mistake says (reliability.md §5)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from batchrun.errors import SpecError
from batchrun.spec import (
    DEFAULT_SHARD_BYTES,
    BudgetSpec,
    ConcurrencySpec,
    ImageSpec,
    JobSpec,
    OutputSpec,
    RetrySpec,
    load_spec,
    parse_duration,
    parse_size,
    parse_spec,
)
from batchrun.task_kinds import TASK_KINDS

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "task": "chat-completion",
    "input": {"parquet": "data/prompts.parquet"},
    "prompt": {"template": "Write about {topic}."},
    "endpoint": {"url": "http://127.0.0.1:8080"},
}


def spec_with(**changes) -> dict:
    """MINIMAL with top-level keys replaced (``None`` deletes one)."""
    data = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def spec_error(data, file="job.yaml") -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data, file=file)
    return info.value


def write(tmp_path: Path, text: str, name: str = "poems.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- valid specs --------------------------------------------------------------------------------


def test_a_minimal_spec_gets_the_documented_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.name == "job"
    assert spec.concurrency.max == 256 and spec.concurrency.initial == 48
    r = spec.retries
    assert (r.max_attempts, r.backoff_base, r.backoff_cap, r.max_retry_after, r.budget_ratio) == (5, 0.5, 30, 120, 0.1)
    assert spec.request_timeout == 120
    assert spec.output.shard_rows == 10_000 and spec.output.shard_bytes == DEFAULT_SHARD_BYTES == 64 * 2**20
    assert spec.endpoint.ready_timeout == 20 * 60 and spec.endpoint.idle_backstop == 15 * 60
    assert spec.budget.max_usd is None and spec.budget.deadline is None
    assert spec.failure_threshold is None
    assert spec.input.kind == "parquet" and spec.input.path == "data/prompts.parquet"
    assert spec.output.path == "out/job"


def test_the_full_example_from_the_issue_loads(tmp_path):
    path = write(
        tmp_path,
        """
name: poems
task: chat-completion
input:
  parquet: sample_data/prompts.parquet
  id_column: id
  limit: 100
  keep_columns: [topic]
prompt:
  template: "Please write a short poem about {topic}."
  system: "You are a poet."
parameters: {max_tokens: 100, temperature: 0.2, seed: 42}
endpoint:
  name: gemma-1-1-2b-it-001
  namespace: my-org
  api_url: https://api.endpoints.huggingface.cloud/v2
  scale: {min_replica: 4, max_replica: 4}
  ready_timeout: 20m
  on_finish: pause
  idle_backstop: 15m
  price_per_replica_hour: 1.80
budget: {max_usd: 25, deadline: 6h}
concurrency: {max: 256, initial: 8}
retries: {max_attempts: 5, backoff_base: 0.5, backoff_cap: 30, max_retry_after: 120, budget_ratio: 0.1}
request_timeout: 120s
failure_threshold: 0.5
output:
  path: out/poems
  shard_rows: 10000
  shard_bytes: 64MB
""",
    )
    spec = load_spec(path)
    assert spec.name == "poems" and spec.file == str(path)
    assert spec.input.keep_columns == ("topic",) and spec.input.limit == 100 and spec.input.id_column == "id"
    assert spec.prompt.system == "You are a poet." and spec.prompt.columns == ("topic",)
    assert spec.parameters == {"max_tokens": 100, "temperature": 0.2, "seed": 42}
    e = spec.endpoint
    assert e.kind == "name" and e.namespace == "my-org" and e.scale.min_replica == 4 and e.scale.max_replica == 4
    assert e.ready_timeout == 1200 and e.idle_backstop == 900 and e.on_finish == "pause"
    assert e.price_per_replica_hour == 1.8
    assert spec.budget.max_usd == 25 and spec.budget.deadline == 6 * 3600
    assert spec.failure_threshold == 0.5
    assert spec.output.shard_bytes == 64_000_000
    assert spec.raw["endpoint"]["scale"] == {"min_replica": 4, "max_replica": 4}


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_spec_loads(job, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_spec(job)
    assert spec.name and spec.task in TASK_KINDS


def test_the_shipped_jobs_cover_quickstart_poems_textgen_dataset_images_vision_conversations_and_batches():
    names = {p.stem for p in (REPO / "jobs").glob("*.yaml")}
    assert {"quickstart", "poems", "textgen", "dataset", "images", "vision", "conversations", "openai_batch"} <= names


def test_the_name_defaults_to_the_file_stem(tmp_path):
    text = "task: text-generation\ninput: {jsonl: q.jsonl}\nprompt: {column: question}\nendpoint: {local: {}}\n"
    spec = load_spec(write(tmp_path, text, "nightly-run.yaml"))
    assert spec.name == "nightly-run" and spec.output.path == "out/nightly-run"


def test_output_override_replaces_the_output_path_and_keeps_the_rest(tmp_path):
    text = "task: text-generation\ninput: {jsonl: q.jsonl}\nprompt: {column: q}\nendpoint: {local: {}}\noutput: {path: out/a, shard_rows: 7}\n"
    spec = load_spec(write(tmp_path, text), output_override="elsewhere")
    assert spec.output.path == "elsewhere" and spec.output.shard_rows == 7


def test_relative_paths_stay_exactly_as_written():
    spec = parse_spec(spec_with(input={"parquet": "../data/*.parquet"}, output={"path": "./out/x"}))
    assert spec.input.path == "../data/*.parquet" and spec.output.path == "./out/x"


def test_a_dataset_input_takes_load_dataset_arguments_and_defaults_to_the_train_split():
    spec = parse_spec(spec_with(input={"dataset": {"path": "parquet", "data_files": {"train": ["a.parquet"]},
                                                   "revision": "abc", "options": {"columns": ["x"]}}}))
    ds = spec.input.dataset
    assert spec.input.kind == "dataset" and spec.input.path is None
    assert ds.path == "parquet" and ds.split == "train" and ds.revision == "abc"
    assert ds.data_files == {"train": ["a.parquet"]} and ds.options == {"columns": ["x"]}


def test_a_dataset_given_as_a_string_is_its_path():
    spec = parse_spec(spec_with(input={"dataset": "user/poems"}))
    assert spec.input.dataset.path == "user/poems"


def test_a_local_endpoint_keeps_its_settings_as_a_plain_dict():
    spec = parse_spec(spec_with(endpoint={"local": {"replicas": 2, "model_id": "m"}, "scale": {"min_replica": 1, "max_replica": 2}}))
    assert spec.endpoint.kind == "local" and spec.endpoint.local == {"replicas": 2, "model_id": "m"}
    assert parse_spec(spec_with(endpoint={"local": None})).endpoint.local == {}


def test_config_objects_are_frozen_keyword_only_and_readable():
    spec = parse_spec(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    with pytest.raises(TypeError):
        type(spec.retries)(5)  # positional arguments are refused
    assert repr(spec.retries) == "RetrySpec(max_attempts=5, backoff_base=0.5, backoff_cap=30.0, max_retry_after=120.0, budget_ratio=0.1, invalid_output=2)"
    assert "raw=" not in repr(spec)


def test_identity_holds_task_prompt_parameters_and_endpoint_but_not_tuning():
    base = parse_spec(spec_with(parameters={"max_tokens": 10}))
    assert base.identity() == {
        "task": "chat-completion",
        "prompt": {"template": "Write about {topic}.", "column": None, "system": None},
        "parameters": {"max_tokens": 10},
        "endpoint": {"kind": "url"},
    }
    tuned = parse_spec(spec_with(parameters={"max_tokens": 10}, concurrency={"max": 4}, input={"parquet": "x", "limit": 3}))
    assert tuned.identity() == base.identity()
    assert parse_spec(spec_with(parameters={"max_tokens": 11})).identity() != base.identity()


def test_identity_names_a_dedicated_endpoint_by_namespace_and_name_and_a_local_one_by_model():
    named = parse_spec(spec_with(endpoint={"name": "e", "namespace": "org"}))
    assert named.identity()["endpoint"] == {"namespace": "org", "name": "e"}
    local = parse_spec(spec_with(endpoint={"local": {"model_id": "tiny"}}))
    assert local.identity()["endpoint"] == {"local": True, "model": "tiny"}


def test_a_url_endpoint_that_moves_keeps_its_identity():
    a = parse_spec(spec_with(endpoint={"url": "http://h:1/"})).identity()
    b = parse_spec(spec_with(endpoint={"url": "http://other:2/v1"})).identity()
    assert a == b


# --- error messages -----------------------------------------------------------------------------


def test_an_error_names_the_file_the_key_path_and_what_was_expected():
    err = spec_error(spec_with(retries={"max_attempts": "five"}))
    assert err.file == "job.yaml" and err.key == "retries.max_attempts"
    assert err.problem == "expected a positive integer, got 'five'"
    assert str(err) == "job.yaml: retries.max_attempts: expected a positive integer, got 'five'"


@pytest.mark.parametrize(
    ("section", "typo", "suggestion"),
    [
        (None, "concurency", "concurrency"),
        ("input", "id_colum", "id_column"),
        ("retries", "max_attempt", "max_attempts"),
        ("output", "shard_row", "shard_rows"),
    ],
)
def test_an_unknown_key_is_an_error_with_a_did_you_mean(section, typo, suggestion):
    data = copy.deepcopy(MINIMAL)
    target = data if section is None else data.setdefault(section, {})
    if section == "output":
        target["path"] = "out"
    target[typo] = 1
    err = spec_error(data)
    assert err.key == (typo if section is None else f"{section}.{typo}")
    assert f"did you mean {suggestion!r}" in err.problem


def test_an_unknown_key_with_no_close_match_lists_the_expected_keys():
    err = spec_error(spec_with(prompt={"template": "{a}", "zzz": 1}))
    assert err.key == "prompt.zzz" and "did you mean" not in err.problem and "template, column, system" in err.problem


def test_unknown_keys_inside_nested_sections_are_caught_too():
    err = spec_error(spec_with(endpoint={"name": "e", "namespace": "o", "scale": {"min_replicas": 1, "max_replica": 2}}))
    assert err.key == "endpoint.scale.min_replicas" and "did you mean 'min_replica'" in err.problem


@pytest.mark.parametrize(
    ("section", "value", "got"),
    [
        ("input", {"limit": 3}, "none"),
        ("input", {"parquet": "a", "jsonl": "b"}, "parquet and jsonl"),
        ("prompt", {"system": "x"}, "none"),
        ("prompt", {"template": "{a}", "column": "a"}, "template and column"),
        ("endpoint", {"url": "http://x", "local": {}}, "url and local"),
        ("endpoint", {}, "none"),
    ],
)
def test_exactly_one_of_each_choice_is_required(section, value, got):
    err = spec_error(spec_with(**{section: value}))
    assert err.key == section and "expected exactly one of" in err.problem and err.problem.endswith(f"got {got}")


@pytest.mark.parametrize("missing", ["task", "input", "prompt", "endpoint"])
def test_the_four_core_sections_are_required(missing):
    err = spec_error(spec_with(**{missing: None}))
    assert err.key == missing and "required" in err.problem




def test_a_misspelt_task_gets_a_suggestion():
    err = spec_error(spec_with(task="chat-completions"))
    assert "did you mean 'chat-completion'" in err.problem


@pytest.mark.parametrize("task", ["text-generation", "text-to-image"])
def test_a_system_prompt_is_only_for_chat_and_vision(task):
    err = spec_error(spec_with(task=task, prompt={"template": "{a}", "system": "x"}))
    assert err.key == "prompt.system" and "chat-completion" in err.problem


@pytest.mark.parametrize(
    ("template", "expected"),
    [("no placeholders", "at least one"), ("{0} and {}", "positional"), ("{row.topic}", "plain column"), ("{unclosed", "template")],
)
def test_a_template_must_use_named_column_placeholders(template, expected):
    err = spec_error(spec_with(prompt={"template": template}))
    assert err.key == "prompt.template" and expected in err.problem


def test_a_named_endpoint_needs_a_namespace():
    err = spec_error(spec_with(endpoint={"name": "gemma"}))
    assert err.key == "endpoint.namespace" and "required" in err.problem


@pytest.mark.parametrize("key", ["scale", "on_finish", "idle_backstop", "ready_timeout", "api_url", "price_per_replica_hour"])
def test_lifecycle_keys_are_refused_for_a_plain_url(key):
    value = {"scale": {"min_replica": 1, "max_replica": 1}, "on_finish": "pause", "idle_backstop": "1m",
             "ready_timeout": "1m", "api_url": "https://x/v2", "price_per_replica_hour": 1}[key]
    err = spec_error(spec_with(endpoint={"url": "http://x", key: value}))
    assert err.key == f"endpoint.{key}" and "name or local" in err.problem


def test_the_control_plane_url_must_end_in_v2():
    err = spec_error(spec_with(endpoint={"name": "e", "namespace": "o", "api_url": "https://api.example.com/v1"}))
    assert err.key == "endpoint.api_url" and "/v2" in err.problem


def test_on_finish_accepts_only_its_three_values():
    err = spec_error(spec_with(endpoint={"name": "e", "namespace": "o", "on_finish": "scale_to_zero"}))
    assert err.key == "endpoint.on_finish" and "did you mean 'scale-to-zero'" in err.problem


def test_min_replica_may_not_exceed_max_replica():
    err = spec_error(spec_with(endpoint={"local": {}, "scale": {"min_replica": 3, "max_replica": 2}}))
    assert err.key == "endpoint.scale.min_replica"


def test_initial_concurrency_may_not_exceed_the_ceiling():
    err = spec_error(spec_with(concurrency={"max": 4, "initial": 8}))
    assert err.key == "concurrency.initial" and "at most" in err.problem
    assert parse_spec(spec_with(concurrency={"max": 4})).concurrency.initial == 4


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"input": {"parquet": "x", "limit": 0}}, "input.limit"),
        ({"input": {"parquet": "x", "limit": True}}, "input.limit"),
        ({"input": {"parquet": "x", "keep_columns": "topic"}}, "input.keep_columns"),
        ({"input": {"parquet": ""}}, "input.parquet"),
        ({"input": {"dataset": {"split": "train"}}}, "input.dataset.path"),
        ({"input": {"dataset": {"path": "p", "data_files": 3}}}, "input.dataset.data_files"),
        ({"failure_threshold": 1.5}, "failure_threshold"),
        ({"retries": {"budget_ratio": 0}}, "retries.budget_ratio"),
        ({"retries": {"backoff_base": 10, "backoff_cap": 1}}, "retries.backoff_cap"),
        ({"budget": {"max_usd": -1}}, "budget.max_usd"),
        ({"parameters": ["max_tokens"]}, "parameters"),
        ({"endpoint": {"url": "127.0.0.1:8080"}}, "endpoint.url"),
        ({"endpoint": {"local": "yes"}}, "endpoint.local"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_bad_values_name_their_key(changes, key):
    assert spec_error(spec_with(**changes)).key == key


def test_a_spec_that_is_not_a_mapping_is_refused():
    err = spec_error(["task"])
    assert err.key == "(top level)" and "mapping" in err.problem


# --- durations and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), (2.5, 2.5), ("90", 90.0), ("90s", 90.0), ("20m", 1200.0), ("6h", 21600.0),
     ("1h30m", 5400.0), ("1m30s", 90.0), ("250ms", 0.25), ("1d", 86400.0), ("1.5h", 5400.0)],
)
def test_durations_accept_seconds_and_unit_strings(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_spec(spec_with(request_timeout=text)).request_timeout == seconds


@pytest.mark.parametrize("text", ["soon", "10 minutes", "h", "5x", True, [], "-5s"])
def test_a_bad_duration_says_what_a_duration_looks_like(text):
    err = spec_error(spec_with(request_timeout=text))
    assert err.key == "request_timeout" and "'90s', '20m', '6h', '1h30m'" in err.problem


def test_a_zero_or_negative_duration_is_refused():
    assert spec_error(spec_with(budget={"deadline": 0})).key == "budget.deadline"
    assert spec_error(spec_with(request_timeout=-1)).key == "request_timeout"


@pytest.mark.parametrize(
    ("text", "size"),
    [(1000, 1000), ("64MB", 64_000_000), ("64MiB", 64 * 2**20), ("1GiB", 2**30), ("512kb", 512_000), ("100B", 100), ("2048", 2048)],
)
def test_sizes_accept_bytes_and_si_or_iec_units(text, size):
    assert parse_size(text) == size
    assert parse_spec(spec_with(output={"path": "o", "shard_bytes": text})).output.shard_bytes == size


@pytest.mark.parametrize("text", ["big", "64 parsecs", 0, -1, True])
def test_a_bad_size_names_the_key(text):
    err = spec_error(spec_with(output={"path": "o", "shard_bytes": text}))
    assert err.key == "output.shard_bytes" and "'64MB'" in err.problem


# --- files --------------------------------------------------------------------------------------


def test_a_yaml_syntax_error_becomes_a_spec_error_with_the_line(tmp_path):
    path = write(tmp_path, "task: chat-completion\ninput:\n  parquet: [unclosed\nprompt: {column: p}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.file == str(path)
    assert info.value.key.startswith("line ") and "invalid YAML" in info.value.problem


def test_a_tab_indented_spec_reports_its_line(tmp_path):
    path = write(tmp_path, "task: chat-completion\ninput:\n\tparquet: x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.key.startswith("line 3")


def test_a_missing_spec_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert "no such file" in info.value.problem


def test_an_empty_spec_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "# nothing yet\n"))
    assert "empty" in info.value.problem


def test_errors_from_a_file_carry_its_path(tmp_path):
    path = write(tmp_path, "task: chat-completion\ninput: {parquet: x, limit: five}\nprompt: {column: p}\nendpoint: {local: {}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: input.limit: expected a positive integer, got 'five'"


def test_jobspec_is_exported_with_the_loader():
    assert isinstance(parse_spec(MINIMAL), JobSpec)


# --- image tasks --------------------------------------------------------------------------------

TEXT_TO_IMAGE = spec_with(task="text-to-image", prompt={"column": "prompt"})
VISION = spec_with(task="image-text-to-text", prompt={"template": "{question}", "image_column": "image"})


def image_spec(base: dict, **changes) -> dict:
    data = copy.deepcopy(base)
    data.update(changes)
    return data


def test_a_text_to_image_spec_gets_png_and_seeds_derived_from_ids_by_default():
    spec = parse_spec(TEXT_TO_IMAGE)
    assert spec.task == "text-to-image"
    assert spec.image == ImageSpec(format="png", seed_column=None, seed=0)
    assert spec.identity()["image"] == {"format": "png", "seed_column": None, "seed": 0}


def test_a_text_to_image_spec_takes_format_seed_column_and_job_seed():
    spec = parse_spec(image_spec(TEXT_TO_IMAGE, image={"format": "JPG", "seed_column": "seed", "seed": 7}))
    assert (spec.image.format, spec.image.seed_column, spec.image.seed) == ("jpeg", "seed", 7)


@pytest.mark.parametrize("change", [{"format": "webp"}, {"seed": 1}, {"seed_column": "s"}])
def test_the_image_options_that_change_pictures_are_part_of_the_identity(change):
    base = parse_spec(TEXT_TO_IMAGE).identity()
    assert parse_spec(image_spec(TEXT_TO_IMAGE, image=change)).identity() != base


def test_a_vision_spec_names_its_image_column_and_may_downsize():
    spec = parse_spec(image_spec(VISION, image={"max_side": 512, "base_dir": "pics"}))
    assert spec.prompt.image_column == "image" and spec.prompt.columns == ("question", "image")
    assert spec.image.max_side == 512 and spec.image.base_dir == "pics"
    identity = spec.identity()
    assert identity["prompt"]["image_column"] == "image" and identity["image"] == {"max_side": 512}
    moved = parse_spec(image_spec(VISION, image={"max_side": 512, "base_dir": "elsewhere"}))
    assert moved.identity() == identity  # a folder is a location, not a configuration
    assert parse_spec(image_spec(VISION, image={"max_side": 256})).identity() != identity


def test_a_vision_spec_may_have_a_system_prompt():
    spec = parse_spec(image_spec(VISION, prompt={"column": "question", "image_column": "image", "system": "Be brief."}))
    assert spec.prompt.system == "Be brief."


def test_text_jobs_keep_their_identity_without_image_keys():
    assert "image" not in parse_spec(MINIMAL).identity()
    assert parse_spec(MINIMAL).image is None


def test_a_vision_spec_without_an_image_column_is_refused():
    err = spec_error(image_spec(VISION, prompt={"template": "{question}"}))
    assert err.key == "prompt.image_column" and "required" in err.problem


@pytest.mark.parametrize("task", ["chat-completion", "text-to-image"])
def test_an_image_column_is_refused_outside_vision(task):
    err = spec_error(spec_with(task=task, prompt={"template": "{a}", "image_column": "image"}))
    assert err.key == "prompt.image_column" and "image-text-to-text" in err.problem


def test_an_image_section_is_refused_for_a_text_job():
    err = spec_error(spec_with(image={"format": "png"}))
    assert err.key == "image" and "text-to-image" in err.problem


@pytest.mark.parametrize(
    ("base", "image", "key", "expected"),
    [
        (TEXT_TO_IMAGE, {"format": "gif"}, "image.format", "expected one of png, jpeg, webp"),
        (TEXT_TO_IMAGE, {"fromat": "png"}, "image.fromat", "did you mean 'format'"),
        (TEXT_TO_IMAGE, {"seed": -1}, "image.seed", "non-negative integer"),
        (TEXT_TO_IMAGE, {"seed_column": ""}, "image.seed_column", "non-empty string"),
        (TEXT_TO_IMAGE, {"max_side": 512}, "image.max_side", "only applies to task image-text-to-text"),
        (VISION, {"format": "png"}, "image.format", "only applies to task text-to-image"),
        (VISION, {"max_side": 0}, "image.max_side", "positive integer"),
    ],
)
def test_image_option_errors_name_the_key_and_what_was_expected(base, image, key, expected):
    err = spec_error(image_spec(base, image=image), file="jobs/images.yaml")
    assert err.file == "jobs/images.yaml" and err.key == key and expected in err.problem


def test_a_text_to_image_seed_in_parameters_points_to_the_image_options():
    err = spec_error(image_spec(TEXT_TO_IMAGE, parameters={"seed": 3}))
    assert err.key == "parameters.seed" and "image.seed_column" in err.problem


@pytest.mark.parametrize(
    ("parameters", "key"),
    [({"width": "256"}, "parameters.width"), ({"num_inference_steps": 0}, "parameters.num_inference_steps"),
     ({"guidance_scale": True}, "parameters.guidance_scale"), ({"negative_prompt": 3}, "parameters.negative_prompt")],
)
def test_text_to_image_parameters_are_type_checked(parameters, key):
    assert spec_error(image_spec(TEXT_TO_IMAGE, parameters=parameters)).key == key


# --- defaults and keys declared once ------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "spec_class"),
    [("concurrency", ConcurrencySpec), ("retries", RetrySpec), ("budget", BudgetSpec), ("image", ImageSpec)],
)
def test_an_empty_section_and_a_missing_one_both_get_the_dataclass_defaults(section, spec_class):
    task = "text-to-image" if section == "image" else "chat-completion"
    prompt = {"column": "prompt"}
    given = getattr(parse_spec(spec_with(task=task, prompt=prompt, **{section: {}})), section)
    missing = getattr(parse_spec(spec_with(task=task, prompt=prompt)), section)
    assert given == missing == spec_class()


@pytest.mark.parametrize(
    ("section", "spec_class"),
    [("retries", RetrySpec), ("concurrency", ConcurrencySpec), ("output", OutputSpec), ("budget", BudgetSpec)],
)
def test_an_unknown_key_lists_the_config_class_fields_as_the_expected_keys(section, spec_class):
    err = spec_error(spec_with(**{section: {"zzz": 1}}))
    assert err.key == f"{section}.zzz"
    assert f"expected one of {', '.join(f.name for f in dataclasses.fields(spec_class))}" in err.problem


# --- duplicate keys -----------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_naming_its_path_and_both_lines(tmp_path):
    text = (
        "task: chat-completion\n"
        "input: {parquet: a.parquet}\n"
        "prompt: {column: q}\n"
        "endpoint:\n"
        "  url: http://127.0.0.1:1\n"
        "retries:\n"
        "  max_attempts: 3\n"
        "  backoff_base: 1\n"
        "  max_attempts: 9\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert info.value.key == "retries.max_attempts"
    assert "lines 7 and 9" in info.value.problem


def test_a_top_level_key_given_twice_is_refused(tmp_path):
    text = "task: chat-completion\ninput: {parquet: a.parquet}\nprompt: {column: q}\nendpoint: {url: http://h:1}\ntask: text-generation\n"
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert info.value.key == "task" and "lines 1 and 5" in info.value.problem


def test_a_key_given_twice_inside_a_list_item_names_the_item(tmp_path):
    text = (
        "task: chat-completion\ninput: {parquet: a.parquet}\nprompt: {column: q}\nendpoint: {url: http://h:1}\n"
        "parameters:\n  tools:\n    - {name: a, name: b}\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert info.value.key == "parameters.tools[0].name" and "lines 7 and 7" in info.value.problem


def test_a_key_brought_in_by_a_merge_may_be_overridden(tmp_path):
    text = (
        "base: &base {max_tokens: 10, temperature: 0.5}\n"
        "task: chat-completion\ninput: {parquet: a.parquet}\nprompt: {column: q}\nendpoint: {url: http://h:1}\n"
        "parameters: {<<: *base, max_tokens: 20}\n"
    )
    # `base` is not a job key, so the spec is refused for that, not for the overridden max_tokens.
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert info.value.key == "base"


# --- parameters the route would ignore or batchrun owns -----------------------------------------


@pytest.mark.parametrize(
    ("task", "wrong", "right"),
    [
        ("chat-completion", "max_new_tokens", "max_tokens"),
        ("image-text-to-text", "max_new_tokens", "max_tokens"),
        ("text-generation", "max_tokens", "max_new_tokens"),
    ],
)
def test_a_token_limit_under_the_other_routes_name_is_refused_saying_which_name_to_use(task, wrong, right):
    prompt = {"column": "q", "image_column": "img"} if task == "image-text-to-text" else {"column": "q"}
    err = spec_error(spec_with(task=task, prompt=prompt, parameters={wrong: 50}))
    assert err.key == f"parameters.{wrong}"
    assert f"takes {right}; rename it" in err.problem


def test_both_token_limit_names_in_one_chat_job_ask_to_remove_the_wrong_one():
    err = spec_error(spec_with(parameters={"max_tokens": 5, "max_new_tokens": 50}))
    assert err.key == "parameters.max_new_tokens" and "remove it" in err.problem


@pytest.mark.parametrize(
    ("task", "parameters", "key"),
    [
        ("chat-completion", {"stream": True}, "parameters.stream"),
        ("text-generation", {"stream": True}, "parameters.stream"),
        ("text-generation", {"details": False}, "parameters.details"),
        ("chat-completion", {"messages": []}, "parameters.messages"),
    ],
)
def test_parameters_batchrun_sets_or_cannot_read_are_spec_errors_naming_them(task, parameters, key):
    assert spec_error(spec_with(task=task, prompt={"column": "q"}, parameters=parameters)).key == key


def test_stream_false_is_accepted():
    assert parse_spec(spec_with(parameters={"stream": False})).parameters == {"stream": False}


# --- the output folder --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "  ", ".", "./", "..", "out/..", "out/.", "/"])
def test_an_output_override_that_names_no_folder_of_its_own_is_refused(tmp_path, path):
    text = "task: text-generation\ninput: {jsonl: q.jsonl}\nprompt: {column: q}\nendpoint: {local: {}}\n"
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), output_override=path)
    assert info.value.key == "--output"


@pytest.mark.parametrize("path", ["", ".", "..", "results/."])
def test_an_output_path_that_names_no_folder_of_its_own_is_refused(path):
    err = spec_error(spec_with(output={"path": path}))
    assert err.key == "output.path"


def test_a_dot_output_path_asks_for_a_folder():
    assert "name a folder" in spec_error(spec_with(output={"path": "."})).problem


# --- YAML aliases that expand without limit ---------------------------------------------------------


def _alias_bomb(levels: int) -> str:
    """A 'billion laughs' spec: each level lists the previous one nine times (9**levels values)."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return (
        "task: chat-completion\ninput: {parquet: a.parquet}\nprompt: {column: q}\nendpoint: {url: http://h:1}\n"
        "parameters:\n  extra_body:\n    " + "\n    ".join(lines) + "\n"
    )


def test_aliases_that_expand_past_the_bound_are_refused_naming_the_file(tmp_path):
    # 9**6 = 531441 values from a dozen lines; without the bound it loads (and 9**9 takes the machine's memory).
    path = write(tmp_path, _alias_bomb(6))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.file == str(path)
    assert "aliases" in info.value.problem and "10,000" in info.value.problem


def test_a_billion_laughs_is_refused_at_once(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, _alias_bomb(9)))
    assert "aliases" in info.value.problem


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    text = (
        "task: chat-completion\ninput: {parquet: a.parquet}\nprompt: {column: q}\nendpoint: {url: http://h:1}\n"
        "parameters:\n  extra_body: &loop {self: *loop}\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert "recursive" in info.value.problem


def test_a_few_aliases_for_shared_settings_still_load(tmp_path):
    text = (
        "task: chat-completion\ninput: {parquet: a.parquet}\nprompt: {column: q}\nendpoint: {url: http://h:1}\n"
        "parameters: {max_tokens: 10, stop: &s [a, b], extra_body: {also: *s}}\n"
        "retries: {max_attempts: 3}\n"
    )
    spec = load_spec(write(tmp_path, text))
    assert spec.parameters["stop"] == ["a", "b"] and spec.parameters["extra_body"] == {"also": ["a", "b"]}
