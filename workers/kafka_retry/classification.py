"""Deciding whether a failure is retriable: one set of rules for the live lane and every tier.

Order of precedence, first match wins:
1. `classification.retriable` names, anywhere in the exception's cause/context chain;
2. `classification.nonRetriable` names, anywhere in the chain;
3. built-in kinds, outermost exception first: `RetriableError`, `NonRetriableError`,
   `HttpStatusError` (by the service's `X-Kafka-Retry-Error` answer header if it sent one,
   else by status, see `http_retriable`), timeouts and connection errors;
4. `classification.unknownErrors`.
A name matches the class of an exception or any of its base classes, by simple name
(`ValueError`) or fully qualified name (`json.decoder.JSONDecodeError`).
"""

from __future__ import annotations

import http.client
import traceback
from collections.abc import Iterator
from types import CodeType, TracebackType
from typing import NamedTuple

from kafka_retry.errors import HttpStatusError, NonRetriableError, RetriableError
from kafka_retry.model import Classification

MAX_CHAIN = 32  # a cause chain longer than this is cut short (and cycles are skipped)
MAX_STACK_FRAMES = 30
_TYPES_KEPT = 256  # exception types whose verdict a Classifier remembers

_DEFAULT_RETRIABLE_STATUSES = frozenset({408, 429})
# Failures of the transport rather than of the event: worth another try later.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    http.client.HTTPException,
)


class Failure(NamedTuple):
    """A classified handler failure, ready to be written into the forward's headers."""

    retriable: bool
    error_class: str
    message: str
    stack: str


def qualified_name(cls: type[BaseException]) -> str:
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its `__cause__` (or, if none, `__context__`), and so on."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ if current.__cause__ is not None else current.__context__


class Classifier:
    """Applies a pipeline's `Classification` to exceptions and HTTP statuses."""

    def __init__(self, rules: Classification | None = None) -> None:
        rules = rules or Classification()
        self._retriable_names = frozenset(rules.retriable)
        self._non_retriable_names = frozenset(rules.non_retriable)
        self._retriable_statuses = frozenset(rules.retriable_http_statuses)
        self._non_retriable_statuses = frozenset(rules.non_retriable_http_statuses)
        self._unknown_retriable = rules.unknown_errors == "Retriable"
        self._by_type: dict[type[BaseException], tuple[bool, str]] = {}
        # (frames, class name, message, stack) of the last chainless failure: a failing
        # handler fails the same way event after event, and the same stack object lets the
        # header encoder reuse its encoding without comparing texts.
        self._last_stack: tuple[str, str, str, str] = ("", "", "", "")

    def http_success(self, status: int) -> bool:
        return 200 <= status < 300

    def http_retriable(self, status: int) -> bool:
        """For a non-2xx status: 408, 429, 5xx and listed statuses retry, other codes do not."""
        if status in self._retriable_statuses:
            return True
        if status in self._non_retriable_statuses:
            return False
        return status in _DEFAULT_RETRIABLE_STATUSES or 500 <= status <= 599

    def is_retriable(self, exc: BaseException) -> bool:
        chain = list(exception_chain(exc))
        if self._retriable_names and any(_matches(e, self._retriable_names) for e in chain):
            return True
        if self._non_retriable_names and any(_matches(e, self._non_retriable_names) for e in chain):
            return False
        for e in chain:
            verdict = self._builtin(e)
            if verdict is not None:
                return verdict
        return self._unknown_retriable

    def classify(self, exc: BaseException) -> Failure:
        """Never raises: a failure to describe the exception must not lose the event.

        Runs for every failed event. An exception without cause or context, other than an
        HTTP status error (judged by its status), is judged by its type alone: the verdict and
        the class name are kept per type, and only the message and the stack are per event."""
        if exc.__cause__ is None and exc.__context__ is None:
            known = self._by_type.get(type(exc))
            if known is None and not isinstance(exc, HttpStatusError):
                known = self._judge_type(exc)
            if known is not None:
                message = _safe_str(exc)
                try:
                    frames = _frames(exc.__traceback__)
                except Exception:
                    return Failure(known[0], known[1], message, "")
                last = self._last_stack
                if frames is last[0] and known[1] is last[1] and message == last[2]:
                    stack = last[3]
                else:
                    stack = frames + f"{known[1]}: {message}\n"
                    self._last_stack = (frames, known[1], message, stack)
                # tuple.__new__: a NamedTuple's own __new__ is a Python function.
                return tuple.__new__(Failure, (known[0], known[1], message, stack))
        try:
            retriable = self.is_retriable(exc)
        except Exception:  # a hostile __eq__/__hash__ somewhere in a custom exception
            retriable = self._unknown_retriable
        return Failure(
            retriable=retriable,
            error_class=qualified_name(type(exc)),
            message=_safe_str(exc),
            stack=_safe_stack(exc),
        )

    def _judge_type(self, exc: BaseException) -> tuple[bool, str] | None:
        """(verdict, class name) of a chainless exception's type, kept for the next ones."""
        try:
            known = (self.is_retriable(exc), qualified_name(type(exc)))
        except Exception:  # judged per event, as a hostile exception may answer differently
            return None
        if len(self._by_type) >= _TYPES_KEPT:
            self._by_type.clear()
        self._by_type[type(exc)] = known
        return known

    def _builtin(self, exc: BaseException) -> bool | None:
        if isinstance(exc, RetriableError):
            return True
        if isinstance(exc, NonRetriableError):
            return False
        if isinstance(exc, HttpStatusError):
            if exc.retriable is not None:  # the service said so: it knows better than a status
                return exc.retriable
            return self.http_retriable(exc.status)
        if isinstance(exc, _TRANSIENT_TYPES):
            return True
        return None


def _matches(exc: BaseException, names: frozenset[str]) -> bool:
    for cls in type(exc).__mro__:
        if cls is object:
            break
        if cls.__name__ in names or cls.__qualname__ in names:
            return True
        if f"{cls.__module__}.{cls.__qualname__}" in names:  # builtins.ValueError too
            return True
    return False


def _safe_str(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"
    return text


def _safe_stack(exc: BaseException) -> str:
    """The traceback text of the chain, innermost frames kept. Formatting frames reads source
    lines and costs tens of microseconds, while a failing handler fails at the same lines
    event after event: the frames part is cached by code location."""
    try:
        parts: list[str] = []
        for e in reversed(list(exception_chain(exc))):
            if parts:
                parts.append(_CHAINED)
            parts.append(_frames(e.__traceback__))
            parts.append(f"{qualified_name(type(e))}: {_safe_str(e)}\n")
        return "".join(parts)
    except Exception:
        return ""


_CHAINED = "\nwhich led to:\n\n"
# Frames text by code location. The key is each frame's code object id and instruction offset:
# hashing a code object hashes its constants and names, and a line number is decoded from the
# code's line table, which together were most of the cost of a failure. The value keeps the
# code objects, so that an id cannot be reused by another code object while its entry exists.
_FRAMES_CACHE: dict[tuple[int, ...], tuple[str, tuple[CodeType, ...]]] = {}  # (id, offset)*
_FRAMES_CACHE_SIZE = 512


def _frames(tb: TracebackType | None) -> str:
    key: list[int] = []
    walk = tb
    while walk is not None:
        key.append(id(walk.tb_frame.f_code))
        key.append(walk.tb_lasti)
        walk = walk.tb_next
    frozen = tuple(key) if len(key) <= 2 * MAX_STACK_FRAMES else tuple(key[-2 * MAX_STACK_FRAMES :])
    hit = _FRAMES_CACHE.get(frozen)
    if hit is not None:
        return hit[0]
    tbs: list[TracebackType] = []
    while tb is not None:
        tbs.append(tb)
        tb = tb.tb_next
    tbs = tbs[-MAX_STACK_FRAMES:]
    summary = traceback.StackSummary.from_list(
        [(t.tb_frame.f_code.co_filename, t.tb_lineno, t.tb_frame.f_code.co_name, None) for t in tbs]
    )
    text = "Traceback (most recent call last):\n" + "".join(summary.format())
    if len(_FRAMES_CACHE) >= _FRAMES_CACHE_SIZE:
        _FRAMES_CACHE.clear()
    _FRAMES_CACHE[frozen] = (text, tuple(t.tb_frame.f_code for t in tbs))
    return text
