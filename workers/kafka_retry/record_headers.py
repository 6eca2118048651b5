"""A consumed record's headers, read despite confluent-kafka's limits (2.x, CPython).

`Message.headers()` decodes each header name as UTF-8. A name that is not valid UTF-8 leaves a
null in its `(name, value)` tuple and a `UnicodeDecodeError` pending: a plain `msg.headers()`
call, once CPython has specialised it, does not check for that, and the error surfaces later,
anywhere (it used to crash the worker and the SDK). Calling through `operator.methodcaller`
checks, so the error is raised here, as a `SystemError`. The message keeps the list it built;
`_salvage` reads it again without touching a null (touching one crashes the interpreter) and
keeps every header whose name could be read.

Two limits cannot be worked around here, only documented (docs/faults.md): a name is read up to
its first NUL byte (`a\\0b` reads as `a`), and a record with more than 100,000 headers arrives
with none (librdkafka).
"""

from __future__ import annotations

import ctypes
import operator
from typing import Any

Headers = list[tuple[str, bytes | None]]

# `headers(msg)`: `msg.headers()`, checked (see above). On the per-event path: no wrapper.
headers = operator.methodcaller("headers")
# Where a tuple's items start: after the refcount, the type and the size (PyVarObject).
_ITEMS_OFFSET = tuple.__basicsize__
_POINTER = ctypes.sizeof(ctypes.c_void_p)


def salvage(msg: Any, error: SystemError) -> tuple[Headers, str]:
    """After `headers(msg)` raised `error`: the headers that could be read, and what could
    not (for the DLQ record's message)."""
    kept, lost = _salvage(msg.headers())
    return kept, _describe(lost, error)


def _salvage(headers: Any) -> tuple[Headers, int]:
    """The `(name, value)` tuples of `headers` without a null in them, and how many had one."""
    kept: Headers = []
    lost = 0
    if not isinstance(headers, list):
        return kept, lost
    for pair in headers:
        if type(pair) is not tuple or len(pair) != 2 or _has_null(pair):
            lost += 1
        else:
            kept.append(pair)
    return kept, lost


def _has_null(pair: tuple[object, object]) -> bool:
    base = id(pair) + _ITEMS_OFFSET
    return any(ctypes.c_void_p.from_address(base + i * _POINTER).value is None for i in (0, 1))


def _describe(lost: int, error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    example = f", e.g. {cause.object[:40]!r}" if isinstance(cause, UnicodeDecodeError) else ""
    return f"{lost} header(s) left out: name not valid UTF-8{example}"
