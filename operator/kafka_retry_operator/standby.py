"""What a standby replica serves while it waits for the leader Lease: `/healthz` on the liveness
address (the kubelet must not restart a healthy standby) and `/metrics` on the metrics port with
`kafka_retry_operator_leader 0` (a scrape target that is up, and says it is not leading).

Both are closed before kopf starts, which then serves the same addresses itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from kafka_retry_operator.metrics import LEADER_HELP, LEADER_METRIC

_METRICS = (
    f"# HELP {LEADER_METRIC} {LEADER_HELP}\n# TYPE {LEADER_METRIC} gauge\n{LEADER_METRIC} 0.0\n"
).encode()


def _handler(routes: dict[str, tuple[str, bytes]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content_type, body = routes.get(urlsplit(self.path).path, ("text/plain", b""))
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes are not news
            pass

    return Handler


@contextlib.contextmanager
def serving(liveness_url: str | None, metrics_address: str, metrics_port: int) -> Iterator[None]:
    servers: list[ThreadingHTTPServer] = []
    if liveness_url:
        url = urlsplit(liveness_url)
        routes = {url.path or "/": ("text/plain", b"standby\n")}
        servers.append(ThreadingHTTPServer((url.hostname or "", url.port or 80), _handler(routes)))
    if metrics_port:
        routes = {"/metrics": ("text/plain; version=0.0.4", _METRICS)}
        servers.append(ThreadingHTTPServer((metrics_address, metrics_port), _handler(routes)))
    for server in servers:
        threading.Thread(target=server.serve_forever, name="standby-http", daemon=True).start()
    try:
        yield
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
