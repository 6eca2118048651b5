"""kopf's HTTP session to the API server, with its requests bounded in number at once.

kopf's own session opens a new connection (a TLS handshake, its buffers in native memory)
for every request made while the others are busy. At scale its status patches and Events come
in bursts, a timer per pipeline: with 500 pipelines on a loaded API server the operator held
280 connections at once, and its handshakes were 8% of its event loop's samples. Here at most
`requests_at_once` requests are in flight (the rest wait their turn, as the API server would
have made them wait anyway), so the connections stay about that many, kept alive and reused.

Not too few: a request's wait for its turn counts against kopf's request timeout. At 16, with
2,000 status patches due at once and the API server answering in 0.5-1 s under load, the queue
outlasted the timeout: requests timed out unsent and were retried, and hardly any got through
(500 pipelines not Ready in 10 minutes at load 35; 4,553 patches timed out). At 64: Ready in
49 s at load 11-17, none timed out.
Watches are long-lived and are left out of the count: however many namespaces are watched,
a waiting request can never starve them, nor they it.

Credentials are kopf's own login (the pod's service account, else $KUBECONFIG): only the
session around them changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import kopf

# In-flight requests (watches aside): enough to drain a burst within kopf's request timeout.
REQUESTS_AT_ONCE = 64


def bounded_session(
    info: kopf.ConnectionInfo, requests_at_once: int = REQUESTS_AT_ONCE
) -> kopf.AiohttpSession:
    """A session for `info` (what `kopf.login_via_client` found) on which at most
    `requests_at_once` requests, watches aside, are in flight at once."""
    turns = asyncio.Semaphore(requests_at_once)

    async def in_turn(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        if request.url.query.get("watch") == "true":
            return await handler(request)
        async with turns:
            response = await handler(request)
            await response.read()  # the connection is free again once the body is in
            return response

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
        middlewares=(in_turn,),
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
    )


def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's login through the Kubernetes client, on a bounded session (see above)."""
    info = kopf.login_via_client(**kwargs)
    return bounded_session(info) if info is not None else None
