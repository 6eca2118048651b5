"""The DLQReplay handler: the operator executes replays with the data plane's engine
(`kafka_retry.dlq_replay`), one per pipeline at a time, with progress and checkpoints in status.

Each active DLQReplay (not Succeeded, Failed or Cancelled) is a kopf daemon, started for it
wherever it is seen (at startup too) and stopped when it is deleted or the operator exits. The
daemon is async and waits without a thread; the replay itself, which blocks on Kafka, runs on
a thread of its own while the daemon renews the lease, so a long replay or a queue of waiting
ones never starves reconciles. Unexpected errors (the API server away) end the daemon with a
`TemporaryError`, and kopf runs it again after a back-off.

1. Terminal phases are left alone (the daemon's filter no longer matches them).
2. Validation: the pipeline must exist (`PipelineNotFound`) and parse (`InvalidPipeline`), the
   target tier must be one of its tiers (`UnknownTier`) whose topic is neither the source nor
   the DLQ topic (`InvalidTarget`), the filter's times RFC 3339 (`InvalidSpec`). -> Failed.
3. Its turn: Pending with reason `WaitingForReplay` while another replay of the pipeline runs
   or an older one waits (`replay_resource.blocker`), then the pipeline's replay lease
   (`kafka_retry.replay_lease`, on the RetryPipeline's status) is taken: it is what keeps two
   operators, or the operator and `kafka-retry dlq replay --direct`, from replaying at once.
4. Running: a snapshot of the DLQ's end offsets and a checkpoint go into status, updated about
   every second after the broker acknowledged everything sent. A restarted operator resumes
   from the checkpoint (the engine skips what it had already sent) once it holds the lease:
   at once after a clean stop, which releases it, or when it expires after a crash.
5. `spec.cancel: true` -> Cancelled with the counts so far; deleting the DLQReplay or stopping
   the operator only interrupts (what was replayed stays replayed; the next operator resumes
   a replay that still exists). Kafka errors are retried with back-off from the last
   checkpoint, `MAX_ATTEMPTS` times in a row, then Failed with reason `KafkaError`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Mapping
from typing import Any, NoReturn

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kafka_retry import replay_lease
from kafka_retry import replay_resource as rr
from kafka_retry.dlq import DlqError, EventFilter, KafkaAccess, TopicNotFound
from kafka_retry.dlq_replay import Checkpoint, InvalidTarget, Outcome, Replayer, ReplayResult
from kafka_retry.kafka_secret import SecretNotFound
from kafka_retry.model import GROUP, VERSION, DLQReplaySpec, DLQReplayStatus, RetryPipelineSpec
from kafka_retry.replay_lease import Lease, LeaseLost
from kafka_retry_operator import conditions as c
from kafka_retry_operator.kafka_admin import InvalidKafkaSettings
from kafka_retry_operator.runtime import Runtime, runtime_of

log = logging.getLogger(__name__)

CONDITION = "Succeeded"  # like a Job's: Unknown while pending or running
MAX_ATTEMPTS = 5
TURN_POLL_S = 2.0
STOP_TIMEOUT_S = 30.0  # a stopped replay writes its last checkpoint within this
# This process as a lease holder: a replay resumed by another process waits for the lease.
HOLDER = replay_lease.identity("operator")

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


class _Finished(Exception):
    """The replay reached a terminal phase (its status is written), or is gone."""


@kopf.on.event(GROUP, VERSION, rr.PLURAL)
def replay_phases(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every DLQReplay's phase, for the `kafka_retry_operator_replays` metric."""
    uid = str(body.get("metadata", {}).get("uid") or "")
    phase = (body.get("status") or {}).get("phase") or rr.PENDING
    runtime_of(memo).metrics.replay_phase(uid, None if event.get("type") == "DELETED" else phase)


def _active(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in rr.TERMINAL


@kopf.daemon(GROUP, VERSION, rr.PLURAL, when=_active, cancellation_timeout=STOP_TIMEOUT_S)
async def run_replay(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    retry: int,
    **_: Any,
) -> None:
    rt = runtime_of(memo)
    job = ReplayJob(rt, namespace or "", name, body, attempt=retry)
    try:
        replayer = await asyncio.to_thread(job.prepare)
        if await job.take_turn(stopped):
            await job.replay(replayer, stopped)
    except _Finished:
        return
    except LeaseLost as e:
        raise kopf.TemporaryError(f"{e}; waiting for it again", delay=TURN_POLL_S) from None
    except Exception as e:  # the API server away, ...: kopf runs the daemon again
        delay = rt.config.backoff(retry)
        log.warning("dlqreplay %s: %s; retrying in %.0fs", job.key, e, delay)
        raise kopf.TemporaryError(str(e), delay=delay) from e
    finally:
        await asyncio.to_thread(job.close)


class ReplayJob:
    """One DLQReplay, from validation to a terminal phase (or an interruption). The methods
    that block (API calls, Kafka) run off the event loop."""

    def __init__(
        self, rt: Runtime, namespace: str, name: str, body: kopf.Body, attempt: int = 0
    ) -> None:
        self.rt = rt
        self.attempt = attempt  # earlier runs of this daemon that failed
        self.namespace = namespace
        self.name = name
        self.key = f"{namespace}/{name}"
        self.body = body  # kopf's live view: spec.cancel is seen here
        self.stop = threading.Event()  # the replay thread's stop (deletion, exit, lease lost)
        self.custom: Any = client.CustomObjectsApi(rt.kube.core.api_client)
        self.latest: Mapping[str, Any] = dict(body)
        self.status = DLQReplayStatus.model_validate(dict(body.get("status") or {}))
        self.lease: Lease | None = None
        self._owner = f"dlqreplay:{self.key}"

    # ------------------------------------------------------------------ flow

    def prepare(self) -> Replayer:
        """The replay as it is now, validated; _Finished when it is done or invalid."""
        self._refresh()
        spec = self._spec()
        event_filter = self._filter(spec)
        pipeline_spec = self._pipeline(spec.pipeline)
        topology = pipeline_spec.topology(self.namespace, spec.pipeline)
        replayer = self._replayer(spec, topology, pipeline_spec, event_filter)
        self.lease = Lease(self.custom.api_client, self.namespace, spec.pipeline, self.name, HOLDER)
        return replayer

    async def take_turn(self, stopped: kopf.DaemonStopped) -> bool:
        """Wait until this replay holds its pipeline's lease; False if stopped meanwhile."""
        while not stopped:
            if await asyncio.to_thread(self._try_turn):
                return True
            await stopped.wait(TURN_POLL_S)
        return False

    async def replay(self, replayer: Replayer, stopped: kopf.DaemonStopped) -> None:
        """Run the replay on a thread of its own, renewing the lease meanwhile; a stop or a
        lost lease interrupts it (after its last checkpoint)."""
        assert self.lease is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()  # the thread's exception, or None

        def settle(error: BaseException | None) -> None:
            if not done.done():
                done.set_result(error)

        def work() -> None:
            error: BaseException | None = None
            try:
                self._replay(replayer)
            except BaseException as e:
                error = e
            loop.call_soon_threadsafe(settle, error)

        # In the daemon's context, so that kopf.event (the replay's end) works from the thread.
        context = contextvars.copy_context()
        threading.Thread(
            target=context.run, args=(work,), name=f"replay-{self.key}", daemon=True
        ).start()
        lost: LeaseLost | None = None
        try:
            while not done.done():
                tick: asyncio.Future[Any] = asyncio.ensure_future(
                    stopped.wait(replay_lease.RENEW_EVERY_S)
                )
                await asyncio.wait({done, tick}, return_when=asyncio.FIRST_COMPLETED)
                tick.cancel()
                if done.done():
                    break
                if stopped:
                    self.stop.set()
                    break
                try:
                    await asyncio.to_thread(self.lease.renew)
                except LeaseLost as e:
                    log.warning("dlqreplay %s: %s; interrupting", self.key, e)
                    lost = e
                    self.stop.set()
                    break
                except Exception as e:  # the API server away: renew at the next tick
                    log.warning("dlqreplay %s: lease not renewed: %s", self.key, e)
            error = await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stop.set()  # kopf gave up waiting: the thread still stops at its next event
            raise
        if error is not None:
            raise error
        if lost is not None:
            raise lost

    def close(self) -> None:
        """Give the lease back (a replay that resumes elsewhere need not wait for it to
        expire) and the Kafka client; the pipeline's DLQ depth may have changed."""
        try:
            if self.lease is not None:
                self.lease.release()
        except Exception as e:  # it expires on its own
            log.warning("dlqreplay %s: lease not released: %s", self.key, e)
        finally:
            self.rt.admins.release(self._owner)
            self.rt.sampler.wake()

    def _refresh(self) -> None:
        """The object as it is now; _Finished when terminal or gone."""
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, rr.PLURAL, self.name
            )
        except ApiException as e:
            if e.status == 404:
                raise _Finished() from None
            raise
        self.status = DLQReplayStatus.model_validate(obj.get("status") or {})
        if self.status.phase in rr.TERMINAL:
            raise _Finished()
        self.latest = obj

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

    def _try_turn(self) -> bool:
        """Take the lease if it is this replay's turn; otherwise say what it waits for."""
        assert self.lease is not None
        self._refresh()
        if self._cancel_requested() and self.status.phase == rr.PENDING:
            self._finish("Cancelled", CANCELLED, "cancelled before it started")
        if self.status.phase != rr.RUNNING:  # a Running one resumes: the turn is its own
            refs = rr.list_replays(self.custom.api_client, self.namespace, self.lease.pipeline)
            before = rr.blocker(self.name, refs)
            if before is not None:
                self._waiting(f"waiting for replay {before}")
                return False
        try:
            other = self.lease.acquire()
        except replay_lease.PipelineNotFound as e:
            self._finish("Failed", PIPELINE_NOT_FOUND, f"{e} not found")
        if other is None:
            # Read again now that the lease is ours: a holder writes its last checkpoint (or
            # its end) before it lets go, and the read above may predate both. Without this,
            # a second operator that saw Running took the released lease and replayed again
            # from a stale checkpoint, or a finished replay from a new snapshot.
            self._refresh()
            return True
        if other.replay == self.name:  # its previous process's lease: quiet until it expires
            log.info("dlqreplay %s: waiting for %s", self.key, replay_lease.describe(other))
        else:
            self._waiting(f"waiting for {replay_lease.describe(other)}")
        return False

    def _waiting(self, message: str) -> None:
        condition = c.Verdict(CONDITION, "Unknown", WAITING_FOR_REPLAY, message)
        if self.status.phase == rr.RUNNING:  # resuming: it stays Running, and says why
            self._patch(condition=condition)
        else:
            self._patch(phase=rr.PENDING, condition=condition)

    def _replay(self, replayer: Replayer) -> None:
        """From the checkpoint in status (or a new snapshot) to the end, a cancel or a stop.
        A Kafka error is raised after it is shown in status: kopf runs the daemon again from
        the last checkpoint, until `MAX_ATTEMPTS` such attempts fail -> Failed."""
        resuming = self.status.phase == rr.RUNNING
        checkpoint = Checkpoint.from_status(self.status) if resuming else None
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
            attempts = self.attempt + 1
            if attempts >= MAX_ATTEMPTS:
                reason = TOPIC_NOT_FOUND if isinstance(e, TopicNotFound) else KAFKA_ERROR
                self._finish("Failed", reason, f"{e} (after {attempts} attempts)")
            self._patch(condition=c.Verdict(CONDITION, "Unknown", KAFKA_ERROR, f"{e}; retrying"))
            raise
        self._done(result)

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
        body: Any = self.latest  # a plain dict: kopf needs only its identity fields
        kopf.event(
            body, type="Warning" if phase == "Failed" else "Normal", reason=reason,
            message=f"{phase}: {message}",
        )  # fmt: skip
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
            shown_total = checkpoint.total if total is None else total
            patch["progress"] = rr.progress(checkpoint.replayed, checkpoint.skipped, shown_total)
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
        spec: Mapping[str, Any] = self.body.get("spec") or {}
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
