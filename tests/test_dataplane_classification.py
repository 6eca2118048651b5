"""Classification rules: names in the cause chain, HTTP statuses, spec overrides, defaults."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kafka_retry.classification import Classifier, exception_chain, qualified_name
from kafka_retry.errors import (
    HttpStatusError,
    NonRetriableError,
    PayloadDecodeError,
    RetriableError,
)
from kafka_retry.model import Classification


class UpstreamDown(Exception):
    pass


class OrderInvalid(ValueError):
    pass


POOL: list[type[BaseException]] = [
    UpstreamDown,
    OrderInvalid,
    ValueError,
    KeyError,
    TimeoutError,
    ConnectionResetError,
    RetriableError,
    NonRetriableError,
    PayloadDecodeError,
    RuntimeError,
]
NAMES = ["UpstreamDown", "OrderInvalid", "ValueError", "KeyError", "TimeoutError", "RuntimeError"]


def _chain(kinds: list[type[BaseException]], links: list[tuple[bool, int]]) -> BaseException:
    """Exceptions linked by __cause__ or __context__ to arbitrary others (cycles included)."""
    excs = [k("boom") for k in kinds]
    for exc, (as_cause, target) in zip(excs, links, strict=False):
        other = excs[target % len(excs)]
        if as_cause:
            exc.__cause__ = other
        else:
            exc.__context__ = other
    return excs[0]


chains = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from(POOL), min_size=n, max_size=n),
        st.lists(st.tuples(st.booleans(), st.integers(0, 10)), max_size=n),
    )
)
rules = st.builds(
    Classification,
    retriable=st.lists(st.sampled_from(NAMES), max_size=3),
    non_retriable=st.lists(st.sampled_from(NAMES), max_size=3),
    unknown_errors=st.sampled_from(["Retriable", "NonRetriable"]),
)


@given(chains, rules)
def test_classify_never_raises_and_spec_lists_take_precedence(
    chain: tuple[list[type[BaseException]], list[tuple[bool, int]]], spec: Classification
) -> None:
    exc = _chain(*chain)
    failure = Classifier(spec).classify(exc)
    members = list(exception_chain(exc))
    assert len(members) <= len(chain[0])  # cycles are cut

    def named(names: list[str]) -> bool:
        return any(c.__name__ in names for e in members for c in type(e).__mro__ if c is not object)

    if named(spec.retriable):
        assert failure.retriable
    elif named(spec.non_retriable):
        assert not failure.retriable
    assert failure.error_class == qualified_name(type(exc))


@given(
    st.integers(100, 599),
    st.lists(st.integers(100, 599), max_size=5),
    st.lists(st.integers(100, 599), max_size=5),
)
def test_http_status_rules(status: int, retriable: list[int], non_retriable: list[int]) -> None:
    c = Classifier(
        Classification(retriable_http_statuses=retriable, non_retriable_http_statuses=non_retriable)
    )
    if status in retriable:
        expected = True
    elif status in non_retriable:
        expected = False
    else:
        expected = status in (408, 429) or 500 <= status <= 599
    assert c.http_retriable(status) is expected
    assert c.classify(HttpStatusError(status)).retriable is expected
    assert c.http_success(status) is (200 <= status < 300)


@pytest.mark.parametrize(
    ("status", "retriable"),
    [(500, True), (503, True), (408, True), (429, True), (400, False), (404, False), (409, False)],
)
def test_http_defaults(status: int, retriable: bool) -> None:
    assert Classifier().http_retriable(status) is retriable


def test_builtin_kinds_and_unknown_default() -> None:
    c = Classifier()
    assert c.is_retriable(RetriableError())
    assert not c.is_retriable(NonRetriableError())
    assert not c.is_retriable(PayloadDecodeError())
    assert c.is_retriable(TimeoutError())
    assert c.is_retriable(ConnectionRefusedError())
    assert c.is_retriable(ValueError())  # unknownErrors: Retriable by default
    assert not Classifier(Classification(unknown_errors="NonRetriable")).is_retriable(ValueError())


def test_names_match_simple_qualified_and_base_classes() -> None:
    qualified = f"{OrderInvalid.__module__}.OrderInvalid"
    for name in ("OrderInvalid", qualified, "ValueError", "builtins.ValueError"):
        c = Classifier(Classification(non_retriable=[name]))
        assert not c.is_retriable(OrderInvalid()), name
    try:
        json.loads("{")
    except ValueError as e:
        decode_error = e
    c = Classifier(Classification(non_retriable=["json.decoder.JSONDecodeError"]))
    assert not c.is_retriable(decode_error)


def test_cause_chain_is_walked_and_outermost_builtin_wins() -> None:
    c = Classifier(Classification(non_retriable=["OrderInvalid"]))
    try:
        try:
            raise OrderInvalid("bad total")
        except OrderInvalid as inner:
            raise RuntimeError("handler failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert not c.is_retriable(wrapped)  # found via __cause__
    try:
        try:
            raise TimeoutError()
        except TimeoutError:
            raise NonRetriableError("give up")  # noqa: B904 - __context__ on purpose
    except NonRetriableError as e:
        assert not Classifier().is_retriable(e)  # the handler's explicit verdict outranks


def test_retriable_list_overrides_non_retriable_and_builtins() -> None:
    c = Classifier(Classification(retriable=["PayloadDecodeError"], non_retriable=["ValueError"]))
    assert c.is_retriable(PayloadDecodeError("late schema"))
    assert not c.is_retriable(OrderInvalid())


def test_failure_carries_message_and_stack() -> None:
    try:
        raise UpstreamDown("503 from payments")
    except UpstreamDown as e:
        failure = Classifier().classify(e)
    assert failure.error_class.endswith("UpstreamDown")
    assert failure.message == "503 from payments"
    assert "UpstreamDown" in failure.stack and "raise UpstreamDown" in failure.stack


def test_unprintable_exception_does_not_break_classification() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    failure = Classifier().classify(Weird())
    assert "unprintable" in failure.message
