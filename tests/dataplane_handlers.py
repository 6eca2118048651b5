"""Python handlers for tier workers run as subprocesses (`kafka-retry worker`), loaded by import
path `dataplane_handlers:<name>` with tests/ on PYTHONPATH. They record to the file named by
$DP_RECORD_FILE, one line per call, written with a single os.write (O_APPEND) so a kill -9
never leaves a half-recorded line that looks complete."""

from __future__ import annotations

import json
import os
import time

from kafka_retry.errors import NonRetriableError, RetriableError
from kafka_retry.event import Event


def _record(event: Event, outcome: str, **extra: object) -> str:
    event_id = str(json.loads(event.value or b"{}").get("id"))
    fields = {"id": event_id, "attempt": event.attempt, "outcome": outcome, **extra}
    line = json.dumps(fields) + "\n"
    fd = os.open(os.environ["DP_RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return event_id


def record(event: Event) -> None:
    """Succeeds, except ids ending in 7, which are non-retriable (they end in the DLQ)."""
    event_id = str(json.loads(event.value or b"{}").get("id"))
    if event_id.endswith("7"):
        _record(event, "failed")
        raise NonRetriableError(f"event {event_id} is bad")
    _record(event, "handled")


def record_timing(event: Event) -> None:
    """Succeeds, recording when it ran and when the event was written and due."""
    _record(
        event,
        "handled",
        at_ms=int(time.time() * 1000),
        timestamp_ms=event.timestamp_ms,
        due_ms=event.due_ms,
        partition=event.partition,
        offset=event.offset,
    )


def fail_retriably(event: Event) -> None:
    """Always fails, retriably, with a message and a stack as large as we write (the forward
    carries the most of our headers)."""
    _record(event, "failed", size=len(event.value or b""))
    raise RetriableError("upstream unavailable: " + "x" * 4000)


def hang_or_crash(event: Event) -> None:
    """`hang` never returns, `crash` ends the process at once; the rest succeed."""
    event_id = _record(event, "started")
    if event_id.startswith("hang"):
        time.sleep(3600)
    if event_id.startswith("crash"):
        os._exit(1)
    _record(event, "handled")
