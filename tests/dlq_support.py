"""Helpers for the DLQ tests (tests/test_dlq_*.py): DLQ events as the data plane writes them,
the `kafka-retry` CLI as a subprocess, a fixed service for tier workers to call, and reading
what a replay wrote. Not a test module (no `test_` prefix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from dataplane_support import Record, read_topic
from kafka_retry import headers as h
from kafka_retry.http_handler import ATTEMPT, REPLAY_ID, TIER

BIN = Path(sys.executable).parent


def error_class(i: int) -> str:
    """Every fourth event failed on bad data, the others on a timeout."""
    return "billing.errors.BadOrder" if i % 4 == 0 else "requests.exceptions.ReadTimeout"


def fill_dlq(
    bootstrap: str,
    dlq_topic: str,
    count: int,
    *,
    source_topic: str = "orders",
    group: str = "billing",
    first: int = 0,
    keys: int = 13,
    timestamp_ms: Callable[[int], int | None] = lambda i: None,
) -> None:
    """`count` DLQ events like a tier worker forwards them after the last tier: the original
    key, value and header, then our headers. Event i has id `e<i>`, key `k<i % keys>`."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    now_ms = int(time.time() * 1000)
    for i in range(first, first + count):
        state = h.RetryState(
            original_topic=source_topic,
            original_partition=0,
            original_offset=i,
            original_timestamp_ms=now_ms - 60_000,
            pipeline=f"shop/{group}",
            consumer_group=group,
            attempt=3,
            tier="retry-2",
            failed_at_ms=now_ms,
            error_class=error_class(i),
            error_message=f"order e{i} failed",
            error_stack="Traceback (most recent call last):\n  ...\nReadTimeout: slow",
            retriable=i % 4 != 0,
            dlq_reason=h.REASON_NON_RETRIABLE if i % 4 == 0 else h.REASON_EXHAUSTED,
        )
        headers = h.build_headers([("trace-id", f"t{i}".encode())], state)
        ts = timestamp_ms(i)
        producer.produce(
            dlq_topic,
            key=f"k{i % keys}".encode(),
            value=json.dumps({"id": f"e{i}"}).encode(),
            headers=headers,
            **({"timestamp": ts} if ts is not None else {}),
        )
    assert producer.flush(30) == 0


def cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`kafka-retry ARGS` as a user runs it."""
    return subprocess.run(
        [str(BIN / "kafka-retry"), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def replayed_records(bootstrap: str, topic: str, replay_id: str, expect: int) -> list[Record]:
    """The records of one replay on a tier topic (there may be others' too)."""
    records = read_topic(bootstrap, topic, expect=expect, timeout=60)
    return [r for r in records if r.header(h.REPLAY_ID) == replay_id]


def source_of(record: Record) -> tuple[int, int]:
    partition, offset = (record.header(h.REPLAY_SOURCE) or "").split(":")
    return int(partition), int(offset)


@dataclass
class Call:
    id: str
    replay_id: str | None
    attempt: int
    tier: str


@dataclass
class FixedService:
    """The service after the fix: every event succeeds. Records each call."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids(self) -> list[str]:
        with self.lock:
            return [c.id for c in self.calls]


@pytest.fixture
def fixed_service() -> Iterator[FixedService]:
    service = FixedService()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            call = Call(
                json.loads(body)["id"],
                self.headers.get(REPLAY_ID),
                int(self.headers.get(ATTEMPT) or 0),
                self.headers.get(TIER) or "",
            )
            with service.lock:
                service.calls.append(call)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    service.url = f"http://127.0.0.1:{server.server_address[1]}/events"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield service
    server.shutdown()
    server.server_close()
