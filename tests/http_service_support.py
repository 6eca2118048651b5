"""A recording HTTP endpoint for the tests of the pipeline's `http` handler (the tier workers'
and the managed live lane's calls): each test says how it answers; every call is recorded with
the headers the workers sent, so a test can check attempts, tiers and due times. Not a test
module (no `test_` prefix)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kafka_retry.http_handler import ATTEMPT, DUE, KEY, TIER


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Call:
    key: str
    tier: str
    attempt: int
    due_ms: int | None
    at_ms: int
    status: int


@dataclass
class RecordingService:
    """Answers each call with `status(key, attempt)` and records it."""

    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def status(self, key: str, attempt: int) -> int:
        raise NotImplementedError

    def answer(self, headers: Any) -> int:
        key, attempt = headers.get(KEY, ""), int(headers.get(ATTEMPT, "0"))
        status = self.status(key, attempt)
        due = headers.get(DUE)
        call = Call(
            key, headers.get(TIER, ""), attempt, int(due) if due else None, now_ms(), status
        )
        with self.lock:
            self.calls.append(call)
        return status

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def handled(self) -> set[str]:
        return {c.key for c in self.snapshot() if c.status == 200}


@contextmanager
def serving(svc: RecordingService) -> Iterator[RecordingService]:
    """`svc` on a free local port (its `url`), until the block ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(svc.answer(self.headers))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    svc.url = f"http://127.0.0.1:{server.server_address[1]}/events"
    try:
        yield svc
    finally:
        server.shutdown()
        server.server_close()
