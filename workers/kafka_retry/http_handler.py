"""The `http` handler: POST each event to the service and judge the answer by its status.
A Python service receiving those POSTs gets its `Event` back with `event_from_request`.

The body is the event's value, unchanged. Metadata travels in `X-Kafka-Retry-*` request
headers (see docs/headers.md); the event's own Kafka headers travel as `X-Kafka-Header-<name>`
when name and value are valid in HTTP. A non-2xx answer raises `HttpStatusError` (classified
by status); timeouts and connection errors propagate as `TimeoutError`/`ConnectionError`
(retriable). Keep-alive connections are pooled, one per call in flight, each reopened after
any error.

The service may override its status's classification with the answer header
`X-Kafka-Retry-Error: retriable` or `non-retriable` (other values are ignored). With a shared
secret (`handler.http.secretRef`), every request carries `Authorization: Bearer <secret>`, so
the service can refuse anyone else; the secret is never logged.

`timeout_s` bounds the whole request (connect, send, answer), not each socket read: a server
that answers a byte at a time would otherwise hold the consumer for as long as it likes.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable

from kafka_retry.errors import HttpStatusError
from kafka_retry.event import Event

HTTP_PREFIX = "X-Kafka-Retry-"
KEY = HTTP_PREFIX + "Key"
KEY_ENCODING = HTTP_PREFIX + "Key-Encoding"  # "base64" when the key is not printable ASCII
TOPIC = HTTP_PREFIX + "Topic"
PARTITION = HTTP_PREFIX + "Partition"
OFFSET = HTTP_PREFIX + "Offset"
TIMESTAMP = HTTP_PREFIX + "Timestamp-Ms"
ORIGINAL_TOPIC = HTTP_PREFIX + "Original-Topic"
ORIGINAL_PARTITION = HTTP_PREFIX + "Original-Partition"
ORIGINAL_OFFSET = HTTP_PREFIX + "Original-Offset"
ORIGINAL_TIMESTAMP = HTTP_PREFIX + "Original-Timestamp-Ms"
PIPELINE = HTTP_PREFIX + "Pipeline"
CONSUMER_GROUP = HTTP_PREFIX + "Consumer-Group"
ATTEMPT = HTTP_PREFIX + "Attempt"
TIER = HTTP_PREFIX + "Tier"
DUE = HTTP_PREFIX + "Due-Ms"
REPLAY_ID = HTTP_PREFIX + "Replay-Id"
LAST_ERROR_CLASS = HTTP_PREFIX + "Last-Error-Class"
EVENT_HEADER_PREFIX = "X-Kafka-Header-"
# Answer header: the service's own verdict on a non-2xx answer, overriding its status.
ERROR_VERDICT = HTTP_PREFIX + "Error"
VERDICTS = {"retriable": True, "non-retriable": False}

MAX_ERROR_BODY = 512
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PRINTABLE = re.compile(rb"^[\x20-\x7e]*$")


def request_headers(event: Event) -> dict[str, str]:
    """The HTTP request headers that describe `event`."""
    out = {
        "Content-Type": _content_type(event),
        TOPIC: event.topic,
        PARTITION: str(event.partition),
        OFFSET: str(event.offset),
        ORIGINAL_TOPIC: event.original_topic,
        PIPELINE: event.pipeline,
        CONSUMER_GROUP: event.consumer_group,
        ATTEMPT: str(event.attempt),
        TIER: event.tier or "source",
    }
    optional = {
        TIMESTAMP: event.timestamp_ms,
        ORIGINAL_PARTITION: event.original_partition,
        ORIGINAL_OFFSET: event.original_offset,
        ORIGINAL_TIMESTAMP: event.original_timestamp_ms,
        DUE: event.due_ms,
        REPLAY_ID: event.replay_id,
        LAST_ERROR_CLASS: event.last_error_class,
    }
    for name, value in optional.items():
        if value is not None:
            out[name] = str(value)
    if event.key is not None:
        if _PRINTABLE.match(event.key):
            out[KEY] = event.key.decode("ascii")
        else:
            out[KEY] = base64.b64encode(event.key).decode("ascii")
            out[KEY_ENCODING] = "base64"
    out = {name: _header_text(value) for name, value in out.items()}
    for name, raw in event.headers:
        if raw is not None and _TOKEN.match(name) and _PRINTABLE.match(raw):
            out[EVENT_HEADER_PREFIX + name] = raw.decode("ascii")
    return out


def event_from_request(headers: Iterable[tuple[str, str]], body: bytes) -> Event:
    """The `Event` a tier worker POSTed, rebuilt from its request (`request_headers`), so a
    service can call the same handler on the live lane and behind its HTTP endpoint. Header
    names are case-insensitive; a request missing the required ones is a `ValueError`."""
    fields: dict[str, str] = {}
    event_headers: list[tuple[str, bytes | None]] = []
    for name, value in headers:
        if name.lower().startswith(EVENT_HEADER_PREFIX.lower()):
            event_headers.append((name[len(EVENT_HEADER_PREFIX) :], value.encode("latin-1")))
        else:
            fields[name.lower()] = value

    def get(name: str) -> str | None:
        return fields.get(name.lower())

    def number(name: str) -> int | None:
        text = get(name)
        return int(text) if text is not None else None

    missing = [n for n in (TOPIC, PARTITION, OFFSET, ATTEMPT, TIER) if get(n) is None]
    if missing:
        raise ValueError(f"not a tier worker's request: no {', '.join(missing)} header")
    key = get(KEY)
    tier = get(TIER)
    return Event(
        key=None if key is None else _key_bytes(key, get(KEY_ENCODING)),
        value=body,
        headers=tuple(event_headers),
        topic=str(get(TOPIC)),
        partition=int(str(get(PARTITION))),
        offset=int(str(get(OFFSET))),
        timestamp_ms=number(TIMESTAMP),
        attempt=int(str(get(ATTEMPT))),
        tier=None if tier == "source" else tier,
        pipeline=get(PIPELINE) or "",
        consumer_group=get(CONSUMER_GROUP) or "",
        original_topic=get(ORIGINAL_TOPIC) or str(get(TOPIC)),
        original_partition=number(ORIGINAL_PARTITION),
        original_offset=number(ORIGINAL_OFFSET),
        original_timestamp_ms=number(ORIGINAL_TIMESTAMP),
        due_ms=number(DUE),
        replay_id=get(REPLAY_ID),
        last_error_class=get(LAST_ERROR_CLASS),
    )


def _key_bytes(text: str, encoding: str | None) -> bytes:
    return base64.b64decode(text) if encoding == "base64" else text.encode("ascii")


class _Watchdog:
    """Shuts a socket down when the request using it outlives its deadline, which makes the
    blocked read return at once. One daemon thread per connection, started on first use."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self.fired = False

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._cond:
            self._sock, self._deadline, self.fired = sock, time.monotonic() + seconds, False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._sock = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._sock is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self.fired = True
                with contextlib.suppress(OSError):  # already closed
                    self._sock.shutdown(socket.SHUT_RDWR)
                self._sock = None


class _Connection:
    """One keep-alive connection and the watchdog that bounds each request on it."""

    def __init__(self, http_conn: http.client.HTTPConnection) -> None:
        self.http = http_conn
        self.watchdog = _Watchdog()


class HttpEventHandler:
    """Callable handler, safe to call from several threads at once: each call takes an idle
    keep-alive connection from the pool (or opens one), so there are as many connections as
    calls were ever in flight together (`handler.http.maxInFlight` per partition)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, token: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        self._path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        self._timeout = timeout_s
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url

    def __repr__(self) -> str:  # never the token
        return f"HttpEventHandler({self.url!r})"

    def __call__(self, event: Event) -> None:
        body, headers = event.value or b"", request_headers(event) | self._auth
        conn = self._checkout()
        try:
            reused = conn.http.sock is not None
            try:
                status, reason, verdict, data = self._post(conn, body, headers)
            except ConnectionError:
                if not reused:
                    raise
                # The server closed an idle keep-alive connection: that says nothing about
                # the event, so try once more on a fresh connection.
                status, reason, verdict, data = self._post(conn, body, headers)
        finally:
            with self._lock:
                self._idle.append(conn)
        if not 200 <= status < 300:
            text = data[:MAX_ERROR_BODY].decode("utf-8", errors="replace")
            raise HttpStatusError(status, reason, text, VERDICTS.get(verdict.strip().lower()))

    def close(self) -> None:
        """Close the idle connections (one in use is closed by its call's end or error)."""
        with self._lock:
            for conn in self._idle:
                conn.http.close()

    def _checkout(self) -> _Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return _Connection(cls(self._host, self._port, timeout=self._timeout))

    def _post(
        self, conn: _Connection, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str, str, bytes]:
        """(status, reason, the `X-Kafka-Retry-Error` answer header or "", body)."""
        started = time.monotonic()
        http_conn, watchdog = conn.http, conn.watchdog
        try:
            if http_conn.sock is None:
                http_conn.connect()  # bounded by the socket timeout
            assert http_conn.sock is not None
            watchdog.arm(http_conn.sock, self._timeout - (time.monotonic() - started))
            try:
                http_conn.request("POST", self._path, body=body, headers=headers)
                response = http_conn.getresponse()
                data = response.read()
            finally:
                watchdog.disarm()
            if response.will_close or watchdog.fired:
                http_conn.close()
            verdict = response.getheader(ERROR_VERDICT) or ""
            return response.status, response.reason, verdict, data
        except BaseException as e:
            http_conn.close()  # a half-used connection must not serve the next event
            if watchdog.fired:
                raise TimeoutError(f"no complete answer within {self._timeout:g} s") from e
            raise


def _content_type(event: Event) -> str:
    raw = event.header("content-type") or event.header("Content-Type")
    if raw is not None and _PRINTABLE.match(raw) and raw:
        return raw.decode("ascii")
    return "application/octet-stream"


def _header_text(text: str) -> str:
    """HTTP header values are one line of latin-1: replace anything else."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)
