"""Python handlers for tier workers run as subprocesses (`kafka-retry worker`), loaded by import
path `dataplane_handlers:<name>` with tests/ on PYTHONPATH. They record to the file named by
$DP_RECORD_FILE, one line per call, written with a single os.write (O_APPEND) so a kill -9
never leaves a half-recorded line that looks complete."""

from __future__ import annotations

import json
import os

from kafka_retry.errors import NonRetriableError
from kafka_retry.event import Event


def _record(event: Event, outcome: str) -> str:
    event_id = str(json.loads(event.value or b"{}").get("id"))
    line = json.dumps({"id": event_id, "attempt": event.attempt, "outcome": outcome}) + "\n"
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
