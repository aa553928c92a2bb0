"""A threaded HTTP server on a loopback port, and a plain forward to another one: what the test kits'
proxies in front of a storage server (s3kit's HoldingProxy, gcskit's XmlPutBridge) are built from."""

from __future__ import annotations

import http.client
import http.server
import threading


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
