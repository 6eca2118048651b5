"""librdkafka settings for the data plane's clients.

Extra settings (credentials, TLS) come from the pipeline's Secret as `KAFKA_CLIENT_<setting>`
environment variables; they are added to every client and never logged (`describe` shows only
their names). Settings that the delivery guarantee depends on are forced after them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

CLIENT_ENV_PREFIX = "KAFKA_CLIENT_"

# Consumers of retry tiers pause often; every pause or seek drops the prefetched messages, so
# keep prefetch small and refill it quickly.
TIER_PREFETCH_KBYTES = "4096"
TIER_FETCH_QUEUE_BACKOFF_MS = "50"
# librdkafka acts on a resume at its fetcher's next turn, after an outstanding long-poll fetch
# returns: keep that wait short (default 500 ms) so that a resumed partition is fetched soon.
TIER_FETCH_WAIT_MAX_MS = "100"
# A tier's events are not due for a delay after they arrive, so there is no hurry to fetch
# each as it comes: the broker answers a fetch once this much has gathered (or after
# fetch.wait.max.ms), rather than one response, and one loop turn, per event under a stream.
TIER_FETCH_MIN_BYTES = "65536"

# How long the group waits for a silent member before handing its partitions to others.
# librdkafka's default (45 s) stalls a killed worker's partitions for that long. A restarted
# worker with static membership (`group.instance.id`) takes its partitions back at once
# without a rebalance; a member that is gone for good (a pod deleted, a rolling update: static
# members do not leave the group on close) holds them up for this long at most.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 1_000  # how soon the other members hear of a rebalance

_KIP848_BROKER_SIDE = ("session.timeout.ms", "heartbeat.interval.ms")

_CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",  # a new group must not skip events waiting in a topic
    "session.timeout.ms": SESSION_TIMEOUT_MS,
    "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
    "enable.auto.commit": True,  # commits what we store, nothing else
    "auto.commit.interval.ms": 1000,
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.partition.eof": False,
}
# At-least-once: offsets are stored by us, only for events whose outcome is durable. Every
# consumer of our topics reads committed records only: an exactly-once pipeline's aborted
# forwards (a killed worker's) are never seen (librdkafka's default, held whatever the Secret says).
_CONSUMER_FORCED: dict[str, Any] = {
    "enable.auto.offset.store": False,
    "isolation.level": "read_committed",
}

# Exactly-once (`spec.delivery: ExactlyOnce`): a transaction left open by a worker that is gone
# for good (a deleted pod: no successor with its transactional id aborts it at start) holds up
# every read_committed reader of the topics it wrote to until the coordinator aborts it. Kept
# as short as the group's session timeout: a batch's transaction lasts well under a second.
TRANSACTION_TIMEOUT_MS = 10_000

# The topics decide what fits (the operator sizes tier and DLQ topics for the source's largest
# event plus our headers); librdkafka's own default (1,000,000 bytes) is below the broker's and
# would refuse a forward of an event the source accepted. This is the broker's default
# `socket.request.max.bytes`: no request can be larger anyway.
PRODUCER_MESSAGE_MAX_BYTES = 100_000_000

_PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,
    "message.max.bytes": PRODUCER_MESSAGE_MAX_BYTES,
}
# Never auto-create a topic (librdkafka's producers ask for it by default, and brokers allow
# it by default): a forward to a deleted or mistyped topic fails and is retried, its input
# offset unstored, rather than creating a topic with the broker's defaults that nobody reads.
_PRODUCER_FORCED: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "allow.auto.create.topics": False,
}


def client_settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`KAFKA_CLIENT_sasl.password=x` → `{"sasl.password": "x"}`. An all-caps name with
    underscores (`KAFKA_CLIENT_SASL_PASSWORD`) is read as the dotted lower-case setting."""
    env = os.environ if environ is None else environ
    settings: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(CLIENT_ENV_PREFIX) or len(name) == len(CLIENT_ENV_PREFIX):
            continue
        key = name[len(CLIENT_ENV_PREFIX) :]
        if "." not in key and key.isupper():
            key = key.lower().replace("_", ".")
        settings[key] = value
    return settings


def consumer_config(
    bootstrap_servers: str,
    group_id: str,
    extra: Mapping[str, Any] | None = None,
    *,
    pauses_often: bool = False,
    instance_id: str | None = None,
) -> dict[str, Any]:
    """`instance_id`: static group membership (`group.instance.id`), e.g. the pod name; a
    restart under the same id gets its partitions back without a rebalance. At most one
    running consumer of the group may use an id (a second one is fenced)."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, **_CONSUMER_DEFAULTS}
    if instance_id:
        config["group.instance.id"] = instance_id
    if pauses_often:
        config["queued.max.messages.kbytes"] = TIER_PREFETCH_KBYTES
        config["fetch.queue.backoff.ms"] = TIER_FETCH_QUEUE_BACKOFF_MS
        config["fetch.wait.max.ms"] = TIER_FETCH_WAIT_MAX_MS
        config["fetch.min.bytes"] = TIER_FETCH_MIN_BYTES
    config.update(extra or {})
    # KIP-848: the broker assigns partitions, unless the settings name an assignor.
    kip848 = str(config.get("group.protocol", "classic")).lower() == "consumer"
    # ... and sets the session timeout and heartbeat interval (a client may not).
    if kip848:
        for key in ("partition.assignment.strategy", *_KIP848_BROKER_SIDE):
            if key not in (extra or {}):
                config.pop(key, None)
    config["group.id"] = group_id
    config.update(_CONSUMER_FORCED)
    return config


def producer_config(
    bootstrap_servers: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, **_PRODUCER_DEFAULTS}
    for key, value in (extra or {}).items():
        if not key.startswith(_CONSUMER_ONLY_PREFIXES):
            config[key] = value
    config.update(_PRODUCER_FORCED)
    return config


def exactly_once(
    consumer: Mapping[str, Any], producer: Mapping[str, Any], transactional_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The consumer and producer settings of a transactional stage (KIP-447): offsets are
    committed only inside the producer's transactions (no auto commit), and the producer's
    `transactional.id` is stable per worker, so a restarted worker fences its predecessor and
    aborts what it left open. A zombie with a stale group generation is fenced by the group
    metadata sent with its offsets, whatever its id."""
    c = {**consumer, "enable.auto.commit": False}
    p = {
        **producer,
        "transactional.id": transactional_id,
        "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
    }
    return c, p


# Consumer settings that a shared extra-settings map may hold and a producer rejects or warns on.
_CONSUMER_ONLY_PREFIXES = (
    "group.",
    "auto.offset.reset",
    "enable.auto.",
    "auto.commit.",
    "session.timeout.ms",
    "max.poll.interval.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "queued.",
    "fetch.",
    "isolation.level",
    "enable.partition.eof",
)


def incremental_rebalance(config: Mapping[str, Any]) -> bool:
    """Whether assignments arrive as increments (cooperative-sticky or KIP-848)."""
    if str(config.get("group.protocol", "classic")).lower() == "consumer":
        return True
    return "cooperative" in str(config.get("partition.assignment.strategy", ""))


def describe(config: Mapping[str, Any], secret_keys: set[str] | frozenset[str]) -> str:
    """A loggable summary: values of `secret_keys` (everything from the Secret) hidden."""
    parts = []
    for key in sorted(config):
        shown = "<set>" if key in secret_keys else config[key]
        parts.append(f"{key}={shown}")
    return " ".join(parts)
