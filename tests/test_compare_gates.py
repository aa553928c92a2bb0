"""compare's gate: rows of every input kind keyed on their own ids, and thresholds that cannot be silently off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from jobkit import NS, TOKEN, emulator, run, running_endpoint, write_spec, write_topics

from batchrun.cli import main
from batchrun.compare import compare_runs


def _batch_spec(tmp_path: Path, url: str, out: Path, n: int) -> Path:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]},
    }) + "\n" for i in range(n)))
    spec: dict[str, Any] = {"name": "batch", "input": {"openai_batch": str(requests)},
                            "parameters": {"max_tokens": 12, "seed": 3}, "endpoint": {"url": url},
                            "output": {"path": str(out)}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_keys_openai_batch_rows_on_their_custom_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        url = emu.endpoint_url(NS, "gen")
        first, _ = run(_batch_spec(tmp_path, url, tmp_path / "a", 6))
        second, _ = run(_batch_spec(tmp_path, url, tmp_path / "b", 6))
    assert first.exit_code == 0 and second.exit_code == 0
    report = compare_runs(tmp_path / "a", tmp_path / "b")
    assert report.common == 6 and report.identical == 6  # one row per custom_id, not one row in all
    assert report.to_dict()["runs"]["a"]["ok"] == 6


def _scored_runs(tmp_path: Path, monkeypatch) -> tuple[str, str]:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    input_path = write_topics(tmp_path / "in" / "topics.parquet", 4)
    with emulator(running_endpoint()) as emu:
        outs = []
        for name in ("a", "b"):
            spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                              name=name, parameters={"max_tokens": 8, "seed": 1},
                              output={"path": str(tmp_path / name)}, score=[{"regex": {"pattern": "[a-z]"}}])
            outcome, _ = run(spec)
            outs.append(outcome.summary["output"])
    return outs[0], outs[1]


def test_a_misspelt_score_metric_is_refused_not_silently_never_crossed(tmp_path, monkeypatch, capsys):
    a, b = _scored_runs(tmp_path, monkeypatch)
    assert main(["compare", a, b, "--fail-if", "score_regx<0.5"]) == 2
    err = capsys.readouterr().err
    assert "score_regx" in err and "score_regex" in err
    assert main(["compare", a, b, "--fail-if", "score_error>0"]) == 2  # a text column, not a score
    assert main(["compare", a, b, "--fail-if", "score_regex<2"]) == 4  # the real column still gates
    assert main(["compare", a, b, "--fail-if", "score_regex<0"]) == 0
