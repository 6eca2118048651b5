"""The order service: `python -m order_service --pipeline order-service --namespace shop`.

It consumes the pipeline's source topic (`orders`) with the live-lane SDK. The SDK reads the
topology (topics, delays, classification) from the ConfigMap the operator publishes; a failed
order is forwarded to the first retry tier or the DLQ and the consumer moves on at once, so a
slow or broken payments upstream never holds up the orders behind it. With `--endpoint`, it
also serves its tier workers (the pipeline's `handler.http`): they POST each failed order to
`http://<endpoint>/orders` once its tier's delay has passed (order_service/endpoint.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence

from kafka_retry.metrics import HealthServer
from kafka_retry.sdk import RetryingConsumer
from order_service.endpoint import HandlerEndpoint
from order_service.handler import handle_order


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="order_service", description=__doc__)
    parser.add_argument("--pipeline", default="order-service", help="RetryPipeline name")
    parser.add_argument("--namespace", default=None, help="default: the kubeconfig's")
    parser.add_argument(
        "--metrics-port", type=int, default=9400, help="/metrics, /healthz, /readyz (0: any)"
    )
    parser.add_argument(
        "--endpoint", metavar="HOST:PORT", default=None,
        help="serve the tier workers' POSTs on this address (one the workers reach)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    consumer = RetryingConsumer.from_configmap(
        args.pipeline, handle_order, namespace=args.namespace
    )
    health = HealthServer(args.metrics_port, consumer.alive, consumer.ready, host="127.0.0.1")
    health.start()
    logging.info("metrics and probes on port %d", health.port)
    endpoint = None
    if args.endpoint:
        host, _, port = args.endpoint.rpartition(":")
        endpoint = HandlerEndpoint(handle_order, host, int(port)).start()

    def stop(signum: int, _frame: object) -> None:
        logging.info("signal %d: draining and committing", signum)
        consumer.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        consumer.run()  # returns after stop(): forwards drained, offsets committed
    finally:
        if endpoint is not None:
            endpoint.close()
        health.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
