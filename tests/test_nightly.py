"""Nightly evaluations, whole jobs on the emulator: what produced each output, folders per run, runs,
compare and its exit code, scores, per-row seeds, a redeploy, and the webhook."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from jobkit import NS, TOKEN, emulator, read_rows, run, running_endpoint, wait_until, write_spec, write_topics

from batchrun.cli import main
from batchrun.compare import compare_runs, parse_fail_if
from batchrun.compare_html import write_compare_html
from batchrun.errors import SpecError
from batchrun.facts import ExitCode
from batchrun.images import derive_seed
from batchrun.provenance import resolve_output
from batchrun.runner import RunOptions, run_job
from batchrun.runs import find_runs
from batchrun.spec import load_spec

SHA_A = "a" * 40
SHA_B = "b" * 40
CHROMIUM = Path("/usr/bin/chromium")


def _job(tmp_path: Path, endpoint: dict, *, n: int = 12, path: str | None = None, **overrides) -> Path:
    input_path = write_topics(tmp_path / "in" / "topics.parquet", n)
    output = {"path": path or str(tmp_path / "out" / "nightly" / "{run_id}"), "shard_rows": 40}
    parameters = {"max_tokens": 12, "seed": "per-row", **overrides.pop("parameters", {})}
    return write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name="nightly",
                      parameters=parameters, output=output, **overrides)


def _summary(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "state" / "summary.json").read_text())


def _job_json(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "state" / "job.json").read_text())


def test_the_revision_from_get_info_is_recorded_in_job_json_summary_and_every_parquet_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(revision=SHA_A)) as emu:
        outcome, _ = run(_job(tmp_path, {"url": emu.endpoint_url(NS, "gen")}))
    assert outcome.exit_code == 0
    folder = outcome.summary["output"]
    provenance = outcome.summary["provenance"]
    assert (provenance["model"], provenance["revision"]) == ("google/gemma-1.1-2b-it", SHA_A)
    assert provenance["server_version"] == "3.3.6"  # TGI's version, from /info
    assert provenance["parameters"]["max_tokens"] == 12 and provenance["parameters"]["seed"] == "per-row"
    assert provenance["started_at"] <= provenance["ended_at"]
    assert provenance["fingerprint"] and provenance["batchrun_version"]
    job = _job_json(folder)
    assert job["provenance"]["revision"] == SHA_A and job["provenance"]["ended_at"]
    assert job["run_id"] == provenance["run_id"] and job["run_id"] in folder  # output.path held {run_id}
    for shard in Path(folder, "data").glob("*.parquet"):
        meta = json.loads(pq.read_schema(shard).metadata[b"batchrun"])
        assert (meta["revision"], meta["run_id"]) == (SHA_A, job["run_id"])
        assert meta["parameters"]["seed"] == "per-row"
    assert TOKEN not in json.dumps(job) + json.dumps(outcome.summary)


def test_the_revision_and_hardware_from_the_control_plane_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(revision=SHA_B, instance_type="nvidia-l4")) as emu:
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": "10s"}
        outcome, _ = run(_job(tmp_path, endpoint))
    provenance = outcome.summary["provenance"]
    assert provenance["revision"] == SHA_B
    assert provenance["hardware"] == "nvidia-l4 x1"
    assert provenance["image"]  # the container image the control plane names


def test_per_row_seeds_are_stored_and_make_two_runs_identical_which_compare_says(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")}, parameters={"temperature": 0.9})
        first, _ = run(spec)
        second, _ = run(spec)
    a, b = first.summary["output"], second.summary["output"]
    assert a != b  # {run_id}: a folder per run
    rows = read_rows(Path(a) / "data")
    assert rows and all(row["seed"] == derive_seed(row["id"], 0) for row in rows)
    report = compare_runs(a, b)
    assert report.common == 12 and report.identical == 12
    assert report.verdict()["verdict"] == "identical"
    assert not report.provenance_changes().keys() - {"parameters"} or report.provenance_changes() == {}


def test_a_redeploy_between_two_runs_shows_up_in_compare_and_a_threshold_sets_the_exit_code(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(revision=SHA_A)) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")})
        before, _ = run(spec)
        emu.redeploy(NS, "gen", revision=SHA_B, seed=7)  # new weights behind the same url
        after, _ = run(spec)
    a, b = before.summary["output"], after.summary["output"]
    report = compare_runs(a, b)
    assert report.provenance_changes()["revision"] == (SHA_A, SHA_B)
    assert report.changed_share > 0.5
    assert main(["compare", a, b, "--fail-if", "changed>0.2"]) == ExitCode.THRESHOLD_CROSSED == 4
    assert "revision: " + SHA_A in capsys.readouterr().out
    assert main(["compare", a, b, "--fail-if", "failed_rate>0.5,p95_latency>100x"]) == 0
    assert main(["compare", a, a, "--fail-if", "changed>0.2,revision_changed>0"]) == 0


def test_a_redeploy_during_a_run_is_noted_with_the_rows_on_each_side(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(revision=SHA_A, latency_base_s=0.02)) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")}, n=60, concurrency={"max": 2, "initial": 2})
        result: dict = {}
        options = RunOptions(progress="off", handle_signals=False, echo=lambda _: None, revision_poll_s=0.02)
        job = threading.Thread(target=lambda: result.update(o=asyncio.run(run_job(load_spec(spec), options))))
        job.start()
        wait_until(lambda: emu.stats()["endpoints"][f"{NS}/gen"]["requests"] >= 10)
        emu.redeploy(NS, "gen", revision=SHA_B)
        job.join(timeout=120)
    changes = result["o"].summary["provenance"]["revision_changes"]
    assert [c["revision"] for c in changes] == [SHA_A, SHA_B]
    assert sum(c["rows"] for c in changes) == 60
    assert changes[0]["rows"] >= 8 and changes[1]["rows"] >= 1


def test_a_scorer_that_raises_keeps_the_row_with_null_scores_and_counts_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "my_scores.py").write_text(
        "def judge(row):\n"
        "    if row['id'].endswith('3'):\n"
        "        raise RuntimeError('judge is down')\n"
        "    return {'length': len(row['generated_text'])}\n")
    score = [{"contains": "topic"}, {"regex": {"pattern": "[A-Z]"}}, {"function": "my_scores:judge", "columns": ["length"]}]
    with emulator(running_endpoint()) as emu:
        outcome, _ = run(_job(tmp_path, {"url": emu.endpoint_url(NS, "gen")}, n=20, score=score))
    assert outcome.exit_code == 0
    rows = read_rows(Path(outcome.summary["output"]) / "data")
    assert len(rows) == 20  # no row lost
    broken = [r for r in rows if r["id"].endswith("3")]
    assert len(broken) == 2 and all(r["score_length"] is None and r["score_contains"] is None for r in broken)
    assert all("judge is down" in r["score_error"] and r["generated_text"] for r in broken)
    fine = [r for r in rows if not r["id"].endswith("3")]
    assert all(r["score_length"] == len(r["generated_text"]) and r["score_error"] is None for r in fine)
    scores = outcome.summary["scores"]
    assert scores["errors"] == 2 and scores["columns"]["score_length"]["n"] == 18


def test_a_score_reference_column_that_is_not_kept_is_a_spec_error_before_anything_runs(tmp_path):
    spec = _job(tmp_path, {"url": "http://127.0.0.1:9"}, score=[{"exact_match": "answer"}])
    with pytest.raises(SpecError, match="answer"):
        run(spec)


def test_the_webhook_receives_a_slack_compatible_summary_after_a_retry(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=503 if len(received) == 1 else 200)  # the first post is refused

    async def main_() -> object:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with TestServer(app, host="127.0.0.1") as server:
            with emulator(running_endpoint()) as emu:
                spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")},
                            notify={"webhook": str(server.make_url("/hook"))})
                options = RunOptions(progress="off", handle_signals=False, echo=lambda _: None)
                return await run_job(load_spec(spec), options)

    outcome = asyncio.run(main_())
    assert outcome.exit_code == 0
    assert len(received) == 2 and received[0] == received[1]
    payload = received[-1]
    assert payload["text"].startswith("batchrun nightly: finished") and payload["status"] == "ok"
    assert payload["rows"]["total_ok"] == 12 and payload["exit_code"] == 0
    assert payload["revision"] and TOKEN not in json.dumps(payload)


def test_a_webhook_that_is_down_never_changes_the_outcome(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    lines: list[str] = []
    with emulator(running_endpoint()) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")},
                    notify={"webhook": "http://127.0.0.1:9/hook", "attempts": 2})
        options = RunOptions(progress="off", handle_signals=False, echo=lines.append)
        outcome = asyncio.run(run_job(load_spec(spec), options))
    assert outcome.exit_code == 0
    assert any("notification was not delivered" in line for line in lines)


def test_runs_lists_three_runs_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(revision=SHA_A)) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")},
                    path=str(tmp_path / "out" / "nightly" / "{date}" / "{run_id}"))
        for _ in range(3):
            run(spec)
    assert main(["runs", str(tmp_path / "out" / "nightly")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("started (UTC)")
    assert all(SHA_A[:12] in line and " 12 " in line for line in lines[1:])
    assert len(find_runs(tmp_path / "out")) == 3


def test_a_killed_run_of_a_templated_path_is_resumed_by_its_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")})
        first, _ = run(spec)
        folder = first.summary["output"]
        run_id = _job_json(folder)["run_id"]
        resolved, same_id = resolve_output(load_spec(spec).output.path, resume=run_id)
        assert (Path(resolved).resolve(), same_id) == (Path(folder).resolve(), run_id)
        assert main(["run", str(spec), "--resume", run_id, "--progress", "off"]) == 0
    assert _job_json(folder)["run_id"] == run_id and _job_json(folder)["runs"] == 2
    assert _summary(folder)["rows"]["skipped"] == 12  # nothing sent again


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_the_compare_report_renders_in_a_headless_browser(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(revision=SHA_A)) as emu:
        spec = _job(tmp_path, {"url": emu.endpoint_url(NS, "gen")}, n=30)
        a, _ = run(spec)
        emu.redeploy(NS, "gen", revision=SHA_B, seed=3)
        b, _ = run(spec)
    report = compare_runs(a.summary["output"], b.summary["output"])
    page = write_compare_html(report, tmp_path / "report.html", parse_fail_if("changed>0.2"))
    text = page.read_text()
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    assert text.count("<svg") == 2 and "no failures" in text and "threshold crossed" in text  # lengths, latency
    shot = tmp_path / "shot.png"
    try:
        subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                        page.as_uri()], capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 60 s")
    assert shot.exists() and shot.stat().st_size > 5000, "chromium wrote no screenshot"


def test_fail_if_reads_absolute_and_relative_thresholds_and_refuses_unknown_metrics():
    thresholds = parse_fail_if("changed>0.2, failed_rate>0.01,p95_latency>1.5x,score_exact_match<0.8")
    metrics = {"changed": (0.0, 0.3), "failed_rate": (0.0, 0.0), "p95_latency": (1.0, 1.4),
               "score_exact_match": (0.9, 0.7)}
    assert [t.crossed(metrics) for t in thresholds] == [True, False, False, True]
    with pytest.raises(Exception, match="unknown metric"):
        parse_fail_if("speed>2")


@pytest.mark.parametrize(("parameters", "score", "message"), [
    ({"seed": "every-row"}, None, "per-row"),
    ({"seed": 1}, [{"exact_match": "a", "contains": "b"}], "exactly one"),
    ({"seed": 1}, [{"function": "nocolon"}], "module:function"),
    ({"seed": 1}, [{"function": "m:f"}], "columns"),
    ({"seed": 1}, [{"regex": {"pattern": "("}}], "regular expression"),
])
def test_bad_seed_and_score_keys_are_spec_errors(tmp_path, parameters, score, message):
    overrides = {"parameters": parameters} | ({"score": score} if score else {})
    spec = _job(tmp_path, {"url": "http://127.0.0.1:9"}, **overrides)
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_the_shipped_nightly_eval_job_runs_on_the_emulator_with_no_setup(tmp_path, monkeypatch):
    from jobkit import REPO

    monkeypatch.chdir(REPO)  # its input path is relative, as a new user runs it; its scorer sits beside it
    spec = load_spec(REPO / "jobs" / "nightly_eval.yaml", output_override=str(tmp_path / "night"))
    options = RunOptions(progress="off", handle_signals=False, echo=lambda _: None, poll_interval_s=0.02)
    outcome = asyncio.run(run_job(spec, options))
    assert outcome.exit_code == 0 and outcome.summary["rows"]["total_ok"] == 24
    assert set(outcome.summary["scores"]["columns"]) == {"score_contains", "score_regex", "score_words",
                                                          "score_ends_sentence"}
    assert outcome.summary["provenance"]["seed"] == "per-row"
