"""The order events the demo produces. Every block of 20 orders holds a fixed mix, shuffled:

- 2 with a `SAVE15%` coupon: the handler's bug, non-retriable → DLQ, replayed after the fix;
- 3 paid through `northwind` (payments fails the first attempt): handled on the first tier;
- 2 paid through `fabrikam` (payments fails two attempts): handled on the second tier;
- 13 that go through at once.

Events are keyed by customer, so each customer's orders share a partition.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

BLOCK = ["bug"] * 2 + ["northwind"] * 3 + ["fabrikam"] * 2 + ["ok"] * 13
HEALTHY_BANKS = ("contoso", "woodgrove")
SKUS = {"tea-earl-grey": 650, "mug-blue": 1299, "kettle": 3999, "biscuits": 349}


def order_events(count: int, seed: int = 7) -> Iterator[tuple[str, dict[str, Any]]]:
    """`count` (key, order) pairs; the same seed gives the same orders."""
    rng = random.Random(seed)
    kinds: list[str] = []
    for i in range(count):
        if i % len(BLOCK) == 0:
            kinds = rng.sample(BLOCK, len(BLOCK))
        kind = kinds[i % len(BLOCK)]
        customer = f"customer-{rng.randrange(1, 60):03d}"
        skus = rng.sample(sorted(SKUS), rng.randint(1, 3))
        bank = kind if kind in ("northwind", "fabrikam") else rng.choice(HEALTHY_BANKS)
        coupon = "SAVE15%" if kind == "bug" else rng.choice([None, None, "SAVE10"])
        order = {
            "id": f"order-{i + 1:05d}",
            "customer": customer,
            "items": [{"sku": s, "qty": rng.randint(1, 3), "unit_cents": SKUS[s]} for s in skus],
            "coupon": coupon,
            "bank": bank,
            "createdMs": int(time.time() * 1000),
        }
        yield customer, order
