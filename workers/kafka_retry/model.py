"""The RetryPipeline and DLQReplay API as pydantic models: the one source of truth.

The CRD schemas in `crds/` are generated from these models (`make crds`), the operator parses
every spec into them once at the edge, and the resolved `Topology` is what tier workers and the
live-lane SDK read from the pipeline's ConfigMap. Field names are camelCase on the wire
(Kubernetes convention) and snake_case in Python.

Rules that the API server must enforce at `kubectl apply` are written twice on purpose: as
pydantic validators (so the SDK and CLI reject the same specs offline) and as CEL rules in
`x-kubernetes-validations` (so `kubectl apply` rejects them with a message naming the field).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kafkaretry.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# Labels on every object a pipeline owns (workers, ConfigMap) and on its DLQReplays.
LABEL_PIPELINE = f"{GROUP}/pipeline"
LABEL_TIER = f"{GROUP}/tier"

# Kafka's own rule for topic names (kafka.common.internals.Topic).
TOPIC_PATTERN = r"^[a-zA-Z0-9._-]{1,249}$"
# Tier names become part of topic and Deployment names: a DNS-1123 label, kept short.
TIER_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"
# The managed live lane's stage name (its Deployment `<pipeline>-live-lane`, its `LABEL_TIER`):
# no tier of a pipeline with `spec.liveLane` may have it.
LIVE_LANE = "live-lane"
CALLABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
MAX_DELAY_SECONDS = 7 * 24 * 3600
# The longest a handler may take on one event. A consumer that does not poll for
# `max.poll.interval.ms` (300 s, librdkafka's default, which the workers keep) is evicted, and a
# batch is cut short at half of it (runner.py): a deadline must fit in that with room to spare.
MAX_HANDLER_TIMEOUT_SECONDS = 120
# Most concurrent http calls per partition (`handler.http.maxInFlight`): one thread and one
# keep-alive connection each.
MAX_IN_FLIGHT = 64
DEFAULT_PYTHON_TIMEOUT_SECONDS = 60
# How events move between the pipeline's topics (`spec.delivery`, docs/delivery.md).
Delivery = Literal["AtLeastOnce", "ExactlyOnce"]
AT_LEAST_ONCE: Delivery = "AtLeastOnce"
EXACTLY_ONCE: Delivery = "ExactlyOnce"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _not_dots(name: str) -> str:
    if name in (".", ".."):
        raise ValueError("a topic name cannot be '.' or '..'")
    return name


TopicName = Annotated[
    str,
    Field(
        pattern=TOPIC_PATTERN,
        min_length=1,
        max_length=249,
        json_schema_extra=cel_rules(
            cel("self != '.' && self != '..'", "a topic name cannot be '.' or '..'")
        ),
    ),
    AfterValidator(_not_dots),
]


class ApiModel(BaseModel):
    """camelCase on the wire, unknown fields rejected (a typo must not be silently ignored)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict, camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- spec


class SecretRef(ApiModel):
    """A Secret with the pipeline's Kafka client settings."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Name of a Secret in the pipeline's namespace. Its keys are librdkafka "
        "settings (e.g. `security.protocol`, `sasl.mechanism`, `sasl.username`, "
        "`sasl.password`, `ssl.ca.pem`) added to every Kafka client of this pipeline.",
    )


class KafkaConnection(ApiModel):
    """How the operator, the tier workers and the CLI reach the pipeline's Kafka cluster."""

    bootstrap_servers: str = Field(
        min_length=1,
        max_length=2048,
        description="Comma-separated host:port list of Kafka brokers.",
    )
    secret_ref: SecretRef | None = Field(
        default=None, description="Credentials and TLS settings; never copied into status."
    )


class Source(ApiModel):
    """The topic and consumer group whose failures this pipeline retries. Immutable."""

    # The retry and DLQ topics are named after the source, so a new source would strand the
    # events in the old ones; the API server refuses the change instead.
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self == oldSelf",
                "source is immutable: the retry and DLQ topics are named after it and events in "
                "them would be stranded; create another RetryPipeline for a new source",
            )
        )
    )

    topic: TopicName = Field(description="The live topic the service consumes.")
    consumer_group: str = Field(
        min_length=1,
        max_length=200,
        pattern=TOPIC_PATTERN,
        description="The service's consumer group on the source topic. Retry and DLQ topics "
        "are per group, so one failing service never touches another's retries.",
    )


class Tier(ApiModel):
    """A retry tier: a topic whose events are handled again once their delay has passed."""

    name: str = Field(
        pattern=TIER_NAME_PATTERN,
        max_length=32,  # implied by the pattern; stated so the API server can bound CEL costs
        description="Tier name, a DNS label of at most 32 characters (e.g. `retry-1`).",
    )
    delay_seconds: int = Field(
        ge=1,
        le=MAX_DELAY_SECONDS,
        description="How long after the failure an event on this tier becomes due.",
    )
    topic: TopicName | None = Field(
        default=None,
        description="Topic of this tier; default `<consumerGroup>.<sourceTopic>.<name>`.",
    )


class DeadLetterQueue(ApiModel):
    """The dead-letter topic: events that failed non-retriably or on the last tier wait there
    to be listed, purged or replayed."""

    topic: TopicName | None = Field(
        default=None, description="DLQ topic; default `<consumerGroup>.<sourceTopic>.dlq`."
    )
    retention_hours: int = Field(
        default=336, ge=1, le=87600, description="How long Kafka keeps DLQ events."
    )


class Topics(ApiModel):
    """Settings of the retry and DLQ topics the operator creates."""

    partitions: int = Field(
        default=6,
        ge=1,
        le=10000,
        description="Partitions of every retry and DLQ topic. Can grow, never shrink.",
    )
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        le=32,
        description="Replication factor of new topics; default: the broker's default.",
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="On pipeline deletion: `Retain` keeps retry and DLQ topics, `Delete` "
        "removes them. The source topic is never deleted.",
    )


class Classification(ApiModel):
    """Which failures are worth retrying. Names match an exception's class name or its
    fully qualified name, anywhere in its cause chain."""

    non_retriable: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=100,
        description="Exception names that go straight to the DLQ.",
    )
    retriable: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=100,
        description="Exception names that are retried (checked before `nonRetriable`).",
    )
    retriable_http_statuses: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list,
        max_length=100,
        description="HTTP statuses retried in addition to 408, 429 and 5xx.",
    )
    non_retriable_http_statuses: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list,
        max_length=100,
        description="HTTP statuses sent to the DLQ even though they are retriable by default.",
    )
    unknown_errors: Literal["Retriable", "NonRetriable"] = Field(
        default="Retriable", description="How an exception matching no rule is treated."
    )


class PythonHandler(ApiModel):
    """Tier workers run in the service's image and call a Python function per event."""

    image: str = Field(
        min_length=1,
        max_length=512,
        description="The service's image, which has this package and the handler installed.",
    )
    callable: str = Field(
        pattern=CALLABLE_PATTERN,
        description="Import path `module:function` of the handler; it gets one `Event`.",
    )
    timeout_seconds: int = Field(
        default=DEFAULT_PYTHON_TIMEOUT_SECONDS,
        ge=1,
        le=MAX_HANDLER_TIMEOUT_SECONDS,
        description="Deadline of one call. A tier worker whose handler overruns it stops (it "
        "cannot interrupt Python code) and restarts; an event that stops workers "
        "repeatedly goes to the DLQ with `dlq-reason: poison`.",
    )


class SecretKeyRef(ApiModel):
    """One key of a Secret in the pipeline's namespace."""

    name: str = Field(min_length=1, max_length=253, description="The Secret's name.")
    key: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="The key whose value is used.",
    )


class HttpHandler(ApiModel):
    """Tier workers POST each due event to the service: 2xx is success; 408, 429, 5xx,
    timeouts and connection errors are retriable; other statuses go to the DLQ, unless the
    answer's `X-Kafka-Retry-Error` header says `retriable` or `non-retriable`
    (docs/headers.md)."""

    url: str = Field(
        pattern=r"^https?://",
        max_length=2048,
        description="The service endpoint that events are POSTed to.",
    )
    timeout_seconds: int = Field(
        default=10,
        ge=1,
        le=MAX_HANDLER_TIMEOUT_SECONDS,
        description="A request slower than this is retriable. At most 120: a longer one "
        "would keep the worker from polling its group.",
    )
    secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="A shared secret the workers send as `Authorization: Bearer <secret>`, so "
        "that the service can refuse callers other than the pipeline's workers. Read by the "
        "worker pods from the Secret (the operator reads only its metadata; never logged nor "
        "in status); a changed Secret rolls them.",
    )
    max_in_flight: int = Field(
        default=1,
        ge=1,
        le=MAX_IN_FLIGHT,
        description="Most calls in flight at once per partition, on the tier workers and the "
        "managed live lane. 1 calls one event at a time, in order. More lets a slow endpoint "
        "serve a partition faster; offsets are still committed only up to the first event "
        "not finished (handled, or forwarded and acknowledged).",
    )
    ordering: Literal["None", "Key"] = Field(
        default="None",
        description="With `maxInFlight` above 1: `Key` never has two events of the same key in "
        "flight together (they are called in offset order); `None` calls any events "
        "together. Events without a key are never held back.",
    )


class Handler(ApiModel):
    """How the tier workers handle an event again: exactly one of `python` or `http`."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "has(self.python) != has(self.http)",
                "handler: set exactly one of `python` or `http`",
            )
        )
    )
    python: PythonHandler | None = Field(default=None, description="Run a Python callable.")
    http: HttpHandler | None = Field(default=None, description="POST each event to a service.")

    @property
    def timeout_seconds(self) -> int:
        """The deadline of one call of whichever handler this is."""
        spec = self.python or self.http
        assert spec is not None
        return spec.timeout_seconds

    @model_validator(mode="after")
    def _exactly_one(self) -> Handler:
        if (self.python is None) == (self.http is None):
            raise ValueError("handler: set exactly one of `python` or `http`")
        return self


class ResourceList(ApiModel):
    """CPU and memory quantities, as in a container's resources."""

    cpu: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?m?$",
        max_length=32,
        description="CPU, e.g. `100m` or `1`.",
    )
    memory: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        max_length=32,
        description="Memory, e.g. `256Mi`.",
    )


class Resources(ApiModel):
    """Requests and limits of each tier-worker container."""

    requests: ResourceList | None = Field(default=None, description="What the scheduler reserves.")
    limits: ResourceList | None = Field(default=None, description="What a worker may use at most.")


class Autoscaling(ApiModel):
    """Tier workers scaled on their consumer group's lag by KEDA (a ScaledObject per tier)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.minReplicas <= self.maxReplicas",
                "autoscaling: minReplicas must not exceed maxReplicas",
            )
        )
    )

    min_replicas: int = Field(
        default=1, ge=0, le=100, description="Fewest workers per tier (0: scale to zero)."
    )
    max_replicas: int = Field(ge=1, le=100, description="Most workers per tier.")
    lag_per_replica: int = Field(
        ge=1,
        le=10_000_000,
        description="Events waiting on the tier per worker (KEDA's lagThreshold). Events "
        "not yet due count too: allow for delay x arrival rate.",
    )


class Workers(ApiModel):
    """The tier workers: one Deployment per tier, run by the operator."""

    replicas: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Tier-worker pods per tier; ignored (KEDA owns it) with `autoscaling`.",
    )
    autoscaling: Autoscaling | None = Field(
        default=None,
        description="Scale each tier's workers on its lag with KEDA, when KEDA is installed "
        "(condition Autoscaling says whether it is).",
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Image for `http` handlers' tier workers; default: the operator's image.",
    )
    resources: Resources | None = Field(
        default=None, description="Requests and limits of each tier-worker container."
    )


class LiveLane(ApiModel):
    """The live lane run by the operator, for a service that does not embed the SDK: a
    Deployment `<pipeline>-live-lane` consumes `source.topic` as `source.consumerGroup`, calls
    the pipeline's handler on each event, and forwards failures to the first tier (or the DLQ)
    as the SDK does. Its pods follow `workers` (replicas, autoscaling on the source group's
    lag, resources) and `suspend` (events then wait on the source topic)."""


# CEL: a tier's and the DLQ's topic once defaults are resolved (as `topology()` resolves them).
_CEL_PREFIX = "self.source.consumerGroup + '.' + self.source.topic + '.'"
_CEL_TIER_TOPIC = "(has({t}.topic) ? {t}.topic : " + _CEL_PREFIX + " + {t}.name)"
_CEL_DLQ_TOPIC = (
    "(has(self.dlq) && has(self.dlq.topic) ? self.dlq.topic : " + _CEL_PREFIX + " + 'dlq')"
)


class RetryPipelineSpec(ApiModel):
    """What the pipeline should be: its Kafka cluster, source, tiers, DLQ, topics,
    classification of failures, handler and workers."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.tiers.all(t, self.tiers.exists_one(u, u.name == t.name))",
                "tiers: tier names must be unique",
                ".tiers",
            ),
            cel(
                "self.tiers.all(t, " + _CEL_TIER_TOPIC.format(t="t") + " != self.source.topic"
                " && " + _CEL_TIER_TOPIC.format(t="t") + " != " + _CEL_DLQ_TOPIC + " && "
                "self.tiers.exists_one(u, "
                + _CEL_TIER_TOPIC.format(t="u")
                + " == "
                + _CEL_TIER_TOPIC.format(t="t")
                + "))",
                "tiers: each tier's topic (default `<consumerGroup>.<sourceTopic>.<name>`) must "
                "differ from the source topic, the DLQ topic (default "
                "`<consumerGroup>.<sourceTopic>.dlq`) and the other tiers' topics",
                ".tiers",
            ),
            cel(
                "!has(self.dlq) || !has(self.dlq.topic) || (self.dlq.topic != self.source.topic"
                " && self.tiers.all(t, " + _CEL_TIER_TOPIC.format(t="t") + " != self.dlq.topic))",
                "dlq.topic: the DLQ topic must differ from the source topic and every tier's "
                "topic (default `<consumerGroup>.<sourceTopic>.<name>`)",
                ".dlq.topic",
            ),
            cel(
                f"!has(self.liveLane) || self.tiers.all(t, t.name != '{LIVE_LANE}')",
                f"tiers: no tier may be named `{LIVE_LANE}` with `liveLane`: the live lane's "
                "Deployment is `<pipeline>-live-lane`",
                ".tiers",
            ),
        )
    )

    kafka: KafkaConnection = Field(description=KafkaConnection.__doc__)
    source: Source = Field(description=Source.__doc__)
    tiers: list[Tier] = Field(
        min_length=1,
        max_length=10,
        description="Retry tiers in order; an event that fails on the last goes to the DLQ.",
    )
    dlq: DeadLetterQueue = Field(
        default_factory=DeadLetterQueue, description=DeadLetterQueue.__doc__
    )
    topics: Topics = Field(default_factory=Topics, description=Topics.__doc__)
    classification: Classification = Field(
        default_factory=Classification, description=Classification.__doc__
    )
    handler: Handler = Field(description=Handler.__doc__)
    workers: Workers = Field(default_factory=Workers, description=Workers.__doc__)
    live_lane: LiveLane | None = Field(
        default=None,
        description=(LiveLane.__doc__ or "")
        + " Without it, the service consumes its source topic itself with the SDK.",
    )
    suspend: bool = Field(
        default=False,
        description="Stop tier workers and the managed live lane (scale to 0). Events wait on "
        "their tier (or, with `liveLane`, the source topic); none reach the DLQ because of the "
        "suspension.",
    )
    delivery: Delivery = Field(
        default=AT_LEAST_ONCE,
        description="How a failed event moves to the next tier or the DLQ. `AtLeastOnce`: the "
        "forward is acknowledged, then its input offset committed; a worker killed between "
        "the two forwards the event again. `ExactlyOnce`: forwards and input offsets are "
        "committed in one Kafka transaction per batch, so each move lands once as every "
        "`read_committed` reader sees it. Handler side effects stay at-least-once either way.",
    )

    @model_validator(mode="after")
    def _unique_tiers(self) -> RetryPipelineSpec:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tiers: tier names must be unique (repeated: {', '.join(dupes)})")
        return self

    @model_validator(mode="after")
    def _live_lane_name_free(self) -> RetryPipelineSpec:
        if self.live_lane is not None and any(t.name == LIVE_LANE for t in self.tiers):
            raise ValueError(
                f"tiers: no tier may be named `{LIVE_LANE}` with `liveLane`: the live lane's "
                "Deployment is `<pipeline>-live-lane`"
            )
        return self

    @model_validator(mode="after")
    def _distinct_topics(self) -> RetryPipelineSpec:
        """The same rules as the CEL ones, on topic names once defaults are resolved: a stage
        sharing its topic with another (a tier named `dlq` is the DLQ topic) would loop
        events, retry them forever instead of dead-lettering them, or handle them twice."""
        seen = {self.source.topic: "source.topic"}
        for field, topic in self.resolved_topics():
            if topic in seen:
                raise ValueError(
                    f"{field}: resolves to topic {topic}, which is already {seen[topic]}'s; "
                    "the source, every tier and the DLQ need topics of their own"
                )
            seen[topic] = field
        return self

    def topic_prefix(self) -> str:
        """`<consumerGroup>.<sourceTopic>`: the stem of every default retry and DLQ name."""
        return f"{self.source.consumer_group}.{self.source.topic}"

    def resolved_topics(self) -> list[tuple[str, str]]:
        """(field, topic) of each tier and the DLQ, defaults resolved, in spec order."""
        prefix = self.topic_prefix()
        tiers = [
            (f"tiers[{i}].topic", t.topic or f"{prefix}.{t.name}") for i, t in enumerate(self.tiers)
        ]
        return [*tiers, ("dlq.topic", self.dlq.topic or f"{prefix}.dlq")]

    def topology(self, namespace: str, name: str) -> Topology:
        """Resolve topic names and rules: what every worker and the SDK act on."""
        prefix = self.topic_prefix()
        topics = [topic for _, topic in self.resolved_topics()]
        return Topology(
            pipeline=f"{namespace}/{name}",
            bootstrap_servers=self.kafka.bootstrap_servers,
            source_topic=self.source.topic,
            consumer_group=self.source.consumer_group,
            tiers=[
                ResolvedTier(
                    name=t.name,
                    topic=topics[i],
                    delay_seconds=t.delay_seconds,
                    consumer_group=f"{prefix}.{t.name}",
                )
                for i, t in enumerate(self.tiers)
            ],
            dlq_topic=topics[-1],
            classification=self.classification,
            handler=self.handler,
            suspend=self.suspend,
            delivery=self.delivery,
        )


# --------------------------------------------------------------------------- topology


class ResolvedTier(ApiModel):
    name: str
    topic: str
    delay_seconds: int
    consumer_group: str
    # Longer than the delay after the delay was shortened: events already waiting keep the due
    # time they were given (the bound on a due header's distance from its forward time).
    hold_limit_seconds: int | None = None

    def hold_limit_ms(self) -> int:
        return max(self.delay_seconds, self.hold_limit_seconds or 0) * 1000


class DrainingStage(ApiModel):
    """A tier or DLQ topic that a spec change left behind, emptied by a drain worker.

    A tier's events are held until their due time, as on the tier, then forwarded unchanged
    (key, value, every header: still due at their original time) to `to`, the tier now at its
    place in the list (or the last tier, if the list got shorter), which handles them at once.
    An old DLQ's waiting events (past its cursor) are forwarded at once to the new DLQ."""

    kind: Literal["tier", "dlq"]
    name: str = Field(description="The tier's name, or `dlq`.")
    topic: str
    consumer_group: str = Field(description="The tier's group, or the old DLQ's cursor group.")
    delay_seconds: int = Field(default=0, description="The tier's delay (0 for a DLQ).")
    index: int = Field(default=0, description="The tier's place in the list when removed.")
    to: str = Field(description="Where its events go now.")
    since: str = Field(description="When the drain began (RFC 3339).")

    def deployment_suffix(self) -> str:
        """Short and stable, so that one drain keeps one Deployment across reconciles."""
        return "drain-" + hashlib.sha256(self.topic.encode()).hexdigest()[:10]


class Topology(ApiModel):
    """What the operator publishes in the pipeline's ConfigMap; workers and the SDK read it."""

    pipeline: str
    bootstrap_servers: str
    source_topic: str
    consumer_group: str
    tiers: list[ResolvedTier]
    dlq_topic: str
    classification: Classification
    handler: Handler
    suspend: bool = False
    delivery: Delivery = AT_LEAST_ONCE
    draining: list[DrainingStage] = Field(default_factory=list)

    def draining_stage(self, topic: str) -> DrainingStage:
        for d in self.draining:
            if d.topic == topic:
                return d
        raise KeyError(f"pipeline {self.pipeline} drains no topic {topic!r}")

    def to_json(self) -> str:
        return json.dumps(self.wire(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls.model_validate_json(text)

    def tier(self, name: str) -> ResolvedTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"pipeline {self.pipeline} has no tier {name!r}")

    def next_topic(self, tier_index: int) -> tuple[str, bool]:
        """Where an event that failed retriably on tier `tier_index` goes (-1: the live lane).

        Returns (topic, is_dlq)."""
        if tier_index + 1 < len(self.tiers):
            return self.tiers[tier_index + 1].topic, False
        return self.dlq_topic, True


# --------------------------------------------------------------------------- status


class Condition(ApiModel):
    """An aspect of the object's state, as Kubernetes conditions are."""

    type: str = Field(description="What the condition is about, e.g. `Ready`.")
    status: Literal["True", "False", "Unknown"] = Field(description="`True`, `False`, `Unknown`.")
    reason: str = Field(description="Why, as one CamelCase word (documented reasons only).")
    message: str = Field(default="", description="Why, for people.")
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation the condition was set for."
    )


class TopicsStatus(ApiModel):
    """The topics of the pipeline, resolved from the spec."""

    source: str = Field(description="The source topic.")
    tiers: list[str] = Field(description="The tier topics, in tier order.")
    dlq: str = Field(description="The DLQ topic.")


class TierStatus(ApiModel):
    """One tier as measured."""

    name: str = Field(description="The tier's name.")
    topic: str = Field(description="The tier's topic.")
    lag: int | None = Field(
        default=None,
        description="Events on this tier's topic not yet committed by its workers (incl. "
        "those waiting for their delay).",
    )
    ready_replicas: int = Field(default=0, description="Ready tier-worker pods of this tier.")
    delay_seconds: int | None = None
    hold_limit_seconds: int | None = Field(
        default=None,
        description="How far ahead of its forward time an event may be due on this tier: its "
        "delay, or a longer one it had before (events waiting then keep their due time).",
    )


class LiveLaneStatus(ApiModel):
    """The managed live lane (`spec.liveLane`) as measured."""

    topic: str = Field(description="The source topic it consumes.")
    consumer_group: str = Field(description="The group it consumes as (`source.consumerGroup`).")
    lag: int | None = Field(
        default=None, description="Events on the source topic not yet committed by the group."
    )
    ready_replicas: int = Field(default=0, description="Ready live-lane pods.")


class DrainingStatus(ApiModel):
    kind: Literal["tier", "dlq"]
    name: str = Field(description="The removed tier's name, or `dlq`.")
    topic: str = Field(description="The topic being emptied.")
    to: str = Field(description="Where its events go: a tier's topic of the spec, or the DLQ.")
    lag: int | None = Field(default=None, description="Events still on `topic`.")
    since: str = Field(description="When the drain began (RFC 3339).")
    delay_seconds: int = Field(default=0, description="The removed tier's delay.")
    index: int = Field(default=0, description="The removed tier's place in the list.")


class DlqStatus(ApiModel):
    """The DLQ as measured."""

    depth: int = Field(
        default=0,
        description="Events still waiting in the DLQ: not yet replayed or purged (see "
        "kafka_retry.depth).",
    )
    oldest_timestamp: str | None = Field(
        default=None, description="When the oldest waiting event reached the DLQ (RFC 3339)."
    )
    last_updated: str | None = Field(
        default=None, description="When depth or oldestTimestamp last changed (RFC 3339)."
    )


class ReplayLease(ApiModel):
    """Who replays the pipeline's DLQ now: one replay at a time (kafka_retry.replay_lease)."""

    replay: str = Field(
        description="The DLQReplay holding it, or `direct:<id>` for `kafka-retry dlq replay "
        "--direct`."
    )
    holder: str = Field(description="The process replaying (operator or CLI, host and pid).")
    acquire_time: str = Field(description="When this holder took it (RFC 3339).")
    renew_time: str = Field(description="When this holder last renewed it (RFC 3339).")
    lease_duration_seconds: int = Field(
        ge=1, description="It expires this long after renewTime unless renewed."
    )


class RetryPipelineStatus(ApiModel):
    """What the operator observed: conditions (`Ready`, `TopicsReady`, `WorkersReady`), the
    topics, each tier's lag and ready workers, and the DLQ's depth."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(
        default=None, description="The spec generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="`Ready`, `TopicsReady`, `WorkersReady` and `Draining`, with reason and "
        "message.",
    )
    topics: TopicsStatus | None = Field(default=None, description=TopicsStatus.__doc__)
    tiers: list[TierStatus] = Field(
        default_factory=list, description="Per tier: lag and ready workers."
    )
    live_lane: LiveLaneStatus | None = Field(default=None, description=LiveLaneStatus.__doc__)
    dlq: DlqStatus | None = Field(default=None, description=DlqStatus.__doc__)
    draining: list[DrainingStatus] = Field(
        default_factory=list,
        description="Topics a spec change left behind, being emptied into the pipeline's "
        "current topics; each is dropped (and its drain worker removed) at lag 0.",
    )
    tier_count: int | None = Field(
        default=None, description="Number of retry tiers (for `kubectl get`)."
    )
    replay_lease: ReplayLease | None = Field(
        default=None,
        description="Held while a replay of the DLQ runs; written by replays, not by status.",
    )
    last_offset_refresh_time: str | None = Field(
        default=None,
        description="When the operator last committed the offsets of the pipeline's idle "
        "groups again (the DLQ cursor; tier groups while suspended), so that Kafka's "
        "offsets.retention.minutes never expires them (RFC 3339).",
    )


# --------------------------------------------------------------------------- DLQReplay


class ReplayFilter(ApiModel):
    """Which DLQ events to replay; every condition given must match. Empty: all of them."""

    since: str | None = Field(
        default=None,
        description="RFC 3339 time; only events that reached the DLQ at or after it.",
    )
    until: str | None = Field(
        default=None, description="RFC 3339 time; only events that reached the DLQ before it."
    )
    keys: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=1000, description="Only events with one of these keys."
    )
    error_classes: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list,
        max_length=100,
        description="Only events whose error class is one of these.",
    )


def _unchanged(field: str) -> str:
    """CEL: an optional field keeps its presence and value across an update."""
    return (
        f"has(self.{field}) == has(oldSelf.{field})"
        f" && (!has(self.{field}) || self.{field} == oldSelf.{field})"
    )


class DLQReplaySpec(ApiModel):
    """Which pipeline's DLQ to replay, into which tier, which events, how fast."""

    # A replay reads its spec once when it starts; only `cancel` may change afterwards.
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.pipeline == oldSelf.pipeline && "
                + " && ".join(
                    _unchanged(f) for f in ("targetTier", "filter", "maxMessagesPerSecond")
                ),
                "spec: only `cancel` can change after creation; create another DLQReplay",
            )
        )
    )

    pipeline: str = Field(
        min_length=1,
        max_length=253,
        description="Name of the RetryPipeline (same namespace) whose DLQ is replayed.",
    )
    target_tier: str | None = Field(
        default=None,
        pattern=TIER_NAME_PATTERN,
        description="Tier that replayed events go to; default: the first. Never the source topic.",
    )
    filter: ReplayFilter = Field(default_factory=ReplayFilter, description=ReplayFilter.__doc__)
    max_messages_per_second: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Rate limit: at most this many events in any 1-second window (sent in "
        "bursts of at most 1% of it). Default: unlimited.",
    )
    cancel: bool = Field(
        default=False,
        description="Set to true to stop a running replay; what was replayed stays replayed.",
        json_schema_extra=cel_rules(cel("self || !oldSelf", "cancel: cannot be undone")),
    )


class ReplayPartition(ApiModel):
    """One DLQ partition of a replay: its snapshot and its checkpoint (kafka_retry.dlq_replay)."""

    partition: int = Field(description="The DLQ partition.")
    start_offset: int = Field(description="First offset in scope: the DLQ head at the start.")
    end_offset: int = Field(description="The snapshot: the high watermark at the start.")
    next_offset: int = Field(description="Every offset below is replayed or skipped.")
    cursor_offset: int = Field(
        description="End of the contiguous replayed prefix: where the DLQ cursor moves."
    )
    replayed_past_cursor: int = Field(
        default=0,
        description="Events replayed after the first skipped one: still counted in DLQ depth.",
    )


class PartitionOffset(ApiModel):
    """An offset of one partition."""

    partition: int = Field(description="The partition.")
    offset: int = Field(description="The offset.")


class DLQReplayStatus(ApiModel):
    """The replay's phase, counts and checkpoint (a restarted operator resumes from it)."""

    model_config = ConfigDict(extra="ignore")

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Cancelled"] = Field(
        default="Pending", description="Pending, Running, then Succeeded, Failed or Cancelled."
    )
    replay_id: str | None = Field(
        default=None, description="The `replay-id` header of the events this replay sent."
    )
    total: int = Field(
        default=0,
        description="Events in the snapshot: its offsets while running (an upper bound), the "
        "events examined once it has ended.",
    )
    replayed: int = Field(default=0, description="Events sent to the target tier.")
    skipped: int = Field(default=0, description="Events the filter did not match (left waiting).")
    progress: str | None = Field(
        default=None, description="`<replayed> replayed, <skipped> skipped of <total>`."
    )
    start_time: str | None = Field(default=None, description="When it started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When it ended (RFC 3339).")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="`Succeeded`: `Unknown` while pending or running, then `True` or `False`.",
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation this status describes."
    )
    # The replay's snapshot and checkpoint, so a restarted operator resumes (dlq_replay.py).
    target_topic: str | None = Field(default=None, description="The target tier's topic.")
    partitions: list[ReplayPartition] = Field(
        default_factory=list, description="Per DLQ partition: snapshot and checkpoint."
    )
    target_scan_from: list[PartitionOffset] = Field(
        default_factory=list,
        description="Per target partition: where a resumed replay looks for events it already "
        "sent after its last checkpoint.",
    )
