"""The `Event` a handler receives: the record as it was first consumed, plus where it is now."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kafka_retry.errors import PayloadDecodeError


@dataclass(slots=True)
class Event:
    """One event, on the live lane or a retry tier.

    `key`, `value` and `headers` are exactly what the producer of the original event wrote
    (including `kafka-retry.*` headers of an upstream pipeline; this pipeline's own are
    removed: read their values from the fields here).
    `attempt` is the number of this processing attempt: 1 on the live lane, 2 on the first
    tier, and so on (a DLQ replay resets the count). Treat it as read-only: it is built per call
    (not frozen, which would cost more than the rest of the bookkeeping) and forwarding uses
    the consumed record, never this object."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    attempt: int
    tier: str | None  # None on the live lane
    pipeline: str
    consumer_group: str
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    original_timestamp_ms: int | None
    due_ms: int | None = None
    replay_id: str | None = None
    last_error_class: str | None = None
    last_error_message: str | None = None

    def header(self, name: str) -> bytes | None:
        """The last value of an original header, or None."""
        found: bytes | None = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    def text(self, encoding: str = "utf-8") -> str:
        """The value as text; undecodable bytes are a `PayloadDecodeError` (non-retriable)."""
        if self.value is None:
            raise PayloadDecodeError("event has no value (tombstone)")
        try:
            return self.value.decode(encoding)
        except (UnicodeDecodeError, LookupError) as e:
            raise PayloadDecodeError(f"value is not valid {encoding}: {e}") from e

    def json(self) -> Any:
        """The value parsed as JSON; invalid JSON is a `PayloadDecodeError` (non-retriable)."""
        text = self.text()
        try:
            return json.loads(text)
        except ValueError as e:
            raise PayloadDecodeError(f"value is not valid JSON: {e}") from e
