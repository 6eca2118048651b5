"""The example order service of `make demo`: a Kafka consumer service with a reliable
reprocessing topology, in four small modules.

- `handler.py`  — `handle_order(event)`: prices an order and charges it through the payments
                  upstream. The same function runs on the live lane (this service) and in the
                  tier workers (`handler.python.callable` of the pipeline).
- `__main__.py` — the service: consumes `orders` with the live-lane SDK
                  (`kafka_retry.sdk.RetryingConsumer`), topology read from the pipeline's ConfigMap.
- `payments.py` — a fake payments upstream that answers HTTP 500 to the first attempts of
                  orders paid through a "flaky" bank (a retriable failure that heals).
- `orders.py`   — the order events the demo produces, with a known share of each outcome.

The service has a deliberate bug (coupon codes such as `SAVE15%` crash the price calculation,
a non-retriable failure that sends the order to the DLQ) and a feature flag that fixes it;
see `handler.py`.

Run outside the demo (needs a RetryPipeline `order-service` applied and the operator running):

    PYTHONPATH=examples python -m order_service.payments --port 8089 &
    PAYMENTS_URL=http://127.0.0.1:8089 PYTHONPATH=examples \
        python -m order_service --pipeline order-service --namespace shop
"""
