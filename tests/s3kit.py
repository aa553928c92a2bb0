"""A real S3-compatible server on loopback for the object-storage tests: moto in server mode, over HTTP.

``S3Server.start()`` runs ``python -m moto.server`` on a free loopback port and waits until it answers;
``bucket()`` creates a fresh bucket and returns its ``s3://`` URL; ``environ()`` is what a batchrun
process needs to reach it (``AWS_ENDPOINT_URL``, dummy credentials, a region). The tests read the
store's own listing through boto3 (``keys``), never through batchrun, as their proof.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

_BUCKETS = itertools.count()


@dataclass
class S3Server:
    port: int
    process: subprocess.Popen
    _client: object = field(default=None, repr=False)

    @classmethod
    def start(cls) -> S3Server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        server = cls(port, process)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1):
                    return server
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.05)

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
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
