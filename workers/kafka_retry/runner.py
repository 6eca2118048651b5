"""The consume → handle → forward loop shared by the live-lane SDK and the tier workers.

One `StageRunner` consumes one stage's topic. What it does with each event is its stage's
policy (decision.py, chosen once: `TierPolicy` or `LiveLanePolicy`): how the headers are read,
hold, handle or dead-letter, and the attempt and origin the event carries. On a tier, events
not due yet wait in their partition's window (`DelayGate`) and are handled as they fall due; on
the live lane events are due on arrival. The handler runs on the consumer's thread, or with
`max_in_flight` above 1 on pool threads, several calls per partition at once (inflight.py); a
failure is classified and forwarded (next tier or DLQ) without waiting for the
acknowledgement, so the loop moves on at once. An input offset is stored for commit
only when everything before it is finished: handled, or forwarded and acknowledged
(`OffsetTracker`). What is kept per partition comes and goes with the assignment
(`Assignment`). Every consumer call (consume, pause, seek, resume, store, commit) and every
delivery report happen on the thread that calls `run()`.

Exactly-once (`spec.delivery: ExactlyOnce`): forwards are sent in a Kafka transaction, which
is committed every `transaction_interval_s` with the input offsets finished meanwhile
(`send_offsets_to_transaction`, with the group's metadata: a zombie is fenced). Offsets are
never committed any other way, and never past an event waiting in a window: a held partition
keeps no transaction open across its delay. An aborted transaction rewinds every partition to
its committed offset; a fatal producer error (fenced) stops the loop for a restart.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from kafka_retry import decision, poison, record_headers, topology_tag
from kafka_retry import headers as h
from kafka_retry.assignment import COMMITTED_TIMEOUT_S, Assignment
from kafka_retry.classification import Classifier, Failure
from kafka_retry.client_log import client_log
from kafka_retry.decision import HANDLE, HOLD
from kafka_retry.delay import DelayGate, WindowLimits
from kafka_retry.event import Event
from kafka_retry.forwarding import (
    FatalProducerError,
    Forwarder,
    Redirect,
    Refusal,
    TransactionAborted,
    too_large,
)
from kafka_retry.handlers import HandlerFn
from kafka_retry.inflight import Call, InFlight
from kafka_retry.kafka_config import exactly_once, incremental_rebalance
from kafka_retry.metrics import StageMetrics
from kafka_retry.model import EXACTLY_ONCE, Topology
from kafka_retry.offsets import OffsetTracker, Ticket, TopicPartitionKey
from kafka_retry.poison import POISON_STARTS
from kafka_retry.routing import OUTCOMES, SUCCEEDED, Origin, Route, Router, Stage

log = logging.getLogger(__name__)

DEFAULT_BATCH = 500
DEFAULT_POLL_CAP_S = 0.5
DEFAULT_DRAIN_S = 20.0
ACK_WAIT_S = 0.005  # longest consume() wait while forwards are unacknowledged
# Exactly-once: how often the open transaction is committed. Forwards are invisible to the
# next stage's read_committed reader until then; each commit costs a few round trips.
DEFAULT_TRANSACTION_INTERVAL_S = 0.1
MAX_ABORT_BACKOFF_S = 10.0
STUCK_ABORTS = 3  # transactions aborted in a row: stuck, as a refused forward is
MALFORMED_CLASS = "kafka_retry.MalformedHeaders"
POISON_CLASS = "kafka_retry.Poison"
_headers = record_headers.headers


# Young-generation threshold of the cyclic garbage collector in a worker process (default 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc_for_worker() -> None:
    """For a process that exists to run one loop (`kafka-retry worker`), called once before it.

    A forward keeps a few dozen objects alive until the broker acknowledges it, some
    milliseconds later. With the default thresholds they outlive two young collections and
    reach the old generation, whose full collections then walk the whole heap: 15% of a
    forwarding worker's CPU, measured (bench/tier_throughput.py). Collecting the young
    generation less often lets them die young; freezing what start-up allocated (modules,
    clients, the topology) keeps full collections short. Not for the SDK: a service's process
    is the service's to tune."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@dataclass(slots=True)
class RunnerStats:
    """Counters a test or a probe can read; written on the consumer thread only."""

    assigned: int = 0  # assignment callbacks that brought partitions
    revoked: int = 0  # revoke callbacks that took partitions
    lost: int = 0
    handled: int = 0
    forwarded: int = 0


class StageRunner:
    def __init__(
        self,
        topology: Topology,
        stage: Stage,
        handler: HandlerFn,
        *,
        consumer_config: Mapping[str, Any],
        producer_config: Mapping[str, Any],
        classifier: Classifier | None = None,
        batch_size: int = DEFAULT_BATCH,
        poll_cap_s: float = DEFAULT_POLL_CAP_S,
        drain_timeout_s: float = DEFAULT_DRAIN_S,
        drain_to: str | None = None,
        window_limits: WindowLimits | None = None,
        max_in_flight: int = 1,
        by_key: bool = False,
        transaction_interval_s: float = DEFAULT_TRANSACTION_INTERVAL_S,
    ) -> None:
        """`max_in_flight` above 1: that many handler calls at once per partition, never two
        of the same key with `by_key` (the handler must be thread-safe)."""
        self.topology = topology
        self.stage = stage
        self._handler = handler
        self._consumer_config = dict(consumer_config)
        self._producer_config = dict(producer_config)
        self._exactly_once = topology.delivery == EXACTLY_ONCE
        if self._exactly_once:
            self._consumer_config, self._producer_config = exactly_once(
                self._consumer_config,
                self._producer_config,
                _transactional_id(stage, consumer_config),
            )
        self._txn_interval_s = transaction_interval_s
        self._txn_last = 0.0  # monotonic() of the last transaction commit (or abort)
        self._aborts = 0  # in a row: the next retry waits longer
        # Exactly-once: forwards the broker refused as too large in an aborted transaction,
        # by (input partition, offset, topic): where they go when the input is read again.
        self._detours: dict[tuple[TopicPartitionKey, int, str], tuple[str, h.HeaderList, str]] = {}
        self._classifier = classifier or Classifier(topology.classification)
        self._router = Router(topology, stage)
        self._batch = batch_size
        self._cap = poll_cap_s
        self._drain_s = drain_timeout_s
        self._max_poll_s = int(self._consumer_config.get("max.poll.interval.ms", 300000)) / 1000
        # A batch is cut short (the rest re-read) when handling it nears max.poll.interval.ms.
        self._batch_budget_s = self._max_poll_s / 2
        self._metrics = StageMetrics(topology.pipeline, stage.name)
        # Per-stage constants and metric children, looked up once rather than per event.
        # What differs between a tier and the live lane (decision.py), chosen once.
        self._policy = decision.policy_for(stage)
        self._read_headers = self._policy.read
        self._admit = self._policy.admit
        self._tier_name = self._policy.tier_name
        self._pipeline = topology.pipeline
        self._group = stage.consumer_group
        self._lateness = self._metrics.lateness
        self._handler_seconds = self._metrics.handler_seconds
        self._outcome = self._metrics.outcome
        # Outcomes since the last `_count()`: successes, and forwards acknowledged by outcome.
        self._succeeded = 0
        self._acked: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        # Per partition: assigned, held, stalled, offset frontier, poison marks (assignment.py).
        self._parts = Assignment(incremental=incremental_rebalance(self._consumer_config))
        # The same objects, read per event.
        self._assigned = self._parts.partitions
        self._tracker = self._parts.tracker
        self._heads = self._parts.heads
        self._handler_since = 0.0  # perf_counter() at the start of the call in progress
        self._consumer: Any = None
        self._stopping = threading.Event()
        self._joined = False
        self._running = False
        self._last_poll = time.monotonic()
        self._forwarder: Forwarder | None = None
        self._gate: DelayGate | None = None
        self._window_limits = window_limits
        # A drain worker's (draining.py in the operator): due events go here unhandled.
        self._drain_to = drain_to
        self._next_topology: Topology | None = None  # from `follow`, applied between batches
        self._digest = self._tag = ""
        self._name_topology(topology)
        self._in_flight = (
            InFlight(handler, max_in_flight, by_key=by_key, on_done=self._call_done)
            if max_in_flight > 1 and drain_to is None
            else None
        )
        self.stats = RunnerStats()

    # ------------------------------------------------------------------ control and probes

    def stop(self) -> None:
        """Ask `run()` to finish the event in hand, drain forwards, commit and return.
        Safe from any thread and from a signal handler."""
        self._stopping.set()

    def alive(self) -> bool:
        """The loop has polled within `max.poll.interval.ms` (or has not started yet)."""
        return not self._running or time.monotonic() - self._last_poll < self._max_poll_s

    def ready(self) -> bool:
        """Joined the group (an assignment arrived, possibly empty), polling, and no forward
        stuck (refused by its topic and by the DLQ)."""
        return (
            self._running
            and self._joined
            and self.alive()
            and not self._stopping.is_set()
            and not (self._forwarder is not None and self._forwarder.stuck)
            and self._aborts < STUCK_ABORTS
        )

    def handler_started(self) -> float:
        """`time.perf_counter()` when the handler call in progress began; 0 between calls.
        With concurrent calls, when the oldest running one began. Read by a
        `watchdog.Watchdog` on another thread."""
        if self._in_flight is not None:
            return self._in_flight.started()
        return self._handler_since

    def transaction_call_started(self) -> float:
        """`time.perf_counter()` when the transaction call in progress began (ExactlyOnce);
        0 between calls. Read by a `watchdog.Watchdog` on another thread."""
        forwarder = self._forwarder
        return forwarder.call_started if forwarder is not None else 0.0

    def follow(self, topology: Topology) -> None:
        """A new topology of this pipeline (safe from any thread): routing, next delays and
        classification follow it from the next batch on. A tier whose own topic changed or
        that is gone keeps its stage (the operator replaces its workers); the handler is
        what the process started with."""
        self._next_topology = topology

    def _apply_topology(self, topology: Topology) -> None:
        stage = self._policy.stage_in(topology)
        if stage is None:
            log.info("tier %s left the topology: its workers are replaced", self.stage.name)
            return
        if topology.delivery != self.topology.delivery:
            log.warning("delivery %s takes effect at the next start", topology.delivery)
        self.topology, self.stage = topology, stage
        self._router = Router(topology, stage)
        self._classifier = Classifier(topology.classification)
        self._policy.follow(stage)
        log.info("following the new topology of %s", topology.pipeline)
        self._name_topology(topology)
        # What is finished is committed first, so the tag goes on the latest offsets.
        if self._exactly_once:
            self._commit_transaction(self._consumer)
        else:
            self._store(self._consumer)
        self._announce(sorted(self._assigned))

    def _name_topology(self, topology: Topology) -> None:
        """The topology run, named in every commit's metadata (topology_tag.py)."""
        self._digest = topology_tag.topology_hash(topology)
        self._tag = topology_tag.with_tag(None, self._digest)

    def paused_partitions(self) -> int:
        """Partitions holding a head that is not due yet."""
        return len(self._gate) if self._gate is not None else 0

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        consumer = self._consumer = Consumer(self._consumer_config, logger=client_log())
        forwarder = Forwarder(
            self._producer_config,
            on_acked=self._on_forward_acked,
            on_refused=self._on_forward_refused,
            on_failed_attempt=lambda _err: self._metrics.delivery_failures.inc(),
        )
        self._forwarder = forwarder
        self._gate = DelayGate(consumer, self._window_limits) if self._policy.holds else None
        self._parts.gate = self._gate
        consumer.subscribe(
            [self.stage.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._running = True
        log.info(
            "consuming %s as %s (pipeline %s, stage %s)",
            self.stage.topic,
            self.stage.consumer_group,
            self.topology.pipeline,
            self.stage.name,
        )
        try:
            self._loop(consumer, forwarder)
        finally:
            self._shutdown(consumer, forwarder)

    def _loop(self, consumer: Any, forwarder: Forwarder) -> None:
        gate = self._gate
        in_flight = self._in_flight
        while not self._stopping.is_set():
            if self._next_topology is not None and self._drain_to is None:
                topology, self._next_topology = self._next_topology, None
                self._apply_topology(topology)
            self._last_poll = time.monotonic()
            timeout = self._cap
            if forwarder.stuck or self._parts.stalled:
                self._stall(consumer, bool(forwarder.stuck))
            holding = gate is not None and not self._parts.stalled
            if holding:
                assert gate is not None
                timeout = gate.poll_timeout(int(time.time() * 1000), self._cap)
            # Acknowledgements are served between consume calls: wait for them, not up to the
            # cap, so offsets are stored as soon as forwards are durable.
            timeout = forwarder.wait_s(timeout, ACK_WAIT_S)
            if in_flight is not None and in_flight.calls:  # and for calls' outcomes
                timeout = min(timeout, ACK_WAIT_S)
            if self._exactly_once and forwarder.in_transaction:
                timeout = min(
                    timeout, max(0.0, self._txn_last + self._txn_interval_s - self._last_poll)
                )
            messages = self._consume(consumer, timeout)
            polled = time.monotonic()
            forwarder.poll(0)
            if in_flight is not None:
                in_flight.serve()
            if holding:  # waiting events now due first: they are older than what just came
                assert gate is not None
                due = gate.take_due(int(time.time() * 1000))
                for i, (tp, msg) in enumerate(due):
                    if self._stopping.is_set() or time.monotonic() - polled > self._batch_budget_s:
                        for tp_rest, msg_rest in reversed(due[i:]):
                            gate.hold_again(tp_rest, 0, msg_rest)
                        self._keep(consumer, messages)
                        messages = []
                        break
                    if tp in self._assigned:
                        self._handle(msg, tp, msg.offset(), int(time.time() * 1000))
            for i in range(len(messages)):
                if self._stopping.is_set():
                    break
                if time.monotonic() - polled > self._batch_budget_s:
                    self._keep(consumer, messages[i:])
                    break
                # Dropped from the batch as it is handled, so that its header objects are freed
                # while still in the CPU cache rather than all together at the next consume.
                msg, messages[i] = messages[i], None
                self._process(msg)
            if in_flight is not None:
                in_flight.serve()
            forwarder.poll(0)
            if self._exactly_once:
                self._commit_due(consumer)
            else:
                self._store(consumer)
            self._count()
            if gate is not None:
                if holding:
                    gate.pause_idle(int(time.time() * 1000))
                self._metrics.paused.set(len(gate))

    def _consume(self, consumer: Any, timeout: float) -> list[Any]:
        """Up to a batch of what has arrived, waiting at most `timeout` for the first message
        but never for a batch to fill: `consume(n, timeout)` returns only when it has n
        messages or the timeout has passed, which at a moderate rate adds up to the whole
        timeout to every event's latency. Under a backlog the first call returns a full batch."""
        messages: list[Any] = consumer.consume(self._batch, 0)
        if messages or timeout <= 0:
            return messages
        messages = consumer.consume(1, timeout)
        if messages and self._batch > 1:
            messages += consumer.consume(self._batch - 1, 0)
        return messages

    def _process(self, msg: Any) -> None:
        """One event, on the consumer's thread. The per-event path: per-stage values are
        attributes set once, the success counter is tallied and flushed per batch."""
        err = msg.error()
        if err is not None:
            # A fatal error reaches the consumer as an event coded _FATAL (e.g. a static
            # member fenced after a broker restart): the consumer is done, and so is the run.
            if err.fatal() or err.code() == KafkaError._FATAL:
                raise KafkaException(err)
            log.warning("consumer error on %s: %s", self.stage.topic, err)
            return
        tp = (msg.topic(), msg.partition())
        if tp not in self._assigned:
            return  # revoked by a rebalance inside the consume() that returned it
        now_ms = int(time.time() * 1000)
        gate = self._gate
        if gate is not None:
            # Not due by its append time, or behind events that are not: it waits (unread).
            not_before = decision.not_before_ms(msg.timestamp()[1], self._policy.delay_ms, now_ms)
            if not_before > now_ms or gate.waiting(tp):
                gate.hold(tp, not_before, msg)
                return
        self._handle(msg, tp, msg.offset(), now_ms)

    def _handle(self, msg: Any, tp: TopicPartitionKey, offset: int, now_ms: int) -> None:
        """An event that is next on its partition: read its headers, decide, carry it out."""
        try:
            parsed = self._read_headers(_headers(msg))
        except SystemError as e:  # header names that are not UTF-8: keep the others, say so
            kept, unreadable = record_headers.salvage(msg, e)
            parsed = self._read_headers(kept)
            parsed = parsed._replace(problems=(*parsed.problems, unreadable))
        ts_type, ts = msg.timestamp()
        timestamp_ms = ts if ts_type != 0 and ts >= 0 else None

        verdict, due_ms, problems, prior, attempt, origin = self._admit(
            parsed, tp, offset, timestamp_ms, now_ms
        )
        if verdict != HANDLE:
            if verdict == HOLD:  # due later than its append time said: no broker clock
                assert due_ms is not None and self._gate is not None
                self._gate.hold_again(tp, due_ms, msg)
                return
            log.warning("malformed event %s[%d]@%d: %s", tp[0], tp[1], offset, "; ".join(problems))
            failure = Failure(False, MALFORMED_CLASS, "; ".join(problems), "")
            route = self._router.malformed()
            self._dead_letter(msg, tp, parsed, origin, prior, attempt, failure, route, now_ms)
            return
        if due_ms is not None:  # a tier's
            self._lateness.observe((now_ms - due_ms) / 1000.0)
        if self._drain_to is not None:
            self._drain(msg, tp, offset)
            return
        if self._heads.watching:
            starts = self._heads.before_handler(tp, offset)
            if starts is not None and self._in_flight is not None:
                self._in_flight.settle(tp)  # a mark says all before it is finished
            if starts is not None and not self._mark_head(tp, offset, starts):
                log.error("poison event %s[%d]@%d: to the DLQ", tp[0], tp[1], offset)
                failure = Failure(
                    False, POISON_CLASS, f"the worker stopped {starts - 1} times while this "
                    "event was in its handler (a hang past the deadline, a crash, os._exit)", "",
                )  # fmt: skip
                route = self._router.poison()
                self._dead_letter(msg, tp, parsed, origin, prior, attempt, failure, route, now_ms)
                return
        ticket = self._tracker.begin(tp, offset)
        key = msg.key()
        value = msg.value()
        # Positional: a 19-field keyword call costs more than the rest of the bookkeeping.
        event = Event(
            key, value, parsed.original, tp[0], tp[1], offset, timestamp_ms, attempt,
            self._tier_name, self._pipeline, self._group, origin.topic, origin.partition,
            origin.offset, origin.timestamp_ms, due_ms, prior.replay_id, prior.error_class,
            prior.error_message,
        )  # fmt: skip
        if self._in_flight is not None:
            context = (ticket, key, value, parsed.original, origin, prior, attempt)
            self._in_flight.submit(tp, key, event, context)
            return
        started = self._handler_since = time.perf_counter()
        try:
            self._handler(event)
        except Exception as exc:
            self._handler_since = 0.0
            self._handler_seconds.observe(time.perf_counter() - started)
            self._failed(exc, ticket, key, value, parsed.original, origin, prior, attempt)
        else:
            self._handler_since = 0.0
            self._handler_seconds.observe(time.perf_counter() - started)
            OffsetTracker.finish(ticket)
            self._succeeded += 1
            self.stats.handled += 1

    def _call_done(self, call: Call) -> None:
        """A concurrent call's outcome, on the consumer's thread (`InFlight`)."""
        ticket = call.context[0]
        if ticket.forgotten:
            return  # its partition was lost meanwhile: the new owner calls it again
        self._handler_seconds.observe(call.seconds)
        if call.error is not None:
            assert isinstance(call.error, Exception)
            self._failed(call.error, *call.context)
        else:
            OffsetTracker.finish(ticket)
            self._succeeded += 1
            self.stats.handled += 1

    def _failed(
        self,
        exc: Exception,
        ticket: Ticket,
        key: bytes | None,
        value: bytes | None,
        original: tuple[tuple[str, bytes | None], ...],
        origin: Origin,
        prior: h.RetryState,
        attempt: int,
    ) -> None:
        """The handler failed: classify, route (next tier or DLQ) and forward the consumed
        record (never the `Event`, which the handler may have changed)."""
        failure = self._classifier.classify(exc)
        now_ms = int(time.time() * 1000)
        route = self._router.route(failure.retriable, now_ms)
        headers = self._router.forward_headers(
            original, origin, prior, attempt, failure, route, now_ms
        )
        self._forward(key, value, ticket, headers, route, len(original))

    def _keep(self, consumer: Any, rest: list[Any]) -> None:
        """Handling took long: the rest of the batch is handled after the next poll, so a slow
        handler never keeps the consumer from polling for longer than the interval allows. On
        a tier it waits in its partitions' windows; on the live lane each partition is sought
        back to its first unhandled message."""
        gate = self._gate
        first: dict[TopicPartitionKey, int] = {}
        for msg in rest:
            if msg is None or msg.error() is not None:
                continue
            tp = (msg.topic(), msg.partition())
            if tp not in self._assigned:
                continue
            if gate is not None:
                gate.hold(tp, 0, msg)
            elif tp not in first:
                first[tp] = msg.offset()
        for (topic, partition), offset in first.items():
            consumer.seek(TopicPartition(topic, partition, offset))
        log.info("handling took long: the rest of the batch is handled after the next poll")

    def _dead_letter(
        self,
        msg: Any,
        tp: TopicPartitionKey,
        parsed: h.ParsedHeaders,
        origin: Origin,
        prior: h.RetryState,
        attempt: int,
        failure: Failure,
        route: Route,
        now_ms: int,
    ) -> None:
        """Not for the handler (malformed headers, a poison event): to the DLQ, saying why."""
        headers = self._router.forward_headers(
            parsed.original, origin, prior, attempt, failure, route, now_ms
        )
        ticket = self._tracker.begin(tp, msg.offset())
        self._forward(msg.key(), msg.value(), ticket, headers, route, len(parsed.original))

    def _drain(self, msg: Any, tp: TopicPartitionKey, offset: int) -> None:
        """A drain worker's event, now due: forwarded unhandled and unchanged (every header,
        so it is still due at its original time) to where its stage's events go now."""
        assert self._forwarder is not None and self._drain_to is not None
        try:
            headers = list(msg.headers() or [])
        except Exception:  # undecodable header names; a tier's were dead-lettered before
            headers = []
        ticket = self._tracker.begin(tp, offset)
        route = Route(self._drain_to, self._policy.drain_outcome, None, None)
        self._forward(msg.key(), msg.value(), ticket, headers, route, len(headers))

    def _forward(
        self,
        key: bytes | None,
        value: bytes | None,
        ticket: Ticket,
        headers: h.HeaderList,
        route: Route,
        n_original: int,
    ) -> None:
        """Send; `n_original` headers come first, ours after them (`_on_forward_refused`)."""
        assert self._forwarder is not None
        if self._detours:
            detour = self._detours.pop((ticket.partition.tp, ticket.offset, route.topic), None)
            if detour is not None:  # refused there in an aborted transaction
                topic, headers, outcome = detour
                self._forwarder.send(topic, key, value, headers, (ticket, outcome, n_original))
                return
        token = (ticket, route.outcome, n_original)
        self._forwarder.send(route.topic, key, value, headers, token)

    def _on_forward_acked(self, token: tuple[Ticket, str, int]) -> None:
        """A forward is durable: its input event is finished, counted by outcome."""
        ticket, outcome, _ = token
        OffsetTracker.finish(ticket)
        self._acked[outcome] += 1
        self.stats.forwarded += 1

    def _on_forward_refused(
        self, token: tuple[Ticket, str, int], topic: str, headers: h.HeaderList, err: KafkaError
    ) -> Redirect | Refusal:
        """A forward its topic will not take: smaller, or to the DLQ (`Router.refused`); when
        the DLQ refuses it too, it stays stuck, loudly (not ready, metric, consumption
        stalled): the offset is never committed past it."""
        ticket, outcome, n_original = token
        if ticket.forgotten:
            return Refusal.DROP  # revoked: the partition's new owner handles the event again
        original, ours = headers[:n_original], headers[n_original:]
        where = self._router.refused(topic, ours, err.str(), too_large(err))
        if where is None:
            return Refusal.RETRY
        new_topic, new_ours, new_outcome = where
        log.warning("forward to %s refused (%s): sending it to %s", topic, err.str(), new_topic)
        return Redirect(
            new_topic, [*original, *new_ours], (ticket, new_outcome or outcome, n_original)
        )

    def _stall(self, consumer: Any, stuck: bool) -> None:
        """While a forward is stuck, take no new events (nothing after it could be committed
        anyway): pause every assigned partition; resume them once it is delivered."""
        if stuck and not self._parts.stalled:
            stalled = self._parts.stall(consumer)
            self._metrics.stuck.set(1)
            log.error("consumption stalled on %d partition(s): a forward is stuck", stalled)
        elif not stuck and self._parts.stalled:
            self._parts.unstall(consumer)
            self._metrics.stuck.set(0)
            log.info("the stuck forward was delivered: consuming again")

    def _count(self) -> None:
        """Add the batch's tallies to the outcome counters: one `inc` per outcome and batch
        rather than per event."""
        if self._succeeded:
            self._outcome[SUCCEEDED].inc(self._succeeded)
            self._succeeded = 0
        acked = self._acked
        for outcome, n in acked.items():
            if n:
                self._outcome[outcome].inc(n)
                acked[outcome] = 0

    # ------------------------------------------------------------------ offsets

    def _mark_head(self, tp: TopicPartitionKey, offset: int, starts: int) -> bool:
        """False: the event stopped `POISON_STARTS` runs already. Else mark it as handed over
        (poison.py), synchronously, so that the mark survives whatever the handler does."""
        if starts > POISON_STARTS:
            return False
        # Committing `offset` says that everything before it is finished: forwards included.
        # (Nothing is begun on a partition before its first mark: no wait then.)
        assert self._forwarder is not None
        if not self._tracker.settled(tp) and not (
            self._forwarder.drain(self._drain_s) and self._tracker.settled(tp)
        ):
            log.warning("%s[%d]@%d not marked: forwards unacknowledged", tp[0], tp[1], offset)
            return True
        if self._exactly_once:  # what is finished before it, committed first
            self._commit_transaction(self._consumer, mid_batch=True)
        metadata = topology_tag.with_tag(poison.mark(offset, starts), self._digest)
        mark = TopicPartition(tp[0], tp[1], offset, metadata=metadata)
        try:
            # A run's first mark is sent at once but not awaited (a commit waits out a
            # rebalance in progress: a second, measured); a careful one must be durable, and
            # so must every one beside transactions (a late mark would undo their offsets).
            careful = self._heads.careful(tp) or self._exactly_once
            self._consumer.commit(offsets=[mark], asynchronous=not careful)
        except KafkaException as e:
            log.warning("could not mark %s[%d]@%d: %s", tp[0], tp[1], offset, e)
        return True

    def _settle_heads(self) -> None:
        """The batch's heads are past their poison watch, unless calls on them are still in
        flight."""
        if self._in_flight is None or not self._in_flight.calls:
            self._heads.settled()

    def _store(self, consumer: Any) -> None:
        self._settle_heads()
        advanced = self._tracker.take_advanced()
        if not advanced:
            return
        offsets = [TopicPartition(t, p, o, metadata=self._tag) for t, p, o in advanced]
        try:
            consumer.store_offsets(offsets=offsets)
        except KafkaException as e:
            if _code(e) != KafkaError._STATE:
                raise
            # A partition was revoked after its acknowledgement arrived; store the others.
            for tp in offsets:
                try:
                    consumer.store_offsets(offsets=[tp])
                except KafkaException as e2:
                    if _code(e2) != KafkaError._STATE:
                        raise

    def _commit_due(self, consumer: Any) -> None:
        """Exactly-once: commit the transaction when the interval has passed (after a backoff
        that grows with aborts in a row)."""
        if time.monotonic() - self._txn_last >= self._txn_interval_s:
            self._commit_transaction(consumer)

    def _commit_transaction(self, consumer: Any, *, mid_batch: bool = False) -> None:
        """Exactly-once: the open transaction's forwards and the input offsets finished since
        the last commit, committed together. When that fails, nothing of it counts: every
        partition is read again from its committed offset. Mid-batch (before a poison mark)
        the rest of the batch would be handled twice, so the process stops for a restart."""
        assert self._forwarder is not None
        if not mid_batch:
            self._settle_heads()
        tracker = self._tracker

        def finished() -> list[TopicPartition]:
            tag = self._tag
            return [TopicPartition(t, p, o, metadata=tag) for t, p, o in tracker.take_advanced()]

        try:
            self._forwarder.commit(finished, consumer.consumer_group_metadata())
            if self._aborts >= STUCK_ABORTS:
                self._metrics.stuck.set(0)
                log.info("a transaction committed: no longer stuck")
            self._aborts = 0
        except TransactionAborted as e:
            self._take_detours()
            if mid_batch:
                raise FatalProducerError(f"transaction aborted mid-batch: {e}") from e
            self._aborts += 1
            if self._aborts == STUCK_ABORTS:
                self._metrics.stuck.set(1)
                log.error("%d transactions aborted in a row: stuck", self._aborts)
            log.warning("transaction aborted (%s): re-reading from the committed offsets", e)
            self._parts.rewind(consumer)
            # A forward its topic refuses would abort every retry: do not spin on it.
            self._stopping.wait(min(MAX_ABORT_BACKOFF_S, 0.1 * 2 ** min(self._aborts, 8)))
        finally:
            self._txn_last = time.monotonic()

    def _take_detours(self) -> None:
        """Forwards refused as too large in the aborted transaction: where each goes instead
        (`_on_forward_refused`, as without transactions) once its input is handled again."""
        assert self._forwarder is not None
        refused, self._forwarder.refused_in_transaction = self._forwarder.refused_in_transaction, []
        for token, topic, headers, err in refused:
            where = self._on_forward_refused(token, topic, headers, err)
            if isinstance(where, Redirect):
                ticket = token[0]
                key = (ticket.partition.tp, ticket.offset, topic)
                self._detours[key] = (where.topic, where.headers, where.token[1])

    def _commit(self, consumer: Any, tps: list[TopicPartitionKey]) -> None:
        tag = self._tag
        offsets = [
            TopicPartition(t, p, o, metadata=tag) for t, p, o in self._tracker.frontiers(tps)
        ]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            log.warning("commit of %d partition(s) failed: %s", len(offsets), e)

    # ------------------------------------------------------------------ rebalances

    def _announce(self, tps: list[TopicPartitionKey]) -> None:
        """Tag `tps`' committed offsets with the topology run (topology_tag.py): those just
        assigned, or all after a new topology. Exactly-once, only offsets committed in
        transactions count (the caller has just committed one), never a frontier."""
        frontiers = [] if self._exactly_once else self._tracker.frontiers(tps)
        try:
            topology_tag.announce(
                self._consumer, tps, self._digest,
                {(t, p): o for t, p, o in frontiers},
                from_earliest=self._consumer_config.get("auto.offset.reset") == "earliest",
                timeout=COMMITTED_TIMEOUT_S,
            )  # fmt: skip
        except KafkaException as e:  # the next commit of each partition tags it anyway
            log.warning("could not tag %d partition(s) with the topology run: %s", len(tps), e)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        try:
            self._parts.assign(consumer, partitions)
            self._announce([(p.topic, p.partition) for p in partitions])
            if partitions:
                self.stats.assigned += 1
            self._joined = True
            self._metrics.assigned.set(len(self._assigned))
        except Exception:
            log.exception("assignment of %s failed", partitions)
            raise

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            self._parts.leaving(tps)
            assert self._forwarder is not None
            # Finish what is in flight so the new owner does not repeat it.
            if self._in_flight is not None:
                self._in_flight.settle()
            self._forwarder.drain(self._drain_s)
            if self._exactly_once:
                self._commit_transaction(consumer)
            else:
                self._store(consumer)
                self._commit(consumer, tps)
        except Exception:
            log.exception("revocation of %s: could not drain and commit", tps)
        finally:
            self._release(tps)
            if tps:
                self.stats.revoked += 1

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.warning("partitions lost (no commit possible): %s", tps)
        try:
            self._parts.leaving(tps)
        except Exception:
            log.exception("resume of lost partitions failed")
        finally:
            self._release(tps)
            if tps:
                self.stats.lost += 1
        if self._exactly_once and self._forwarder is not None:
            # The open transaction holds forwards of the lost partitions, whose offsets can no
            # longer be committed: it must not commit. The others are read again.
            self._forwarder.abort()
            self._parts.rewind(consumer)

    def _release(self, tps: list[TopicPartitionKey]) -> None:
        self._parts.release(tps)
        self._metrics.assigned.set(len(self._assigned))

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self, consumer: Any, forwarder: Forwarder) -> None:
        """Drain forwards, store and commit what is finished, leave the group."""
        self._stopping.set()
        try:
            if self._in_flight is not None:
                self._in_flight.settle()
                self._in_flight.close()
            if not forwarder.drain(self._drain_s):
                log.warning("%d forward(s) unacknowledged at shutdown", forwarder.in_flight)
            if self._exactly_once:
                if forwarder.fatal is None:
                    self._commit_transaction(consumer)
            else:
                self._store(consumer)
                self._commit(consumer, sorted(self._assigned))
        except Exception:
            log.exception("drain at shutdown failed; uncommitted events will be re-read")
        finally:
            self._count()
            try:
                consumer.close()
            finally:
                self._running = False
                self._metrics.paused.set(0)
                self._metrics.assigned.set(0)


def _transactional_id(stage: Stage, consumer_config: Mapping[str, Any]) -> str:
    """Stable per worker: the stage's group and the pod name (`group.instance.id`), so a
    restarted pod fences and aborts what its predecessor left open. Without one (an SDK
    service without `instance_id`) a random one: zombies are still fenced by the group's
    generation, and a dead process's open transaction ends at `transaction.timeout.ms`."""
    instance = consumer_config.get("group.instance.id") or uuid.uuid4().hex
    return f"kafka-retry.{stage.consumer_group}.{instance}"


def _code(e: KafkaException) -> int | None:
    err = e.args[0] if e.args else None
    return err.code() if isinstance(err, KafkaError) else None
