#!/usr/bin/env python3
"""One batchrun job as N Hugging Face Jobs: start one Job per shard, wait for all, say which failed.

    python docs/recipes/hf_jobs.py --bucket my-org/batchrun-work --shards 8 --dry-run   # print the 8 commands
    python docs/recipes/hf_jobs.py --bucket my-org/batchrun-work --shards 8             # start them and wait
    python docs/recipes/hf_jobs.py --bucket my-org/batchrun-work --shards 8 --only 3,5  # run 3 and 5 again
    python docs/recipes/hf_jobs.py ... --endpoint my-org/gen    # resume the endpoint first, pause it at the end

Each Job runs ``batchrun run JOB --shard I/N --progress lines`` in ``--workdir`` (default /work), where the
Storage Bucket ``--bucket`` is mounted read-write. A shard that failed resumes when it is run again with
``--only``; the shards that finished are left alone.

What the shards must share. Every shard reads the whole input and writes under the job's output.path, and a
shard run again must find what it wrote before. Jobs share no disk: a Job's own filesystem is gone when it
ends. The one read-write storage several Jobs can mount is a Storage Bucket (model, dataset and Space repos
are mounted read-only), so the job spec, its output (a relative output.path such as ``out/poems``) and an
input file go in the bucket; an input that is a Hub dataset (``input.dataset``) is streamed from the Hub.
A bucket mount is object storage seen as files, not a shared POSIX filesystem: no file locks across Jobs
(batchrun's lock record and heartbeat still say who holds a shard), changes seen by other mounts after
seconds, and a file durable once closed. batchrun writes new files and renames them, but it also rewrites
its lock record in place every 15 s, appends to a manifest it keeps open and, on a rerun, opens its earlier
state files again: hf-mount, the filesystem behind bucket mounts, allows these only in its "advanced writes"
mode (its default mode writes a file once, from start to end). This was not tried on a real bucket: before a
large run, run two shards on a small input, cancel one (``hf jobs cancel ID``), run it again with
``--only``, and check ``batchrun status`` on the synced output. If the mount refuses a file under
``state/``, run the shards where a shared filesystem exists (Slurm, Kubernetes), or run one Job without
shards: one process keeps hundreds of requests in flight, and the endpoint is usually the limit.

The endpoint. Shards on a shared filesystem share a managed endpoint (``endpoint: {name, namespace}``)
through an flock in the output folder: the last one out pauses it (docs/shards.md). A bucket mount carries
no file locks across Jobs, so there the job should send to the endpoint's url (``endpoint: {url: ...}``)
and this script brackets it with ``--endpoint NAMESPACE/NAME``: it resumes the endpoint and waits until it
is running before starting the Jobs, and pauses it once every Job has ended (completed or not). If this
script is stopped while Jobs still run, the endpoint stays up for them: pause it yourself when they end
(``batchrun endpoint pause NAME --namespace NAMESPACE``); the endpoint's own scale-to-zero timeout is the
only other backstop, and only with min_replica 0.

Needs huggingface_hub 1.x or later (``run_job``, ``inspect_job``, ``Volume``), and a token that may run Jobs
(``hf auth login`` or HF_TOKEN); the token is passed to each Job as the secret HF_TOKEN, for the endpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

#: Stages after which a Job runs no more (huggingface_hub's JobStage values).
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")


def shard_command(job: str, index: int, count: int) -> list[str]:
    """The batchrun command of shard ``index`` of ``count`` (what each Job runs, after installing batchrun)."""
    return ["batchrun", "run", job, "--shard", f"{index}/{count}", "--progress", "lines"]


def job_command(job: str, index: int, count: int, *, install: str, workdir: str) -> list[str]:
    """The container command of one Job: install batchrun, go to the mounted bucket, run the shard."""
    script = f"{install} && cd {shlex.quote(workdir)} && exec {shlex.join(shard_command(job, index, count))}"
    return ["bash", "-c", script]


def hf_jobs_run_line(args: argparse.Namespace, index: int) -> str:
    """The same Job as one `hf jobs run` command line (what --dry-run prints)."""
    line = ["hf", "jobs", "run", "--detach", "--flavor", args.flavor, "--timeout", args.timeout,
            "--secrets", "HF_TOKEN", "--volume", f"hf://buckets/{args.bucket}:{args.workdir}",
            "--label", f"batchrun-shard={index}-of-{args.shards}"]
    if args.attempts != 1:
        line += ["--attempts", str(args.attempts)]
    if args.namespace:
        line += ["--namespace", args.namespace]
    command = job_command(args.job, index, args.shards, install=args.install, workdir=args.workdir)
    return shlex.join([*line, args.image, *command])


def start_shards(api: Any, args: argparse.Namespace, indices: Sequence[int], token: str,
                 jobs: dict[int, Any] | None = None) -> dict[int, Any]:
    """Start one Job per shard in ``indices``; returns shard index -> JobInfo (``jobs``, filled as they start)."""
    from huggingface_hub import Volume

    bucket = Volume(type="bucket", source=args.bucket, mount_path=args.workdir, read_only=False)
    jobs = {} if jobs is None else jobs
    for index in indices:
        jobs[index] = api.run_job(
            image=args.image,
            command=job_command(args.job, index, args.shards, install=args.install, workdir=args.workdir),
            secrets={"HF_TOKEN": token},
            flavor=args.flavor,
            timeout=args.timeout,
            attempts=args.attempts,
            name=f"batchrun-shard-{index}-of-{args.shards}",
            labels={"batchrun-shard": f"{index}-of-{args.shards}"},
            volumes=[bucket],
            namespace=args.namespace,
        )
        print(f"shard {index}/{args.shards}: started {jobs[index].url}", flush=True)
    return jobs


def wait_for_shards(api: Any, jobs: dict[int, Any], *, count: int, poll_s: float,
                    sleep: Callable[[float], None] = time.sleep) -> dict[int, Any]:
    """Poll each Job until it has ended, saying so as each ends; returns shard index -> final JobInfo."""
    final: dict[int, Any] = {}
    while len(final) < len(jobs):
        for index, job in jobs.items():
            if index in final:
                continue
            info = api.inspect_job(job_id=job.id, namespace=job.owner.name)
            if info.status.stage in TERMINAL:
                final[index] = info
                message = f" ({info.status.message})" if info.status.message else ""
                print(f"shard {index}/{count}: {info.status.stage}{message} {info.url}", flush=True)
        if len(final) < len(jobs):
            sleep(poll_s)
    return final


def bring_up(endpoint: Any, *, timeout_s: float) -> None:
    """Resume ``endpoint`` (a huggingface_hub InferenceEndpoint) unless it runs, and wait until it does."""
    endpoint.fetch()
    if endpoint.status in ("paused", "scaledToZero"):
        print(f"endpoint {endpoint.namespace}/{endpoint.name}: {endpoint.status}, resuming", flush=True)
        endpoint.resume()
    endpoint.wait(timeout=int(timeout_s))
    print(f"endpoint {endpoint.namespace}/{endpoint.name}: running at {endpoint.url}", flush=True)


def put_down(endpoint: Any) -> None:
    """Pause ``endpoint`` once every Job has ended: nothing sends to it any more."""
    endpoint.pause()
    print(f"endpoint {endpoint.namespace}/{endpoint.name}: paused", flush=True)


def failed_shards(final: dict[int, Any]) -> list[int]:
    """The shards whose Job did not complete, in order."""
    return sorted(index for index, info in final.items() if info.status.stage != "COMPLETED")


def rerun_hint(argv: Sequence[str], failed: Sequence[int]) -> str:
    """This script's command line again, for the failed shards only."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--only":
            skip = True
        elif not arg.startswith("--only="):
            kept.append(arg)
    return shlex.join(["python", sys.argv[0], *kept, "--only", ",".join(map(str, failed))])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bucket", required=True, help="the Storage Bucket ORG/NAME holding the job spec and its output")
    p.add_argument("--shards", type=int, required=True, metavar="N", help="the number of shards N")
    p.add_argument("--job", default="job.yaml", help="the job spec, relative to --workdir (default: job.yaml)")
    p.add_argument("--only", default=None, metavar="I,J", help="start only these shards (to run failed ones again)")
    p.add_argument("--workdir", default="/work", help="where the bucket is mounted and batchrun runs (default: /work)")
    p.add_argument("--image", default="python:3.12", help="the Docker image (default: python:3.12)")
    p.add_argument("--install", default="pip install --quiet batchrun",
                   help="the shell command that installs batchrun in the image (default: pip install --quiet batchrun)")
    p.add_argument("--flavor", default="cpu-basic", help="the hardware of each Job (default: cpu-basic)")
    p.add_argument("--timeout", default="6h", help="each Job's longest run; a shard stopped by it resumes when run "
                   "again (default: 6h; set it, the platform's own default is short)")
    p.add_argument("--attempts", type=int, default=1, help="tries per Job, the first included (default: 1)")
    p.add_argument("--namespace", default=None, help="where the Jobs run (default: your user)")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="seconds between status checks")
    p.add_argument("--endpoint", default=None, metavar="NAMESPACE/NAME",
                   help="resume this Dedicated endpoint before the Jobs start and pause it once all have ended "
                   "(the job then sends to its url; see above)")
    p.add_argument("--endpoint-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long to wait for the endpoint to run (default: 1800)")
    p.add_argument("--dry-run", action="store_true", help="print the Jobs as `hf jobs run` commands; contact nobody")
    args = p.parse_args(argv)
    if args.endpoint is not None and args.endpoint.count("/") != 1:
        p.error(f"--endpoint {args.endpoint!r}: expected NAMESPACE/NAME")
    if args.shards < 1:
        p.error("--shards must be at least 1")
    try:
        args.indices = [int(i) for i in args.only.split(",")] if args.only else list(range(args.shards))
    except ValueError:
        p.error(f"--only {args.only!r}: expected shard numbers such as 3,5")
    if any(not 0 <= i < args.shards for i in args.indices):
        p.error(f"--only {args.only}: shards are numbered 0 to {args.shards - 1}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run:
        for index in args.indices:
            print(hf_jobs_run_line(args, index))
        return 0

    from huggingface_hub import HfApi, get_token

    token = get_token()
    if token is None:
        print("no Hugging Face token: run `hf auth login` or set HF_TOKEN", file=sys.stderr)
        return 2
    endpoint = None
    if args.endpoint is not None:
        from huggingface_hub import get_inference_endpoint

        namespace, name = args.endpoint.split("/")
        endpoint = get_inference_endpoint(name, namespace=namespace, token=token)
    return run(args, argv, HfApi(token=token), token, endpoint)


def run(args: argparse.Namespace, argv: Sequence[str], api: Any, token: str, endpoint: Any = None,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Bring the endpoint up (with --endpoint), start the Jobs, wait for all, put the endpoint down, report."""
    if endpoint is not None:
        bring_up(endpoint, timeout_s=args.endpoint_timeout)
    jobs: dict[int, Any] = {}
    try:
        start_shards(api, args, args.indices, token, jobs)
        final = wait_for_shards(api, jobs, count=args.shards, poll_s=args.poll, sleep=sleep)
    except KeyboardInterrupt:
        print("\nstopped waiting; the Jobs go on (`hf jobs ps` lists them)", file=sys.stderr)
        if endpoint is not None:
            print(f"the endpoint stays up for them: once they end, `batchrun endpoint pause {endpoint.name} "
                  f"--namespace {endpoint.namespace}`", file=sys.stderr)
        return 130
    except BaseException:
        if endpoint is not None and not jobs:  # no Job started: nothing sends to it
            put_down(endpoint)
        raise
    if endpoint is not None:
        put_down(endpoint)
    failed = failed_shards(final)
    if not failed:
        print(f"all {len(final)} shard(s) completed")
        return 0
    print(f"failed: shard(s) {', '.join(map(str, failed))} of {args.shards}. Run them again (they resume):")
    print(f"  {rerun_hint(argv, failed)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
