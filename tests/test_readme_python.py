"""The README's Python examples run as they are written, on the built-in emulator."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def python_examples() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### From Python and notebooks", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_python_examples_run_and_print_what_they_say(tmp_path, monkeypatch, capsys):
    examples = python_examples()
    assert len(examples) == 2
    monkeypatch.chdir(tmp_path)  # the examples write out/ where they run
    namespace: dict = {}
    for example in examples:
        exec(compile(example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "<Result exit 0: 3 ok, 0 failed, in " in printed
    assert printed.rstrip().endswith("3")
    assert namespace["result"].dataset["id"] == [0, 1, 2]
    assert (tmp_path / "out" / "haiku" / "state" / "summary.json").is_file()
    assert (tmp_path / "out" / "haiku-async" / "state" / "summary.json").is_file()
