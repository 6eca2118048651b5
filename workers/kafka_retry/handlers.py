"""Turning a pipeline's `handler` spec into a callable that takes one `Event`.

A handler returns normally on success and raises on failure; the exception is classified
by the pipeline's rules (see classification.py). Its return value is ignored.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kafka_retry.event import Event
from kafka_retry.model import Handler

HandlerFn = Callable[[Event], object]
# The http handler's shared secret, set by the operator from `handler.http.secretRef`.
HTTP_TOKEN_ENV = "KAFKA_RETRY_HTTP_TOKEN"


class HandlerLoadError(Exception):
    """The handler spec cannot be turned into a callable (missing module, not callable)."""


def load_callable(path: str) -> HandlerFn:
    """`package.module:function` or `package.module:Class.method` → the callable."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerLoadError(f"handler {path!r} is not of the form module:function")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as e:
        raise HandlerLoadError(f"cannot import {module_name!r} for handler {path!r}: {e}") from e
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise HandlerLoadError(f"handler {path!r}: {e}") from e
    if not callable(target):
        raise HandlerLoadError(f"handler {path!r} is not callable")
    fn: HandlerFn = target
    return fn


def build_handler(spec: Handler, http_token: str | None = None) -> HandlerFn:
    """`http_token`: the shared secret of `handler.http.secretRef` (the workers get it in
    `HTTP_TOKEN_ENV` from the Secret, never through the topology)."""
    if spec.python is not None:
        return load_callable(spec.python.callable)
    if spec.http is not None:
        from kafka_retry.http_handler import HttpEventHandler

        return HttpEventHandler(
            spec.http.url, timeout_s=spec.http.timeout_seconds, token=http_token
        )
    raise HandlerLoadError("handler: set exactly one of `python` or `http`")
