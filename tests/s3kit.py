"""A real S3-compatible server on loopback for the object-storage tests: moto in server mode, over HTTP.

``S3Server.start()`` runs ``python -m moto.server`` on a free loopback port and waits until it answers;
``bucket()`` creates a fresh bucket and returns its ``s3://`` URL; ``environ()`` is what a batchrun
process needs to reach it (``AWS_ENDPOINT_URL``, dummy credentials, a region). The tests read the
store's own listing through boto3 (``keys``), never through batchrun, as their proof.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from commit_records import counted_parts
from loopback_http import LoopbackServer, forward, free_port, stop_process, wait_until_answering

_BUCKETS = itertools.count()


@dataclass
class S3Server:
    port: int
    process: subprocess.Popen
    _client: object = field(default=None, repr=False)

    @classmethod
    def start(cls) -> S3Server:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        server = cls(port, process)
        wait_until_answering(process, f"{server.endpoint}/moto-api/", "the moto S3 server")
        return server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1"}

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                        aws_secret_access_key="testing", region_name="us-east-1")
        return self._client

    def bucket(self, prefix: str = "out") -> str:
        name = f"batchrun-test-{next(_BUCKETS)}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}/{prefix}"

    def keys(self, url: str, under: str = "") -> list[str]:
        """The keys under ``url`` (and ``under``) as the server lists them, relative to the URL."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        start = f"{prefix}/{under}" if prefix else under
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            found += [item["Key"][len(prefix) + 1 if prefix else 0 :] for item in page.get("Contents", [])]
        return sorted(found)

    def stop(self) -> None:
        stop_process(self.process)


def committed(server: S3Server, url: str, shard: str | None = None) -> dict[str, dict]:
    """The parts that count now, by the store's own listing of commit records: file -> record."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    under = f"state/shards/{shard}/commits/" if shard else "state/commits/"
    return counted_parts(json.loads(server.client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read())
                         for key in server.keys(url, under))


def committed_rows(server: S3Server, url: str, shard: str | None = None) -> int:
    return sum(int(record["rows"]) for record in committed(server, url, shard).values())


class HoldingProxy:
    """An HTTP proxy in front of the S3 server that can hold one request until the test lets it go.

    ``hold(method, key_part)`` makes the next matching request wait (``held`` is set when it arrives),
    so a test can SIGKILL the writer at that exact moment: during an upload, or during a commit.
    ``release(forward=...)`` then sends it on to the server (it happens, though its writer is dead)
    or drops it (it never happens).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.held = threading.Event()
        self.landed = threading.Event()  # the held request, let go with forward=True, reached the server
        self._go = threading.Event()
        self._forward = False
        self._rule: tuple[str, str] | None = None
        self._skip = 0
        self._rule_lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                held = proxy._matches(self.command, self.path)
                if held:
                    proxy.held.set()
                    proxy._go.wait()
                    if not proxy._forward:
                        self.close_connection = True
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
                status, answer_headers, data = forward(proxy.target_port, self.command, self.path, body, headers)
                if held:
                    proxy.landed.set()
                try:
                    self.send_response(status)
                    for k, v in answer_headers:
                        if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._http = LoopbackServer(Handler)
        self.port = self._http.port

    @property
    def endpoint(self) -> str:
        return self._http.endpoint

    def _matches(self, method: str, path: str) -> bool:
        with self._rule_lock:
            if self._rule is None or method != self._rule[0] or self._rule[1] not in path:
                return False
            if self._skip:
                self._skip -= 1
                return False
            self._rule = None  # one request only
            return True

    def hold(self, method: str, key_part: str, *, skip: int = 0) -> None:
        """Hold the next request ``method`` whose path holds ``key_part``, after letting ``skip`` of them pass."""
        self.held.clear()
        self.landed.clear()
        self._go.clear()
        with self._rule_lock:
            self._rule = (method, key_part)
            self._skip = skip

    def release(self, *, forward: bool) -> None:
        self._forward = forward
        self._go.set()

    def stop(self) -> None:
        self._go.set()
        self._http.stop()
