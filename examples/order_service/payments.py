"""A fake payments upstream: `POST /charges` with an order id, bank and amount.

Some banks are "flaky": their connector answers HTTP 500 to the first N charge attempts of each
order, then accepts it — a retriable failure that heals after a while, which is exactly what
retry tiers are for. Charges are idempotent by the `Idempotency-Key` header (the order id): a
repeated charge is accepted and recorded as a duplicate, never charged twice.

The ledger (`Payments.charges()`, or `GET /ledger` as JSON) is how the demo tells which orders
were handled, where and how often.

    python -m order_service.payments --port 8089 --flaky northwind=1 --flaky fabrikam=2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Bank → how many charge attempts per order its connector fails with HTTP 500.
DEFAULT_FLAKY: dict[str, int] = {"northwind": 1, "fabrikam": 2}


@dataclass(frozen=True)
class Charge:
    """One accepted charge request, with the demo's bookkeeping headers."""

    order: str
    amount_cents: int
    stage: str  # "source" (the live lane) or a tier name
    attempt: int
    replay_id: str
    at: float  # epoch seconds
    duplicate: bool  # the order was charged before: answered 200, not charged again


class Payments:
    """The upstream's state: attempts per order, accepted charges, 500s answered."""

    def __init__(self, flaky: Mapping[str, int] | None = None) -> None:
        self.flaky = dict(DEFAULT_FLAKY if flaky is None else flaky)
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._charges: list[Charge] = []
        self.failures = 0

    def charge(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> int:
        """Handle one request; returns the HTTP status."""
        order = str(body["order"])
        with self._lock:
            attempt = self._attempts.get(order, 0) + 1
            self._attempts[order] = attempt
            if attempt <= self.flaky.get(str(body.get("bank")), 0):
                self.failures += 1
                return 500
            duplicate = any(c.order == order for c in self._charges)
            self._charges.append(
                Charge(
                    order=order,
                    amount_cents=int(body["amountCents"]),
                    stage=headers.get("X-Demo-Stage") or "source",
                    attempt=int(headers.get("X-Demo-Attempt") or 0),
                    replay_id=headers.get("X-Demo-Replay-Id") or "",
                    at=time.time(),
                    duplicate=duplicate,
                )
            )
            return 200

    def charges(self) -> list[Charge]:
        with self._lock:
            return list(self._charges)


class PaymentsServer:
    """`Payments` over HTTP on 127.0.0.1, served from a daemon thread."""

    def __init__(self, payments: Payments, port: int = 0, host: str = "127.0.0.1") -> None:
        self.payments = payments

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length))
                    status = payments.charge(body, dict(self.headers.items()))
                except (ValueError, KeyError, TypeError):
                    status = 400
                self._send(status, {"ok": status == 200})

            def do_GET(self) -> None:
                if self.path != "/ledger":
                    self._send(404, {"error": "not found"})
                    return
                self._send(200, {"charges": [asdict(c) for c in payments.charges()]})

            def _send(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per charge would drown the demo's output

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> PaymentsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="order_service.payments", description=__doc__)
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument(
        "--flaky",
        action="append",
        metavar="BANK=N",
        help="answer 500 to the first N attempts per order of BANK (default: "
        + ", ".join(f"{b}={n}" for b, n in DEFAULT_FLAKY.items())
        + ")",
    )
    args = parser.parse_args(argv)
    flaky = None
    if args.flaky:
        flaky = {bank: int(n) for bank, n in (f.split("=", 1) for f in args.flaky)}
    server = PaymentsServer(Payments(flaky), args.port).start()
    print(f"payments upstream on {server.url} (flaky: {server.payments.flaky})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
