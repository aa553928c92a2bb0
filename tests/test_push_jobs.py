"""Whole jobs pushed to the emulated Hub: at the end, incrementally, after a kill, against a racing writer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from hubkit import REPO_ID, assert_exact, card_of, local_shard_names, point_at_hub, rows_in, shard_files
from jobkit import NS, TOKEN, cli, emulator, run, running_endpoint, write_spec, write_topics

from batchrun.errors import AuthError
from batchrun.publish import Pacing, PublishError, Target, push_output
from batchrun.publish import commit as commit_module
from batchrun.spec import load_spec


class Killed(BaseException):
    """The process dies here: nothing after it runs, no handler catches it."""


def no_wait() -> Pacing:
    return Pacing(sleep=lambda s: None, random=lambda: 0.5)


@pytest.fixture
def hub(monkeypatch):
    """An emulator serving one text endpoint and the Hub; huggingface_hub and datasets pointed at it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        yield emu


def job(tmp_path: Path, emu, *, n: int = 100, limit: int | None = None, push: dict | None = None, **overrides):
    input_path = write_topics(tmp_path / "in" / "topics.parquet", n)
    if limit is not None:
        overrides["input"] = {"limit": limit}
    output: dict = {"shard_rows": 40}
    if push is not None:
        output["push_to_hub"] = {"repo": REPO_ID, "endpoint": emu.hub_url, **push}
    return write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                      output=output, **overrides)


def out_of(spec_path: Path) -> Path:
    return Path(load_spec(spec_path).output.path)


def push(out: Path, emu, **target) -> commit_module.PushResult:
    return push_output(out, Target(repo=REPO_ID, endpoint=emu.hub_url, **target), pacing=no_wait(),
                       echo=lambda line: None)


def test_a_job_pushes_its_output_at_the_end(tmp_path, hub):
    spec = job(tmp_path, hub, push={})
    outcome, lines = run(spec)
    assert outcome.exit_code == 0
    files = hub.hub.files(REPO_ID)
    out = out_of(spec)
    assert_exact(files, out)
    assert len(rows_in(files, shard_files(files))) == 100
    assert any(line.startswith("push: pushed 3 new shard(s)") for line in lines)
    assert (out / "state" / "hub.json").is_file()


def test_a_second_push_after_more_rows_uploads_only_the_new_shards(tmp_path, hub):
    spec = job(tmp_path, hub, limit=60, push={})
    run(spec)
    first = shard_files(hub.hub.files(REPO_ID))
    assert len(first) == 2  # 40 + 20 rows
    spec = job(tmp_path, hub, limit=100, push={})  # the same job, extended
    run(spec)
    files = hub.hub.files(REPO_ID)
    assert_exact(files, out_of(spec))
    last = hub.hub.commits_of(REPO_ID)[0]
    uploaded = [p for p in last.written if p.endswith(".parquet")]
    assert uploaded and not set(uploaded) & set(first)  # the new shards only; the old ones were not sent again
    assert set(shard_files(files)) == set(first) | set(uploaded)


def test_a_push_killed_between_upload_and_commit_ends_exact_when_run_again(tmp_path, hub, monkeypatch):
    spec = job(tmp_path, hub)
    run(spec)
    out = out_of(spec)
    real = commit_module.send_commit

    def die_before_commit(api, target, operations, *, parent, message):
        api.preupload_lfs_files(target.repo, additions=[o for o in operations if hasattr(o, "path_or_fileobj")],
                                repo_type="dataset")
        raise Killed

    monkeypatch.setattr(commit_module, "send_commit", die_before_commit)
    with pytest.raises(Killed):
        push(out, hub)
    assert shard_files(hub.hub.files(REPO_ID)) == []
    assert not (out / "state" / "hub.json").exists()
    monkeypatch.setattr(commit_module, "send_commit", real)
    result = push(out, hub)
    assert len(result.added) == 3
    assert_exact(hub.hub.files(REPO_ID), out)


def test_a_push_killed_after_its_commit_before_bookkeeping_ends_exact_when_run_again(tmp_path, hub, monkeypatch):
    spec = job(tmp_path, hub)
    run(spec)
    out = out_of(spec)
    real = commit_module.send_commit

    def die_after_commit(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(commit_module, "send_commit", die_after_commit)
    with pytest.raises(Killed):
        push(out, hub)
    assert not (out / "state" / "hub.json").exists()
    commits = len(hub.hub.commits_of(REPO_ID))
    monkeypatch.setattr(commit_module, "send_commit", real)
    result = push(out, hub)
    assert result.up_to_date and result.added == []
    assert len(hub.hub.commits_of(REPO_ID)) == commits  # nothing committed twice
    assert_exact(hub.hub.files(REPO_ID), out)
    assert (out / "state" / "hub.json").is_file()


def test_a_racing_commit_makes_the_push_read_the_repo_again_and_retry_cleanly(tmp_path, hub):
    spec = job(tmp_path, hub, n=140, limit=100)
    run(spec)
    out = out_of(spec)
    push(out, hub)
    run(job(tmp_path, hub, n=140))  # more rows, then a push that meets a racing writer
    hub.hub.race_next_commit(REPO_ID)
    waits: list[float] = []
    lines: list[str] = []
    result = push_output(out, Target(repo=REPO_ID, endpoint=hub.hub_url),
                         pacing=Pacing(sleep=waits.append, random=lambda: 0.5), echo=lines.append)
    assert result.attempts == 2 and len(waits) == 1
    assert any("412" in line for line in lines)
    files = hub.hub.files(REPO_ID)
    assert any(p.startswith("racers/") for p in files)  # the other writer's commit is kept
    assert_exact(files, out)


def test_429_and_5xx_answers_are_retried_after_a_backoff_that_honours_retry_after(tmp_path, hub):
    spec = job(tmp_path, hub)
    run(spec)
    hub.hub.create_repo(REPO_ID)
    hub.hub.fail_next_commits(REPO_ID, 429, retry_after=7)
    hub.hub.fail_next_commits(REPO_ID, 503)
    waits: list[float] = []
    result = push_output(out_of(spec), Target(repo=REPO_ID, endpoint=hub.hub_url),
                         pacing=Pacing(sleep=waits.append, random=lambda: 0.5, base_s=1.0), echo=lambda line: None)
    assert result.attempts == 3
    assert waits[0] == 7  # Retry-After
    assert 0 < waits[1] <= 2.0  # jittered exponential backoff
    assert_exact(hub.hub.files(REPO_ID), out_of(spec))


def test_a_push_that_keeps_failing_stops_within_its_budget_with_a_clear_error(tmp_path, hub):
    spec = job(tmp_path, hub, n=20)
    run(spec)
    hub.hub.create_repo(REPO_ID)
    hub.hub.fail_next_commits(REPO_ID, 503, count=10)
    with pytest.raises(PublishError, match="503"):
        push_output(out_of(spec), Target(repo=REPO_ID, endpoint=hub.hub_url),
                    pacing=Pacing(attempts=3, sleep=lambda s: None), echo=lambda line: None)
    assert shard_files(hub.hub.files(REPO_ID)) == []


def test_every_pushed_file_loads_with_datasets_to_exactly_the_local_output(tmp_path, hub):
    import datasets
    import pyarrow.parquet as pq

    spec = job(tmp_path, hub, push={})
    run(spec)
    out = out_of(spec)
    loaded = datasets.load_dataset(REPO_ID, "default", split="train", cache_dir=str(tmp_path / "cache"))
    local = pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()
    assert sorted(loaded.to_list(), key=lambda r: r["id"]) == sorted(local, key=lambda r: r["id"])


def test_a_job_split_into_shards_pushes_the_union_of_its_shards(tmp_path, hub):
    import datasets

    spec = job(tmp_path, hub)
    for shard in ("0/2", "1/2"):
        ran = cli("run", str(spec), "--shard", shard, "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert ran.returncode == 0, ran.stderr
    out = out_of(spec)
    result = push(out, hub)
    files = hub.hub.files(REPO_ID)
    assert_exact(files, out)  # every shard's files, named after them: no two clash
    assert {name.split("-of-")[0] for name in shard_files(files)} == {"default/train-shard-00000",
                                                                      "default/train-shard-00001"}
    assert len(result.added) == len(local_shard_names(out))
    loaded = datasets.load_dataset(REPO_ID, "default", split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["id"]) == sorted(f"row-{i:05d}" for i in range(100))


def test_a_shard_pushing_while_another_shard_pushes_never_deletes_its_files(tmp_path, hub, monkeypatch):
    spec = job(tmp_path, hub)
    assert cli("run", str(spec), "--shard", "0/2", "--progress", "off", env={"HF_TOKEN": TOKEN}).returncode == 0
    out = out_of(spec)
    real = commit_module.local_shards
    raced: list[str] = []

    def another_shard_commits_and_pushes_meanwhile(root, target):
        listed = real(root, target)
        if not raced:  # right after this push looked at the local files: shard 1 finishes and pushes
            raced.append("shard 1")
            ran = cli("run", str(spec), "--shard", "1/2", "--progress", "off", env={"HF_TOKEN": TOKEN})
            assert ran.returncode == 0, ran.stderr
            push(out, hub)
        return listed

    monkeypatch.setattr(commit_module, "local_shards", another_shard_commits_and_pushes_meanwhile)
    push(out, hub)
    assert raced == ["shard 1"]
    files = hub.hub.files(REPO_ID)
    assert_exact(files, out)  # shard 1's files are still there, next to shard 0's
    assert len(rows_in(files, shard_files(files))) == 100


def test_the_card_carries_the_model_revision_and_reproduction_command_and_never_the_token(tmp_path, hub):
    spec = job(tmp_path, hub, push={})
    run(spec)
    files = hub.hub.files(REPO_ID)
    meta, body = card_of(files)
    job_record = (out_of(spec) / "state" / "job.json").read_text()
    served = yaml.safe_load(job_record)["identity"]["revision"]  # what the endpoint said it serves
    assert len(served) == 40 and f"| Model revision (served) | `{served}` |" in body
    assert f"| Model | `{yaml.safe_load(job_record)['identity']['model']}` |" in body
    assert f"batchrun push {out_of(spec)} --repo {REPO_ID} --config default --split train" in body
    assert "batchrun run job.yaml" in body
    assert "Write about {topic}." in body and "Be brief." in body
    assert meta["batchrun"]["default"]["fingerprint"] == yaml.safe_load(job_record)["fingerprint"]
    for path, data in files.items():
        assert TOKEN.encode() not in data, path
    assert TOKEN not in (out_of(spec) / "state" / "hub.json").read_text()


def test_a_users_edit_to_the_card_survives_a_push(tmp_path, hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    spec = job(tmp_path, hub, limit=60, push={})
    run(spec)
    readme = hub.hub.files(REPO_ID)["README.md"].decode()
    edited = readme.replace("---\n", "---\nlicense: mit\n", 1) + "\n## My notes\n\nHand-checked by me.\n"
    edited = edited.replace("# answers\n", "# answers\n\nA dataset of answers, made for the docs.\n")
    HfApi(endpoint=hub.hub_url, token=TOKEN).create_commit(
        REPO_ID, [CommitOperationAdd("README.md", edited.encode())], commit_message="my edit", repo_type="dataset")
    run(job(tmp_path, hub, limit=100, push={}))
    files = hub.hub.files(REPO_ID)
    meta, body = card_of(files)
    assert meta["license"] == "mit"
    assert "## My notes\n\nHand-checked by me." in body
    assert "A dataset of answers, made for the docs." in body
    assert "| Rows | 100 ok" in body  # batchrun's section is up to date
    assert body.count("<!-- batchrun:begin default -->") == 1
    assert_exact(files, out_of(spec))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_bad_repo_name_is_refused_before_anything_is_sent_and_the_output_is_untouched(tmp_path, hub):
    spec = job(tmp_path, hub, n=20)
    run(spec)
    out = out_of(spec)
    before, log = _snapshot(out), len(hub.hub.log)
    for bad in ("no-namespace", "a/b/c", "org/-bad", "org/bad..name"):
        with pytest.raises(PublishError, match="repo"):
            push_output(out, Target(repo=bad, endpoint=hub.hub_url), echo=lambda line: None)
    assert len(hub.hub.log) == log and _snapshot(out) == before


def test_a_missing_token_is_refused_before_anything_is_sent_and_the_output_is_untouched(tmp_path, hub, monkeypatch):
    spec = job(tmp_path, hub, n=20)
    run(spec)
    out = out_of(spec)
    monkeypatch.delenv("HF_TOKEN")
    before, log = _snapshot(out), len(hub.hub.log)
    with pytest.raises(AuthError, match="token"):
        push_output(out, Target(repo=REPO_ID, endpoint=hub.hub_url), echo=lambda line: None)
    assert len(hub.hub.log) == log and _snapshot(out) == before


def test_a_job_with_push_to_hub_and_no_token_is_refused_before_it_runs(tmp_path, hub, monkeypatch):
    spec = job(tmp_path, hub, n=20, push={})
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(AuthError, match="push_to_hub"):
        run(spec)
    assert not out_of(spec).exists()


def test_a_repo_holding_another_jobs_data_is_refused_unless_config_separates_them(tmp_path, hub):
    first = job(tmp_path / "a", hub, n=40)
    run(first)
    push(out_of(first), hub)
    other = job(tmp_path / "b", hub, n=40, prompt={"template": "Say something else about {topic}."})
    run(other)
    out = out_of(other)
    before, commits = _snapshot(out), len(hub.hub.commits_of(REPO_ID))
    with pytest.raises(PublishError, match="another job's data.*--config"):
        push(out, hub)
    assert len(hub.hub.commits_of(REPO_ID)) == commits and _snapshot(out) == before
    push(out, hub, config="else")
    files = hub.hub.files(REPO_ID)
    assert_exact(files, out_of(first))
    assert_exact(files, out, config="else")
    meta, body = card_of(files)
    assert {c["config_name"] for c in meta["configs"]} == {"default", "else"}
    assert "<!-- batchrun:begin default -->" in body and "<!-- batchrun:begin else -->" in body


def test_a_repo_with_data_batchrun_did_not_push_is_refused(tmp_path, hub):
    hub.hub.seed(REPO_ID, {"default/train-0.parquet": b"not ours", "README.md": b"# someone's dataset\n"})
    spec = job(tmp_path, hub, n=20)
    run(spec)
    with pytest.raises(PublishError, match="did not push"):
        push(out_of(spec), hub)


def test_failed_rows_are_pushed_only_with_include_failed_as_a_config_of_their_own(tmp_path, hub):
    input_path = write_topics(tmp_path / "in" / "topics.parquet", 50, empty_every=10)
    spec = write_spec(tmp_path, endpoint={"url": hub.endpoint_url(NS, "gen")}, input_path=input_path)
    run(spec)
    out = out_of(spec)
    push(out, hub)
    assert not any(p.startswith("failed/") for p in hub.hub.files(REPO_ID))
    push(out, hub, include_failed=True)
    files = hub.hub.files(REPO_ID)
    assert_exact(files, out, kind="failed", config="failed")
    assert_exact(files, out)
    meta, _ = card_of(files)
    assert meta["batchrun"]["failed"]["holds"] == "failed"


def test_pushes_during_the_run_publish_only_committed_shards_and_a_matching_card(tmp_path, monkeypatch):
    import io

    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # 10 ms a request and at most 2 at once: the run lasts a second or more on any machine, several
    # push periods of 0.2 s (without a latency, a fast machine finished before the first one).
    with emulator(running_endpoint(latency_base_s=0.01)) as hub:
        point_at_hub(monkeypatch, hub.hub_url)
        spec = job(tmp_path, hub, n=200, push={"every": "0.2s"}, concurrency={"max": 2, "initial": 1})
        outcome, lines = run(spec, commit_interval_s=0.05)
        commits = [c for c in hub.hub.commits_of(REPO_ID) if "README.md" in c.files]
        final_files = hub.hub.files(REPO_ID)
    assert outcome.exit_code == 0
    assert len(commits) >= 2, lines  # at least one push during the run, and the last one
    for commit in commits:  # every state the repo was ever in is whole, and its card says so
        shards = shard_files(commit.files)
        rows = sum(pq.read_metadata(io.BytesIO(commit.files[p])).num_rows for p in shards)
        meta, _ = card_of(commit.files)
        assert meta["dataset_info"][0]["splits"][0]["num_examples"] == rows
    assert_exact(final_files, out_of(spec))
