"""Exception types a handler raises to say how its failure should be treated.

Handlers usually raise their own exceptions and let the pipeline's classification rules decide;
these types are for the cases where the handler knows better than a rule can."""

from __future__ import annotations


class RetriableError(Exception):
    """The event may succeed later (an upstream outage, a timeout): send it to the next tier."""


class NonRetriableError(Exception):
    """Retrying cannot help (bad data, a bug): send the event straight to the DLQ."""


class PayloadDecodeError(NonRetriableError):
    """The event's key or value cannot be decoded as the handler needs (e.g. not JSON)."""


class HttpStatusError(Exception):
    """An HTTP handler's endpoint answered with a non-2xx status; classified by that status,
    unless the service said otherwise (`retriable`: its `X-Kafka-Retry-Error` answer header,
    see http_handler.py)."""

    def __init__(
        self, status: int, reason: str = "", body: str = "", retriable: bool | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.retriable = retriable
        detail = f": {body}" if body else ""
        super().__init__(f"HTTP {status} {reason}".rstrip() + detail)
