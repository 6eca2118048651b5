"""`handle_order`: the order service's event handler, on the live lane and in the tier workers.

It prices the order and charges it through the payments upstream. How it fails decides where
the event goes (the pipeline's `classification` and kafka_retry.errors):

- payments answers 5xx or cannot be reached → `PaymentsUnavailable`, a `RetriableError`: the
  event moves to the next retry tier and is tried again after that tier's delay;
- a coupon code like `SAVE15%` hits a bug in `coupon_percent` → `ValueError`, which the demo
  pipeline lists as non-retriable: the event goes straight to the DLQ.

The bug is fixed by a feature flag (`couponPercentFix`) in the JSON file named by
$ORDER_SERVICE_FLAGS, re-read when it changes, so the service sees the fix without a restart,
on the live lane and for the orders its tier workers POST to it (order_service/endpoint.py).
(In a real cluster the fix would be a new image of the service.)
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kafka_retry.errors import NonRetriableError, RetriableError
from kafka_retry.event import Event

PAYMENTS_URL_ENV = "PAYMENTS_URL"
FLAGS_ENV = "ORDER_SERVICE_FLAGS"
COUPON_FIX = "couponPercentFix"
PAYMENTS_TIMEOUT_S = 5.0


class PaymentsUnavailable(RetriableError):
    """The payments upstream failed (5xx, timeout, refused connection): worth a retry later."""


class PaymentRejected(NonRetriableError):
    """The payments upstream refused the charge (4xx): retrying cannot change its mind."""


class Flags:
    """Feature flags from a JSON file, re-read at most once a second when its mtime changes."""

    def __init__(self, path: str | None) -> None:
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: float | None = None
        self._values: dict[str, Any] = {}

    def enabled(self, name: str) -> bool:
        if self._path is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= 1.0:
                self._checked = now
                self._reload(self._path)
            return bool(self._values.get(name))

    def _reload(self, path: Path) -> None:
        try:
            mtime = path.stat().st_mtime
            if mtime != self._mtime:
                self._values = dict(json.loads(path.read_text()))
                self._mtime = mtime
        except (OSError, ValueError):
            self._values, self._mtime = {}, None  # no file (yet), or half-written: flags off


FLAGS = Flags(os.environ.get(FLAGS_ENV))


def handle_order(event: Event) -> None:
    """Price the order and charge it. Returns on success; raises to retry or dead-letter."""
    order = event.json()  # not JSON → PayloadDecodeError, non-retriable
    amount = price_cents(order)
    charge(order, amount, event)


def price_cents(order: dict[str, Any]) -> int:
    subtotal = sum(int(item["qty"]) * int(item["unit_cents"]) for item in order["items"])
    return subtotal * (100 - coupon_percent(order.get("coupon"))) // 100


def coupon_percent(code: str | None) -> int:
    """`SAVE15` → 15. Marketing started writing `SAVE15%`, which this code never expected."""
    if not code:
        return 0
    digits = code.removeprefix("SAVE")
    if FLAGS.enabled(COUPON_FIX):
        digits = digits.removesuffix("%")  # the fix
    return int(digits)  # the bug: int("15%") raises ValueError


def charge(order: dict[str, Any], amount_cents: int, event: Event) -> None:
    """POST the charge. The order id is the idempotency key, so a duplicate delivery (the
    pipeline is at-least-once) cannot charge twice. The X-Demo-* headers only feed the demo's
    ledger: which stage handled the order, at which attempt, from which replay."""
    base = os.environ.get(PAYMENTS_URL_ENV, "http://127.0.0.1:8089")
    body = json.dumps({"order": order["id"], "bank": order["bank"], "amountCents": amount_cents})
    request = urllib.request.Request(
        f"{base}/charges",
        data=body.encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": str(order["id"]),
            "X-Demo-Stage": event.tier or "source",
            "X-Demo-Attempt": str(event.attempt),
            "X-Demo-Replay-Id": event.replay_id or "",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=PAYMENTS_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in (408, 429):
            raise PaymentsUnavailable(f"payments answered {e.code} {e.reason}") from None
        raise PaymentRejected(f"payments refused the charge: {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PaymentsUnavailable(f"payments unreachable: {e}") from e
