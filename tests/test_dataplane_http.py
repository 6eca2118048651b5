"""The `http` handler against a local stdlib HTTP server: 200, 500, 400 and a timeout, first
called directly, then through the live lane on the real broker."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from dataplane_support import FAST_CONSUMER, Running, make_topology, produce_ids, read_topic
from kafka_retry import headers as h
from kafka_retry import http_handler as hh
from kafka_retry.classification import Classifier
from kafka_retry.errors import HttpStatusError
from kafka_retry.event import Event
from kafka_retry.handlers import build_handler
from kafka_retry.model import Classification
from kafka_retry.sdk import RetryingConsumer

RELEASE = threading.Event()  # lets a "slow" request finish once the test is over


class Service(BaseHTTPRequestHandler):
    """Answers by the event id in the body: ok → 200, fail → 500, bad → 400, slow → no
    answer within the client's 1 s timeout, drip → an answer a byte every 0.2 s (each read
    quick, the whole answer 4 s)."""

    seen: ClassVar[list[tuple[dict[str, Any], dict[str, str]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        doc = json.loads(body)
        Service.seen.append((doc, dict(self.headers.items())))
        kind = str(doc["id"]).split("-")[0]
        if kind == "says":  # the status and the X-Kafka-Retry-Error verdict the body asks for
            self.send_response(int(doc["status"]))
            self.send_header(hh.ERROR_VERDICT, str(doc["verdict"]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "slow":
            RELEASE.wait(5)
        status = {"ok": 200, "fail": 500, "bad": 400, "slow": 200, "limited": 429, "drip": 200}[
            kind
        ]
        payload = f"status {status}".encode() if kind != "drip" else b"x" * 20
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if kind != "drip":
            self.wfile.write(payload)
            return
        for byte in payload:
            if RELEASE.wait(0.2):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def service_url() -> Iterator[str]:
    Service.seen = []
    RELEASE.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Service)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/events"
    RELEASE.set()
    server.shutdown()
    server.server_close()


def _event(event_id: str, key: bytes | None = b"k1") -> Event:
    return Event(
        key=key,
        value=json.dumps({"id": event_id}).encode(),
        headers=(("content-type", b"application/json"), ("trace", b"t-1"), ("bin", b"\x00")),
        topic="orders.retry-1",
        partition=3,
        offset=42,
        timestamp_ms=1700000000000,
        attempt=2,
        tier="retry-1",
        pipeline="shop/billing",
        consumer_group="billing",
        original_topic="orders",
        original_partition=1,
        original_offset=7,
        original_timestamp_ms=1699999999000,
        due_ms=1700000001000,
    )


def test_http_handler_statuses_and_timeout_are_classified(service_url: str) -> None:
    handler = hh.HttpEventHandler(service_url, timeout_s=1)
    classifier = Classifier()

    handler(_event("ok-1"))  # 200: returns normally
    doc, sent = Service.seen[-1]
    assert doc == {"id": "ok-1"}
    assert sent[hh.KEY] == "k1"
    assert sent[hh.ATTEMPT] == "2"
    assert sent[hh.TIER] == "retry-1"
    assert sent[hh.ORIGINAL_TOPIC] == "orders"
    assert sent[hh.ORIGINAL_OFFSET] == "7"
    assert sent[hh.DUE] == "1700000001000"
    assert sent["Content-Type"] == "application/json"
    assert sent[hh.EVENT_HEADER_PREFIX + "trace"] == "t-1"
    assert hh.EVENT_HEADER_PREFIX + "bin" not in sent  # not valid in HTTP: left out

    handler(_event("ok-2", key=b"\xff\x00"))
    assert Service.seen[-1][1][hh.KEY_ENCODING] == "base64"

    outcomes = {}
    for event_id in ("fail-1", "bad-1", "limited-1", "slow-1"):
        with pytest.raises(Exception) as info:
            handler(_event(event_id))
        outcomes[event_id] = classifier.classify(info.value)
    assert outcomes["fail-1"].retriable and "HttpStatusError" in outcomes["fail-1"].error_class
    assert not outcomes["bad-1"].retriable
    assert outcomes["limited-1"].retriable
    assert outcomes["slow-1"].retriable and "TimeoutError" in outcomes["slow-1"].error_class

    # after a timeout the handler reconnects and works again
    handler(_event("ok-3"))
    handler.close()


def test_a_python_service_gets_the_event_back_from_the_request(service_url: str) -> None:
    """What a worker POSTs, `event_from_request` turns back into the worker's `Event` (the
    example order service's endpoint calls its live-lane handler with it)."""
    handler = hh.HttpEventHandler(service_url, timeout_s=5)
    for key in (b"k1", b"\xff\x00", None):
        sent = _event("ok-1", key=key)
        handler(sent)
        doc, headers = Service.seen[-1]
        got = hh.event_from_request(headers.items(), json.dumps(doc).encode())
        # Only the event's headers that HTTP cannot carry (binary `bin`) are left behind.
        assert got == dataclasses.replace(sent, headers=sent.headers[:2]), (got, sent)
    live = dataclasses.replace(_event("ok-2"), tier=None, attempt=1, due_ms=None)
    handler(live)
    doc, headers = Service.seen[-1]
    assert hh.event_from_request(headers.items(), json.dumps(doc).encode()).tier is None
    handler.close()
    with pytest.raises(ValueError, match="not a tier worker's request"):
        hh.event_from_request([("Content-Type", "application/json")], b"{}")


def test_http_timeout_bounds_the_whole_request(service_url: str) -> None:
    """A server answering a byte at a time keeps every read under the timeout; the request as
    a whole still ends at it, and the handler works again afterwards."""
    handler = hh.HttpEventHandler(service_url, timeout_s=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        handler(_event("drip-1"))
    assert time.monotonic() - started < 2.0
    handler(_event("ok-after-drip"))
    assert Service.seen[-1][0] == {"id": "ok-after-drip"}
    handler.close()


def test_http_handler_statuses_can_be_overridden(service_url: str) -> None:
    handler = hh.HttpEventHandler(service_url, timeout_s=1)
    rules = Classifier(
        Classification(non_retriable_http_statuses=[500], retriable_http_statuses=[400])
    )
    for event_id, retriable in (("fail-1", False), ("bad-1", True)):
        with pytest.raises(HttpStatusError) as info:
            handler(_event(event_id))
        assert rules.classify(info.value).retriable is retriable
    handler.close()


@pytest.mark.parametrize(
    ("status", "verdict", "retriable"),
    [
        (500, "non-retriable", False),  # a bug the service knows retrying cannot fix
        (404, "retriable", True),  # not there yet: worth another try later
        (409, " Retriable ", True),  # case and spaces do not matter
        (503, "NON-RETRIABLE", False),
        (500, "maybe", True),  # not a verdict: the status decides
        (400, "", False),
    ],
)
def test_the_service_can_override_its_status(
    service_url: str, status: int, verdict: str, retriable: bool
) -> None:
    """The answer header beats the status and the pipeline's status rules alike."""
    handler = hh.HttpEventHandler(service_url, timeout_s=1)
    rules = Classifier(Classification(non_retriable_http_statuses=[404, 409]))
    event = dataclasses.replace(
        _event("says-1"),
        value=json.dumps({"id": "says-1", "status": status, "verdict": verdict}).encode(),
    )
    with pytest.raises(HttpStatusError) as info:
        handler(event)
    assert info.value.status == status
    assert rules.classify(info.value).retriable is retriable
    handler.close()


def test_the_shared_secret_is_sent_and_never_shown(service_url: str) -> None:
    handler = hh.HttpEventHandler(service_url, timeout_s=1, token="s3cret-value")
    handler(_event("ok-1"))
    assert Service.seen[-1][1]["Authorization"] == "Bearer s3cret-value"
    assert "s3cret" not in repr(handler) and "s3cret" not in str(vars(handler).get("url"))
    with pytest.raises(HttpStatusError) as info:
        handler(_event("fail-1"))
    assert "s3cret" not in str(info.value)
    handler.close()
    hh.HttpEventHandler(service_url, timeout_s=1)(_event("ok-2"))  # no secret: no header
    assert "Authorization" not in Service.seen[-1][1]


def test_connection_refused_is_retriable() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        handler = hh.HttpEventHandler(f"http://127.0.0.1:{s.getsockname()[1]}/", timeout_s=1)
        with pytest.raises(ConnectionError) as info:
            handler(_event("ok-1"))
    assert Classifier().classify(info.value).retriable


def test_http_handler_through_the_live_lane(
    kafka_bootstrap: str, make_topic: Callable[..., str], service_url: str
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),), http_url=service_url)
    sdk = RetryingConsumer(
        topo, build_handler(topo.handler), extra_config=FAST_CONSUMER, use_env=False
    )
    with Running(sdk):
        produce_ids(kafka_bootstrap, topo.source_topic, ["ok-1", "fail-1", "bad-1", "slow-1"])
        retried = read_topic(kafka_bootstrap, topo.tiers[0].topic, expect=2)
        dead = read_topic(kafka_bootstrap, topo.dlq_topic, expect=1)
        assert sdk.stats.handled == 1
    assert sorted(r.id for r in retried) == ["fail-1", "slow-1"]
    assert [r.id for r in dead] == ["bad-1"]
    assert "HTTP 400" in (dead[0].header(h.ERROR_MESSAGE) or "")
    by_id = {r.id: r for r in retried}
    assert by_id["fail-1"].header(h.ERROR_CLASS) == "kafka_retry.errors.HttpStatusError"
    assert by_id["slow-1"].header(h.ERROR_CLASS) == "TimeoutError"
