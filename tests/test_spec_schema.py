"""The spec's shape is declared once: the JSON Schema and the README's key table agree with it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from batchrun.cli import main
from batchrun.errors import SpecError
from batchrun.spec import json_schema, load_spec, parse_duration, parse_size, parse_spec

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted((REPO / "jobs").glob("*.yaml"))

MINIMAL = {
    "task": "chat-completion",
    "input": {"parquet": "data/prompts.parquet"},
    "prompt": {"template": "Write about {topic}."},
    "endpoint": {"url": "http://127.0.0.1:8080"},
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json_schema()
    draft = jsonschema.validators.validator_for(schema)
    assert draft is jsonschema.Draft7Validator  # the draft editors' YAML tooling supports most widely
    draft.check_schema(schema)
    return draft(schema)


def problems(validator: jsonschema.Draft7Validator, data: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


# --------------------------------------------------------------------------------------------------
# The schema


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_validates_against_the_schema(validator, job: Path) -> None:
    assert problems(validator, yaml.safe_load(job.read_text(encoding="utf-8"))) == []


@pytest.mark.parametrize(("where", "typo"), [
    ((), "retires"),
    (("endpoint",), "on_finsh"),
    (("input",), "limt"),
    (("output",), "shard_row"),
])
def test_a_misspelt_key_fails_the_schema_as_it_fails_the_parser(validator, where: tuple[str, ...], typo: str) -> None:
    data = json.loads(json.dumps(MINIMAL))
    data.setdefault("output", {"path": "out/x"})
    section = data
    for key in where:
        section = section[key]
    section[typo] = 1
    assert problems(validator, data), "the schema let a misspelt key through"
    with pytest.raises(SpecError, match="unknown key"):
        parse_spec(data)


@pytest.mark.parametrize(("change", "why"), [
    ({"concurrency": {"max": 0}}, "below the minimum"),
    ({"request_timeout": "soon"}, "not a duration"),
    ({"endpoint": {"url": "http://127.0.0.1:8080", "name": "x", "namespace": "y"}}, "two ways to name it"),
    ({"input": {"parquet": "a.parquet", "jsonl": "b.jsonl"}}, "two inputs"),
    ({"prompt": None}, "no prompt for a chat job"),
    ({"endpoint": {"url": "http://127.0.0.1:8080", "on_finish": "stop"}}, "not a choice"),
])
def test_the_schema_refuses_what_the_parser_refuses(validator, change: dict, why: str) -> None:
    data = {**MINIMAL, **change}
    data = {k: v for k, v in data.items() if v is not None}
    assert problems(validator, data), why
    with pytest.raises(SpecError):
        parse_spec(data)


@pytest.mark.parametrize("change", [
    {"request_timeout": "1h30m", "output": {"shard_bytes": "64MiB"}},
    {"endpoint": [{"url": "http://127.0.0.1:8080"}, {"local": {}}], "endpoint_defaults": {"ready_timeout": "5m"}},
    {"input": {"dataset": "user/name"}},
    {"budget": None, "retries": {"max_attempts": 3, "budget_ratio": 0.5}},
    {"score": [{"exact_match": "answer"}, {"regex": {"pattern": "^a"}}], "notify": {"webhook": "${HOOK}"}},
])
def test_the_schema_accepts_what_the_parser_accepts(validator, change: dict) -> None:
    data = {**MINIMAL, **change}
    parse_spec(data)
    assert problems(validator, data) == []


def test_a_job_on_an_openai_batch_file_needs_no_task_nor_prompt(validator) -> None:
    data = {"input": {"openai_batch": "requests.jsonl"}, "endpoint": {"local": {}}}
    parse_spec(data)
    assert problems(validator, data) == []
    assert problems(validator, {**data, "prompt": {"column": "x"}})


def test_batchrun_schema_prints_the_schema_and_its_help_names_the_editor_line(capsys) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
    with pytest.raises(SystemExit):
        main(["schema", "--help"])
    assert "# yaml-language-server: $schema=" in capsys.readouterr().out


def test_a_job_file_with_the_editor_line_still_loads(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("# yaml-language-server: $schema=batchrun.schema.json\n" + yaml.safe_dump(MINIMAL))
    assert load_spec(job).task == "chat-completion"


# --------------------------------------------------------------------------------------------------
# The README's key table


def objects(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects with declared keys that a value of ``node`` may be (through anyOf, list items, $ref)."""
    if "$ref" in node:
        return objects(json_schema()["definitions"][node["$ref"].rsplit("/", 1)[-1]])
    if "properties" in node:
        return [node]
    nested = [*node.get("anyOf", []), *([node["items"]] if "items" in node else [])]
    return [found for each in nested for found in objects(each)]


def declared_keys() -> dict[str, dict[str, Any]]:
    """Every key path the schema declares (``retries.max_attempts``), with its schema."""
    schema = json_schema()
    found: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for obj in objects(node):
            for name, sub in obj["properties"].items():
                found[prefix + name] = sub
                walk(sub, f"{prefix}{name}.")

    walk(schema, "")
    return found


def readme_rows() -> list[tuple[list[str], str, str]]:
    """The key table's rows: (the key paths of the first column, the default cell, the meaning cell)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("Every key, with its default:", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        first, default, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        keys: list[str] = []
        for token in re.findall(r"`([^`]+)`", first):
            if token.startswith(".") or (keys and "." in keys[-1] and "." not in token):
                # `.split` or `namespace`: beside the key before it
                token = keys[-1].rsplit(".", 1)[0] + "." + token.lstrip(".")
            keys.append(token)
        rows.append((keys, default, meaning))
    return rows


def test_every_declared_key_is_in_the_readme_table() -> None:
    rows = readme_rows()
    documented = {key for keys, _, _ in rows for key in keys}
    named_in_row = {key: meaning for keys, _, meaning in rows for key in keys}
    missing = []
    for path in declared_keys():
        # endpoint_defaults takes the endpoint's own lifecycle keys, declared once for both.
        path = re.sub(r"^endpoint_defaults\.", "endpoint.", path)
        parents = [path.rsplit(".", n)[0] for n in range(1, path.count(".") + 1)]
        name = path.rsplit(".", 1)[-1]
        # A section's own keys may be listed in its row instead (`input.dataset`: `path`, `name`...).
        if path in documented or any(re.search(rf"\b{name}\b", named_in_row.get(p, "")) for p in parents):
            continue
        if any(key.startswith(path + ".") for key in documented):  # a section, documented key by key
            continue
        missing.append(path)
    assert missing == []


def test_every_key_in_the_readme_table_exists() -> None:
    declared = declared_keys()
    free_form = {path for path, node in declared.items() if not objects(node) and "object" in json.dumps(node)}
    unknown = [key for keys, _, _ in readme_rows() for key in keys
               if key not in declared and key.rsplit(".", 1)[0] not in free_form]
    assert unknown == []


def documented_default(cell: str) -> Any:
    """The value a default cell states (``5``, ``20m``, ``64MiB``, ``false``, ``none``), or ``...`` for prose."""
    text = re.sub(r"`?\s*\(s\)$", "", cell.strip()).strip("`")
    if text in ("none", "all"):  # no limit, no selection
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"[a-z-]+|[\d.]+\s*[A-Za-z]*", text):
        return normal(text)
    return ...


def normal(value: Any) -> Any:
    """A default as a number where it is one: ``"20m"`` and ``1200.0`` are the same default."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    for parse in (parse_duration, parse_size):
        number = parse(value)
        if number is not None:
            return float(number)
    return value


def test_the_readme_table_states_the_declared_defaults() -> None:
    declared = declared_keys()
    checked = 0
    for keys, cell, _ in readme_rows():
        cells = [c.strip() for c in cell.split(", ")]
        if len(cells) != len(keys):
            cells = [cell] * len(keys) if len(keys) == 1 or "," not in cell else []
        for key, text in zip(keys, cells):
            stated = documented_default(text)
            if stated is ... or key not in declared or text in ("required", "one required"):
                continue
            node = declared[key]
            if stated is None:
                assert "default" not in node, f"{key}: the README says none, the spec declares {node['default']!r}"
            else:
                assert "default" in node, f"{key}: the README says {text}, the spec declares no default"
                assert stated == normal(node["default"]), f"{key}: the README says {text}, the spec {node['default']!r}"
            checked += 1
    assert checked >= 30  # the table states most defaults; a parser change that skips them all must fail
