"""A service that consumes its source topic with the live-lane SDK, in a process of its own
(for tests that watch the process: does it exit, how much memory does it take).

    python sdk_service.py TOPOLOGY_FILE PORT

Handler: `dataplane_handlers:record` (records to $DP_RECORD_FILE). /healthz and /readyz on
PORT. SIGTERM stops it (exit 0); any exception out of the consumer exits 1."""

from __future__ import annotations

import logging
import signal
import sys

from dataplane_handlers import record
from kafka_retry.metrics import HealthServer
from kafka_retry.sdk import RetryingConsumer


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    consumer = RetryingConsumer.from_file(sys.argv[1], record, use_env=False)
    server = HealthServer(int(sys.argv[2]), consumer.alive, consumer.ready).start()
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    try:
        consumer.run()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
