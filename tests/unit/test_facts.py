"""The facts declared once: exit codes and failure types keep the values users and files rely on."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import batchrun
from batchrun.errors import BatchrunError, EndpointError, EndpointUnusableError, JobStopped
from batchrun.facts import ExitCode
from batchrun.records import FailureType, http_failure_type

PACKAGE = Path(batchrun.__file__).parent


def test_exit_codes_keep_the_numbers_the_readme_documents() -> None:
    assert [(code.name, int(code)) for code in ExitCode] == [
        ("OK", 0), ("ROWS_FAILED", 1), ("NOTHING_RAN", 2), ("STOPPED_EARLY", 3), ("THRESHOLD_CROSSED", 4),
    ]


def test_errors_exit_with_the_declared_codes() -> None:
    assert BatchrunError.exit_code is ExitCode.NOTHING_RAN
    assert EndpointError.exit_code is ExitCode.STOPPED_EARLY
    assert EndpointUnusableError.exit_code is ExitCode.NOTHING_RAN
    assert JobStopped.exit_code is ExitCode.STOPPED_EARLY


def test_an_exit_code_is_written_to_json_as_a_plain_number() -> None:
    assert json.dumps({"exit_code": ExitCode.STOPPED_EARLY}) == '{"exit_code": 3}'


def test_failure_types_are_the_strings_stored_in_failure_rows() -> None:
    assert FailureType.TIMEOUT == "timeout" and str(FailureType.BAD_IMAGE) == "bad_image"
    assert f"{FailureType.INVALID_OUTPUT}" == "invalid_output"
    assert http_failure_type(422) == "http_422"


def test_every_literal_error_type_raised_is_a_declared_failure_type() -> None:
    declared = {str(kind) for kind in FailureType}
    loose = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "emulator" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RequestFailed" and node.args
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value not in declared):
                loose.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.args[0].value!r}")
    assert loose == []
