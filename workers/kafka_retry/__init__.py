"""kafka_retry: the data plane of kafka-retry-operator (retry tiers, DLQ, live-lane SDK, CLI)."""

__version__ = "0.1.0"
