"""The shard recipes of docs/recipes/, run here as local processes with the variables each scheduler sets:
the Slurm script under bash, the Kubernetes manifest's command, the Hugging Face Jobs script's per-shard
commands. Each time, the union of the shards' output holds every input id exactly once.

`batchrun` on the processes' PATH is this checkout's; the endpoint is one emulated Dedicated endpoint, paused
at the start, that the shards share: it must be paused again once the last shard has ended.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml
from jobkit import NS, REPO, TOKEN, cli, emulator, paused_endpoint, write_spec, write_topics

RECIPES = REPO / "docs" / "recipes"
N_ROWS = 80
ALL_IDS = sorted(f"row-{i:05d}" for i in range(N_ROWS))
#: What a scheduler sets, or a shell may carry: cleared so that each test sets only its own.
SCHEDULER_VARIABLES = ("JOB_COMPLETION_INDEX", "BATCHRUN_SHARD_COUNT", "JOB", "SHARDS")


def union_ids(out: Path) -> list:
    """The ids of every Parquet file under a `data` folder of ``out``: the union of the shards, whether they
    write OUTPUT/shard-*/data/ or one shared OUTPUT/data/."""
    ids: list = []
    for file in sorted(out.rglob("*.parquet")):
        if "data" in file.relative_to(out).parts:
            ids.extend(pq.read_table(file, columns=["id"]).column("id").to_pylist())
    return ids


@pytest.fixture
def shard_env(tmp_path) -> dict[str, str]:
    """An environment like a scheduler's: `batchrun` on the PATH (this checkout's), the emulator's token,
    and no scheduler variables but those a test sets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "batchrun"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m batchrun "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCHEDULER_VARIABLES}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["HF_TOKEN"] = TOKEN
    env["BATCHRUN_STATE_DIR"] = str(tmp_path / "batchrun-state")  # never ~/.cache/batchrun
    return env


@pytest.fixture
def job(tmp_path):
    """A job of N_ROWS rows on one emulated Dedicated endpoint, paused: (spec path, output folder).

    Once the test is done with it, the shards must have left it paused, with its settings as they were."""
    paused = paused_endpoint(latency_base_s=0.002, max_concurrent_requests=64)
    with emulator(paused) as emu:
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 30,
                   "scale": {"min_replica": 2, "max_replica": 2}}
        spec = write_spec(tmp_path, endpoint=managed, input_path=write_topics(tmp_path / "in.parquet", N_ROWS),
                          output={"shard_rows": 10})
        yield spec, tmp_path / "out" / "job"
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)
        assert all(e["data_in_flight"] == 0 for e in emu.control_log if e["path"].endswith("/pause"))


def run_together(commands: list[tuple[list[str], dict[str, str]]], cwd: Path) -> None:
    """Start every (argv, env) at once, as a scheduler would, and check that each exits 0."""
    procs = []
    try:
        for n, (argv, env) in enumerate(commands):
            log = cwd / f"process-{n}.log"
            with open(log, "w") as f:
                procs.append((subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT), log))
        for proc, log in procs:
            code = proc.wait(timeout=180)
            assert code == 0, f"{shlex.join(proc.args)} exited {code}:\n{log.read_text()[-4000:]}"
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def assert_every_id_once(spec: Path, out: Path) -> None:
    ids = union_ids(out)
    assert sorted(ids) == ALL_IDS, f"duplicated: {[i for i, n in Counter(ids).items() if n > 1]}, " \
                                   f"missing: {sorted(set(ALL_IDS) - set(ids))}"
    status = cli("status", str(spec), env={"HF_TOKEN": TOKEN})
    assert status.returncode == 0 and f"ok: {N_ROWS} rows" in status.stdout, status.stdout + status.stderr


# ----------------------------------------------------------------------------------------------- Slurm

SBATCH = RECIPES / "slurm-array.sbatch"


def slurm_task(env: dict[str, str], spec: Path, task_id: int, task_count: int, task_min: int | None = None,
               **extra: str) -> tuple[list[str], dict[str, str]]:
    """`bash slurm-array.sbatch` as Slurm starts one array task."""
    variables = {"JOB": str(spec), "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": str(task_count)}
    if task_min is not None:
        variables["SLURM_ARRAY_TASK_MIN"] = str(task_min)
    return ["bash", str(SBATCH)], {**env, **variables, **extra}


def test_the_slurm_script_declares_an_array_and_runs_shard_auto():
    text = SBATCH.read_text()
    assert "#SBATCH --array=0-7" in text
    assert 'batchrun run "$JOB" --shard auto --progress lines' in text


def test_the_slurm_script_as_four_array_tasks_writes_every_id_once(job, shard_env, tmp_path):
    spec, out = job
    run_together([slurm_task(shard_env, spec, i, 4) for i in range(4)], tmp_path)
    assert_every_id_once(spec, out)


def test_the_slurm_script_in_an_array_numbered_from_one_writes_every_id_once(job, shard_env, tmp_path):
    spec, out = job  # --array=1-4: ids 1..4, SLURM_ARRAY_TASK_MIN=1
    run_together([slurm_task(shard_env, spec, i, 4, task_min=1) for i in (1, 2, 3, 4)], tmp_path)
    assert_every_id_once(spec, out)


def test_the_slurm_script_runs_failed_tasks_again_with_shards_set(job, shard_env, tmp_path):
    spec, out = job
    run_together([slurm_task(shard_env, spec, i, 4, task_min=0) for i in (0, 2)], tmp_path)  # 1 and 3 never ran
    assert len(union_ids(out)) < N_ROWS
    # `SHARDS=4 sbatch --array=1,3`: Slurm counts the subset (2 tasks, from 1); SHARDS gives the real N.
    run_together([slurm_task(shard_env, spec, i, 2, task_min=1, SHARDS="4") for i in (1, 3)], tmp_path)
    assert_every_id_once(spec, out)


# ------------------------------------------------------------------------------------------ Kubernetes

MANIFEST = RECIPES / "k8s-indexed-job.yaml"


def test_the_kubernetes_manifest_as_four_indexed_pods_writes_every_id_once(job, shard_env, tmp_path):
    spec, out = job
    documents = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    k8s_job = next(d for d in documents if d["kind"] == "Job")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert k8s_job["spec"]["completionMode"] == "Indexed"
    pod = k8s_job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in container["env"]
    mounted = {v["name"]: v for v in pod["volumes"]}
    work = next(m for m in container["volumeMounts"] if m["name"] == "work")
    assert mounted["work"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert container["workingDir"] == work["mountPath"]

    command = list(container["command"])
    count_at = command.index("--shard-count") + 1
    assert command[command.index("--shard") + 1] == "auto"
    assert int(command[count_at]) == k8s_job["spec"]["completions"] == k8s_job["spec"]["parallelism"] == 8
    job_at = command.index("run") + 1  # the spec, from the ConfigMap: here, the test's
    command[job_at], command[count_at] = str(spec), "4"
    run_together([(command, {**shard_env, "JOB_COMPLETION_INDEX": str(i)}) for i in range(4)], tmp_path)
    assert_every_id_once(spec, out)


# ---------------------------------------------------------------------------------- Hugging Face Jobs

HF_JOBS = RECIPES / "hf_jobs.py"


@pytest.fixture(scope="module")
def hf_jobs() -> ModuleType:
    loaded = importlib.util.spec_from_file_location("hf_jobs_recipe", HF_JOBS)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_the_hf_jobs_shard_commands_run_as_four_processes_write_every_id_once(job, shard_env, tmp_path, hf_jobs):
    spec, out = job
    commands = [hf_jobs.shard_command(str(spec), i, 4) for i in range(4)]
    # --dry-run prints the Jobs it would start, each running its shard's command; offline, nothing is contacted.
    dry_env = {**shard_env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    dry_env.pop("HF_TOKEN")
    dry = subprocess.run([sys.executable, str(HF_JOBS), "--dry-run", "--bucket", "my-org/batchrun-work",
                          "--shards", "4", "--job", str(spec)], env=dry_env, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert len(lines) == 4
    for line, command in zip(lines, commands):
        argv = shlex.split(line)
        assert argv[:3] == ["hf", "jobs", "run"] and "hf://buckets/my-org/batchrun-work:/work" in argv
        assert argv[-3:-1] == ["bash", "-c"] and argv[-1].endswith(f"exec {shlex.join(command)}")
    run_together([(command, shard_env) for command in commands], tmp_path)
    assert_every_id_once(spec, out)


class FakeJobsApi:
    """HfApi's Jobs calls, as far as hf_jobs.py uses them: each Job runs for one poll, then ends; the shards
    in ``failing`` end in ERROR."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.started: list[dict] = []
        self.polls: Counter = Counter()

    def _info(self, job_id: str, stage: str, message: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(id=job_id, url=f"https://huggingface.co/jobs/me/{job_id}",
                               owner=SimpleNamespace(name="me"), status=SimpleNamespace(stage=stage, message=message))

    def run_job(self, **kwargs) -> SimpleNamespace:
        self.started.append(kwargs)
        return self._info(f"job-{len(self.started) - 1}", "SCHEDULING")

    def inspect_job(self, *, job_id: str, namespace: str) -> SimpleNamespace:
        assert namespace == "me"
        self.polls[job_id] += 1
        if self.polls[job_id] < 2:
            return self._info(job_id, "RUNNING")
        if int(job_id.removeprefix("job-")) in self.failing:
            return self._info(job_id, "ERROR", "exit code 3")
        return self._info(job_id, "COMPLETED")


def test_hf_jobs_starts_one_job_per_shard_on_the_bucket_and_names_the_failed_ones(hf_jobs, capsys):
    argv = ["--bucket", "my-org/batchrun-work", "--shards", "4", "--job", "jobs/poems.yaml"]
    args = hf_jobs.parse_args(argv)
    api = FakeJobsApi(failing={2})
    jobs = hf_jobs.start_shards(api, args, args.indices, "hf_token_for_the_jobs")
    assert len(api.started) == 4
    for i, started in enumerate(api.started):
        [volume] = started["volumes"]
        assert (volume.type, volume.source, volume.mount_path, volume.read_only) == \
            ("bucket", "my-org/batchrun-work", "/work", False)
        assert started["secrets"] == {"HF_TOKEN": "hf_token_for_the_jobs"}
        assert started["command"][-1].endswith(shlex.join(hf_jobs.shard_command("jobs/poems.yaml", i, 4)))

    final = hf_jobs.wait_for_shards(api, jobs, count=4, poll_s=0, sleep=lambda _: None)
    assert hf_jobs.failed_shards(final) == [2]
    assert "shard 2/4: ERROR (exit code 3)" in capsys.readouterr().out
    hint = hf_jobs.rerun_hint(argv, [2])
    assert shlex.split(hint)[-2:] == ["--only", "2"]
    again = hf_jobs.parse_args(shlex.split(hint)[2:])  # the hint's own arguments start shard 2 alone
    assert again.indices == [2] and again.shards == 4 and again.job == "jobs/poems.yaml"


class FakeEndpoint:
    """huggingface_hub's InferenceEndpoint, as far as hf_jobs.py uses it; ``log`` is shared with the Jobs API."""

    def __init__(self, log: list[str], status: str = "paused") -> None:
        self.namespace, self.name, self.url = "my-org", "gen", "https://gen.example"
        self.status = status
        self.log = log

    def fetch(self) -> None:
        self.log.append("fetch")

    def resume(self) -> None:
        self.log.append("resume")

    def wait(self, timeout: int) -> None:
        self.log.append("wait")
        self.status = "running"

    def pause(self) -> None:
        self.log.append("pause")
        self.status = "paused"


class LoggedJobsApi(FakeJobsApi):
    def __init__(self, failing: set[int], log: list[str]) -> None:
        super().__init__(failing)
        self.log = log

    def run_job(self, **kwargs) -> SimpleNamespace:
        self.log.append("start")
        return super().run_job(**kwargs)

    def inspect_job(self, *, job_id: str, namespace: str) -> SimpleNamespace:
        info = super().inspect_job(job_id=job_id, namespace=namespace)
        if info.status.stage != "RUNNING":
            self.log.append("ended")
        return info


def test_hf_jobs_with_endpoint_resumes_it_before_the_jobs_and_pauses_it_after_all_have_ended(hf_jobs, capsys):
    argv = ["--bucket", "my-org/b", "--shards", "3", "--endpoint", "my-org/gen", "--job", "job.yaml"]
    args = hf_jobs.parse_args(argv)
    log: list[str] = []
    endpoint = FakeEndpoint(log)
    code = hf_jobs.run(args, argv, LoggedJobsApi({1}, log), "tok", endpoint, sleep=lambda _: None)
    assert code == 1  # shard 1 failed: said so, with the command that runs it again
    assert log == ["fetch", "resume", "wait", "start", "start", "start", "ended", "ended", "ended", "pause"]
    assert endpoint.status == "paused" and "--only 1" in capsys.readouterr().out

    # Stopped while the Jobs run: the endpoint stays up for them, and the way to pause it is said.
    log.clear()

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    code = hf_jobs.run(args, argv, LoggedJobsApi(set(), log), "tok", FakeEndpoint(log), sleep=interrupted)
    assert code == 130 and "pause" not in log
    assert "batchrun endpoint pause gen --namespace my-org" in capsys.readouterr().err
