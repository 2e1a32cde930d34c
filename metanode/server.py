"""A node with its servers: the admin HTTP API and the client API (docs/architecture/node.md).

`metanode/node/` knows nothing of the APIs built on it; this module starts them in
the node's nursery (`open_node(..., services=...)`), once the raft port is bound and
before the node replays its log and joins, so operators can watch a joining node.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from metanode.config import Config
from metanode.errors import ConfigError
from metanode.node.node import Node, Service, open_node
from metanode.tls import client_api_context, peer_security
from metanode.transport.security import use_security

log = logging.getLogger("metanode.node")

#: TEST ONLY (tests/robustness, TTL under clock skew): milliseconds added to this node's
#: clock, the one that stamps the log time of the entries it proposes as leader and
#: decides when keys are due to expire. Read here and nowhere else; never set it in
#: production.
TEST_CLOCK_OFFSET_ENV = "METANODE_TEST_CLOCK_OFFSET_MS"


async def _skew_clock_for_tests(node: Node, nursery: trio.Nursery) -> None:
    offset = int(os.environ[TEST_CLOCK_OFFSET_ENV])
    real = node.clock_ms
    node.clock_ms = lambda: real() + offset
    log.warning("%d: TEST ONLY: clock skewed by %+d ms (%s)", node.id, offset, TEST_CLOCK_OFFSET_ENV)


async def _serve_admin(node: Node, nursery: trio.Nursery) -> None:
    from metanode.api.admin import serve_admin

    config = node.config
    try:
        await nursery.start(
            lambda task_status: serve_admin(
                node, config.admin_api_address, token=config.admin_api_token,
                shutdown=node.stopping, certfile=config.admin_tls_server_cert,
                keyfile=config.admin_tls_server_key, task_status=task_status,
            )
        )
    except OSError as e:
        raise ConfigError(f"admin_api_address: cannot listen on {config.admin_api_address}: {e}") from None


async def _serve_client_api(
    node: Node, nursery: trio.Nursery, *, ssl_context: ssl.SSLContext | None = None
) -> trio.Event:
    from metanode.api.client_api import serve_client_api

    config = node.config
    closed = trio.Event()
    try:
        await nursery.start(
            partial(
                serve_client_api, node, config.grpc_api_address,
                max_message_size=config.grpc_api_max_message_size, shutdown=node.stopping,
                closed=closed, token=config.grpc_api_token, ssl_context=ssl_context,
            )
        )
    except OSError as e:
        raise ConfigError(f"grpc_api_address: cannot listen on {config.grpc_api_address}: {e}") from None
    return closed


@asynccontextmanager
async def open_server(config: Config, *, admin: bool = True, client_api: bool = True) -> AsyncIterator[Node]:
    """`open_node` with the admin API and the client API (either can be left out)."""
    services: list[Service] = []
    if os.environ.get(TEST_CLOCK_OFFSET_ENV):
        services.append(_skew_clock_for_tests)
    if admin:
        services.append(_serve_admin)
    # TLS contexts first: a certificate problem is a ConfigError before the data dir opens.
    security = peer_security(config)
    if client_api:
        services.append(partial(_serve_client_api, ssl_context=client_api_context(config)))
    # The raft port's TLS and secret (docs/operations/security.md): current for every
    # task of the node, which reads it where it opens raft connections.
    with use_security(security):
        async with open_node(config, services=services) as node:
            yield node


__all__ = ["open_server"]
