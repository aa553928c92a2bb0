"""What the storage test kits (s3kit, gcskit) are built from: a free loopback port, a server process
waited for until it answers and stopped after, a threaded HTTP server for their proxies in front of it
(s3kit's HoldingProxy, gcskit's XmlPutBridge), and a plain forward to the server."""

from __future__ import annotations

import http.client
import http.server
import socket
import subprocess
import threading
import time
import urllib.request


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(process: subprocess.Popen, url: str, what: str, *, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers; stop ``process`` and fail if it exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate ``process``, killing it if it has not ended within 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


class LoopbackServer:
    """``handler`` served on 127.0.0.1 (any free port) from daemon threads until :meth:`stop`."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()


def forward(port: int, method: str, path: str, body: bytes,
            headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send one request to the server on ``port``: its status, headers and whole body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.getheaders(), answer.read()
    finally:
        conn.close()
