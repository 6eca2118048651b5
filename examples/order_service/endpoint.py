"""The order service's endpoint for its tier workers: `POST /orders` runs `handle_order` on
the event a worker sends (the pipeline's `handler.http`).

The tier workers run the operator's image, so they need none of the service's code: they
hold each failed order until its tier's delay has passed, then POST it here, and the service
handles it with the same function as on the live lane. The answer tells the worker where the
order goes next: 200 handled; 503 retriable (`PaymentsUnavailable` and anything unexpected:
the next tier); 422 non-retriable (a bug or bad data, as the pipeline's `classification`
says for the live lane: the DLQ).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kafka_retry.errors import NonRetriableError, RetriableError
from kafka_retry.event import Event
from kafka_retry.http_handler import event_from_request

# What the live lane's classification (examples/demo-pipeline.yaml) sends to the DLQ.
NON_RETRIABLE = (NonRetriableError, ValueError, KeyError)

log = logging.getLogger("order_service.endpoint")


def status_of(error: Exception) -> int:
    if isinstance(error, RetriableError):
        return 503
    return 422 if isinstance(error, NON_RETRIABLE) else 503


class HandlerEndpoint:
    """`handle` behind HTTP on `host:port` (0: any free port), served from daemon threads."""

    def __init__(self, handle: Callable[[Event], None], host: str, port: int) -> None:
        class Request(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection per worker

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    handle(event_from_request(self.headers.items(), body))
                    status, text = 200, "ok"
                except Exception as e:  # the status carries it to the worker
                    status, text = status_of(e), f"{type(e).__name__}: {e}"
                self._answer(status, text)

            def _answer(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per order would drown the service's log

        self._server = ThreadingHTTPServer((host, port), Request)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> HandlerEndpoint:
        self._thread.start()
        log.info("tier workers' endpoint on http://%s/orders", self.address)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
