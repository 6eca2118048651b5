"""kafka_retry_operator: the kopf control plane turning RetryPipelines into topics and workers."""

__version__ = "0.1.0"
