"""The DLQReplay handler: the operator executes replays with the data plane's engine
(`kafka_retry.dlq_replay`), one per pipeline at a time, with progress and checkpoints in status.

Each active DLQReplay gets a thread of its own (not kopf's handler pool, so a long replay or a
queue of waiting ones never starves reconciles), started and fed by a kopf event handler. No
finalizer: deleting a DLQReplay never waits for the operator (what was replayed stays
replayed), and a replay deleted mid-run just stops.

1. Terminal phases (Succeeded, Failed, Cancelled) are left alone.
2. Validation: the pipeline must exist (`PipelineNotFound`) and parse (`InvalidPipeline`), the
   target tier must be one of its tiers (`UnknownTier`) whose topic is neither the source nor
   the DLQ topic (`InvalidTarget`), the filter's times RFC 3339 (`InvalidSpec`). -> Failed.
3. Its turn (`replay_resource.blocker`): Pending with reason `WaitingForReplay` while another
   replay of the pipeline runs or an older one waits.
4. Running: a snapshot of the DLQ's end offsets and a checkpoint go into status, updated about
   every second after the broker acknowledged everything sent. A restarted operator resumes
   from the checkpoint (the engine skips what it had already sent).
5. `spec.cancel: true` -> Cancelled with the counts so far; stopping the operator only
   interrupts (the next one resumes). Kafka errors are retried with back-off from the last
   checkpoint, `MAX_ATTEMPTS` times, then Failed with reason `KafkaError`.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping
from typing import Any, NoReturn

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kafka_retry import replay_resource as rr
from kafka_retry.dlq import DlqError, EventFilter, KafkaAccess, TopicNotFound
from kafka_retry.dlq_replay import Checkpoint, InvalidTarget, Outcome, Replayer, ReplayResult
from kafka_retry.kafka_secret import SecretNotFound
from kafka_retry.model import GROUP, VERSION, DLQReplaySpec, DLQReplayStatus, RetryPipelineSpec
from kafka_retry_operator import conditions as c
from kafka_retry_operator.kafka_admin import InvalidKafkaSettings
from kafka_retry_operator.runtime import Runtime, runtime_of

log = logging.getLogger(__name__)

CONDITION = "Succeeded"  # like a Job's: Unknown while pending or running
MAX_ATTEMPTS = 5
TURN_POLL_S = 2.0

# Reasons (status.conditions[0].reason), documented in docs/dlq.md.
WAITING_FOR_REPLAY = "WaitingForReplay"
REPLAYING = "Replaying"
REPLAYED = "Replayed"
CANCELLED = "Cancelled"
PIPELINE_NOT_FOUND = "PipelineNotFound"
INVALID_PIPELINE = "InvalidPipeline"
UNKNOWN_TIER = "UnknownTier"
INVALID_TARGET = "InvalidTarget"
INVALID_SPEC = "InvalidSpec"
KAFKA_ERROR = "KafkaError"
TOPIC_NOT_FOUND = "TopicNotFound"
KAFKA_SECRET_NOT_FOUND = "KafkaSecretNotFound"

_turns_lock = threading.Lock()
_claimed: dict[tuple[str, str], str] = {}  # (namespace, pipeline) -> the replay running it


class _Finished(Exception):
    """The replay reached a terminal phase; its status is written."""


@kopf.on.event(GROUP, VERSION, rr.PLURAL)
def replay_events(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every DLQReplay event (and each object at startup) lands here; cheap bookkeeping."""
    _jobs.observe(runtime_of(memo), event.get("type"), body)


@kopf.on.cleanup()
def stop_replays(**_: Any) -> None:
    """Running replays write a last checkpoint; the next operator resumes them."""
    _jobs.stop_all(timeout=30)


class _Jobs:
    """The replay threads of this process, by object uid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, ReplayJob] = {}
        self._finished: set[str] = set()  # stale events must not restart these

    def observe(self, rt: Runtime, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        phase = (body.get("status") or {}).get("phase")
        rt.metrics.replay_phase(uid, None if event_type == "DELETED" else phase or rr.PENDING)
        with self._lock:
            job = self._jobs.get(uid)
            if event_type == "DELETED":
                self._finished.discard(uid)
                if job is not None:
                    job.stop.set()  # what was replayed stays replayed
                return
            if job is not None:
                job.latest = copy.deepcopy(dict(body))  # spec.cancel is seen from here
                return
            if uid in self._finished or phase in rr.TERMINAL:
                return
            job = ReplayJob(rt, str(meta.get("namespace") or ""), str(meta.get("name")), body)
            self._jobs[uid] = job
        thread = threading.Thread(target=self._run, args=(uid, job), name=f"replay-{job.key}")
        thread.daemon = True  # `stop_replays` lets it write its last checkpoint first
        thread.start()

    def _run(self, uid: str, job: ReplayJob) -> None:
        try:
            finished = job.run()
        finally:
            with self._lock:
                self._jobs.pop(uid, None)
                if finished:
                    self._finished.add(uid)

    def stop_all(self, timeout: float) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop.set()
        for job in jobs:
            job.done.wait(timeout)


_jobs = _Jobs()


class ReplayJob:
    """One DLQReplay, from validation to a terminal phase (or an interruption), on its own
    thread. Unexpected errors (the API server away) are retried with back-off."""

    def __init__(self, rt: Runtime, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        self.rt = rt
        self.namespace = namespace
        self.name = name
        self.key = f"{namespace}/{name}"
        self.latest = copy.deepcopy(dict(body))
        self.stop = threading.Event()
        self.done = threading.Event()
        self.custom: Any = client.CustomObjectsApi(rt.kube.core.api_client)
        self.status = DLQReplayStatus.model_validate(dict(body.get("status") or {}))
        self._owner = f"dlqreplay:{self.key}"

    # ------------------------------------------------------------------ flow

    def run(self) -> bool:
        """True once a terminal phase is written; False when stopped (or deleted)."""
        failures = 0
        try:
            while not self.stop.is_set():
                try:
                    self._refresh()
                    self._run()
                    return False  # stopped
                except _Finished:
                    return True
                except Exception as e:
                    delay = self.rt.config.backoff(failures)
                    failures += 1
                    log.warning("dlqreplay %s: %s; retrying in %.0fs", self.key, e, delay)
                    self.stop.wait(delay)
            return False
        finally:
            self.rt.admins.release(self._owner)
            self.done.set()

    def _refresh(self) -> None:
        """The object as it is now (an event may be stale); gone means stop."""
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, rr.PLURAL, self.name
            )
        except ApiException as e:
            if e.status == 404:
                self.stop.set()
                return
            raise
        self.latest = obj
        self.status = DLQReplayStatus.model_validate(obj.get("status") or {})
        if self.status.phase in rr.TERMINAL:
            raise _Finished()

    def _run(self) -> None:
        if self.stop.is_set():
            return
        spec = self._spec()
        event_filter = self._filter(spec)
        pipeline_spec = self._pipeline(spec.pipeline)
        topology = pipeline_spec.topology(self.namespace, spec.pipeline)
        replayer = self._replayer(spec, topology, pipeline_spec, event_filter)
        key = (self.namespace, spec.pipeline)
        if not self._take_turn(key):
            return
        try:
            self._replay(replayer, spec)
        finally:
            with _turns_lock:
                if _claimed.get(key) == self.name:
                    del _claimed[key]
            self.rt.sampler.wake()  # the pipeline's DLQ depth changed

    def _spec(self) -> DLQReplaySpec:
        try:
            return DLQReplaySpec.model_validate(self.latest.get("spec") or {})
        except ValidationError as e:
            self._finish("Failed", INVALID_SPEC, _summary(e))

    def _filter(self, spec: DLQReplaySpec) -> EventFilter:
        for label, value in (("since", spec.filter.since), ("until", spec.filter.until)):
            if value is not None and not _is_rfc3339(value):
                self._finish(
                    "Failed", INVALID_SPEC, f"spec.filter.{label}: not an RFC 3339 time: {value!r}"
                )
        return EventFilter.from_spec(spec.filter)

    def _pipeline(self, name: str) -> RetryPipelineSpec:
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, rr.PIPELINE_PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                self._finish(
                    "Failed", PIPELINE_NOT_FOUND, f"RetryPipeline {self.namespace}/{name} not found"
                )
            raise
        try:
            return RetryPipelineSpec.model_validate(obj.get("spec") or {})
        except ValidationError as e:
            self._finish("Failed", INVALID_PIPELINE, f"RetryPipeline {name}: {_summary(e)}")

    def _replayer(
        self,
        spec: DLQReplaySpec,
        topology: Any,
        pipeline_spec: RetryPipelineSpec,
        event_filter: EventFilter,
    ) -> Replayer:
        replay_id = self.status.replay_id or _replay_id(self.name, self.latest)
        try:
            replayer = Replayer(
                topology,
                self._access(pipeline_spec),
                replay_id=replay_id,
                target_tier=spec.target_tier,
                event_filter=event_filter,
                rate=spec.max_messages_per_second,
            )
        except InvalidTarget as e:
            known = spec.target_tier is None or any(
                t.name == spec.target_tier for t in topology.tiers
            )
            self._finish("Failed", INVALID_TARGET if known else UNKNOWN_TIER, str(e))
        return replayer

    def _access(self, spec: RetryPipelineSpec) -> KafkaAccess:
        settings: dict[str, str] = {}
        if spec.kafka.secret_ref is not None:
            try:
                settings = self.rt.kube.secret_settings(self.namespace, spec.kafka.secret_ref.name)
            except SecretNotFound as e:
                self._finish("Failed", KAFKA_SECRET_NOT_FOUND, str(e))
        try:
            cluster = self.rt.admins.bind(self._owner, spec.kafka.bootstrap_servers, settings)
        except InvalidKafkaSettings as e:
            self._finish("Failed", KAFKA_ERROR, str(e))
        return KafkaAccess(
            spec.kafka.bootstrap_servers,
            self.rt.admins.client_config(cluster),
            admin=self.rt.admins.admin(cluster),
            timeout=self.rt.config.kafka_timeout,
        )

    def _take_turn(self, key: tuple[str, str]) -> bool:
        """Wait until this replay may run; False if stopped meanwhile."""
        while not self.stop.is_set():
            if self._cancel_requested() and self.status.phase == rr.PENDING:
                self._finish("Cancelled", CANCELLED, "cancelled before it started")
            with _turns_lock:
                holder = _claimed.get(key)
                if holder is None or holder == self.name:
                    if self.status.phase == rr.RUNNING:  # resuming: the turn is ours
                        waiting_for = None
                    else:
                        refs = rr.list_replays(self.custom.api_client, *key)
                        waiting_for = rr.blocker(self.name, refs)
                    if waiting_for is None:
                        _claimed[key] = self.name
                        return True
                else:
                    waiting_for = holder
            self._patch(
                phase=rr.PENDING,
                condition=c.Verdict(
                    CONDITION, "Unknown", WAITING_FOR_REPLAY, f"waiting for replay {waiting_for}"
                ),
            )
            self.stop.wait(TURN_POLL_S)
        return False

    def _replay(self, replayer: Replayer, spec: DLQReplaySpec) -> None:
        checkpoint = Checkpoint.from_status(self.status) if self.status.phase == "Running" else None
        attempt = 0
        while True:
            try:
                if checkpoint is None:
                    checkpoint = replayer.snapshot()
                    self._running(replayer, checkpoint, "replay started")
                else:
                    self._running(replayer, checkpoint, "replaying from the last checkpoint")
                result = replayer.run(
                    checkpoint,
                    on_checkpoint=self._checkpointed,
                    should_cancel=self._cancel_requested,
                    should_stop=self.stop.is_set,
                )
            except DlqError as e:
                attempt += 1
                checkpoint = Checkpoint.from_status(self.status) or checkpoint
                if attempt >= MAX_ATTEMPTS:
                    reason = TOPIC_NOT_FOUND if isinstance(e, TopicNotFound) else KAFKA_ERROR
                    self._finish("Failed", reason, f"{e} (after {attempt} attempts)")
                delay = self.rt.config.backoff(attempt - 1)
                log.warning("dlqreplay %s interrupted, retrying in %.0fs: %s", self.key, delay, e)
                self._patch(
                    condition=c.Verdict(CONDITION, "Unknown", KAFKA_ERROR, f"{e}; retrying")
                )
                if self.stop.wait(delay):
                    return
                continue
            self._done(result)
            return

    # ------------------------------------------------------------------ status

    def _running(self, replayer: Replayer, cp: Checkpoint, message: str) -> None:
        """Recorded before anything is sent: a resume needs the snapshot's scan offsets."""
        self._patch(
            required=True,
            phase=rr.RUNNING,
            replay_id=replayer.replay_id,
            start_time=self.status.start_time or c.now(),
            checkpoint=cp,
            condition=c.Verdict(
                CONDITION, "Unknown", REPLAYING,
                f"{message}: {replayer.topology.dlq_topic} -> {replayer.target.topic}",
            ),
        )  # fmt: skip

    def _checkpointed(self, cp: Checkpoint) -> None:
        self._patch(checkpoint=cp)

    def _done(self, result: ReplayResult) -> None:
        cp = result.checkpoint
        if result.outcome is Outcome.INTERRUPTED:
            self._patch(checkpoint=cp)  # resumes when the operator runs it again
            return
        counts = f"{cp.replayed} replayed, {cp.skipped} skipped"
        if cp.past_cursor:
            counts += (
                f"; {cp.past_cursor} replayed event(s) behind skipped ones stay counted in "
                "the DLQ depth (see docs/dlq.md)"
            )
        if result.outcome is Outcome.SUCCEEDED:
            # The snapshot's offsets are an upper bound; what was examined is the true total.
            self._finish("Succeeded", REPLAYED, counts, checkpoint=cp, total=cp.examined)
        self._finish("Cancelled", CANCELLED, f"cancelled: {counts}", checkpoint=cp)

    def _finish(
        self,
        phase: str,
        reason: str,
        message: str,
        *,
        checkpoint: Checkpoint | None = None,
        total: int | None = None,
    ) -> NoReturn:
        """Write a terminal phase and end the job."""
        level = logging.WARNING if phase == "Failed" else logging.INFO
        log.log(level, "dlqreplay %s %s: %s: %s", self.key, phase, reason, message)
        status: c.Status = "True" if phase == "Succeeded" else "False"
        self._patch(
            phase=phase,
            checkpoint=checkpoint,
            total=total,
            completion_time=c.now(),
            condition=c.Verdict(CONDITION, status, reason, message),
        )
        raise _Finished()

    def _patch(
        self,
        *,
        phase: str | None = None,
        replay_id: str | None = None,
        start_time: str | None = None,
        completion_time: str | None = None,
        checkpoint: Checkpoint | None = None,
        total: int | None = None,
        condition: c.Verdict | None = None,
        required: bool = False,
    ) -> None:
        """Merge-patch status. Errors are logged (the next write repeats the state), or
        raised when `required`."""
        patch: dict[str, Any] = {}
        if phase is not None:
            patch["phase"] = phase
        if replay_id is not None:
            patch["replayId"] = replay_id
        if start_time is not None:
            patch["startTime"] = start_time
        if completion_time is not None:
            patch["completionTime"] = completion_time
        if checkpoint is not None:
            patch.update(checkpoint.to_status())
            done = checkpoint.examined
            shown_total = checkpoint.total if total is None else total
            patch["progress"] = f"{done}/{shown_total}"
        if total is not None:
            patch["total"] = total
        if condition is not None:
            previous = [x.wire() for x in self.status.conditions]
            generation = self.latest.get("metadata", {}).get("generation")
            stamped = c.stamp([condition], previous, generation)
            patch["conditions"] = [x.wire() for x in stamped]
            patch["observedGeneration"] = generation
        merged = {**self.status.wire(), **patch}
        if merged == self.status.wire():
            return
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, rr.PLURAL, self.name, {"status": patch}
            )
        except ApiException as e:
            if e.status == 404:
                self.stop.set()  # deleted
            if required:
                raise
            log.warning("status of dlqreplay %s not written: %s", self.key, e.reason)
            return
        self.status = DLQReplayStatus.model_validate(merged)

    def _cancel_requested(self) -> bool:
        spec: Mapping[str, Any] = self.latest.get("spec") or {}
        return bool(spec.get("cancel"))


def _replay_id(name: str, body: Mapping[str, Any]) -> str:
    """Unique per DLQReplay object (its uid), readable by its name."""
    uid = str(body.get("metadata", {}).get("uid") or "")
    return f"{name[:200]}-{uid[:8]}" if uid else name[:200]


def _is_rfc3339(text: str) -> bool:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def _summary(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()[:5]
    )
