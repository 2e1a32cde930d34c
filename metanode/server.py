"""A node with its servers: the admin HTTP API and the client API (docs/architecture/node.md).

`metanode/node/` knows nothing of the APIs built on it; this module starts them in
the node's nursery (`open_node(..., services=...)`), once the raft port is bound and
before the node replays its log and joins, so operators can watch a joining node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from metanode.config import Config
from metanode.errors import ConfigError
from metanode.node.node import Node, Service, open_node


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


async def _serve_client_api(node: Node, nursery: trio.Nursery) -> trio.Event:
    from metanode.api.client_api import serve_client_api

    config = node.config
    closed = trio.Event()
    try:
        await nursery.start(
            partial(
                serve_client_api, node, config.grpc_api_address,
                max_message_size=config.grpc_api_max_message_size, shutdown=node.stopping,
                closed=closed, token=config.grpc_api_token,
            )
        )
    except OSError as e:
        raise ConfigError(f"grpc_api_address: cannot listen on {config.grpc_api_address}: {e}") from None
    return closed


@asynccontextmanager
async def open_server(config: Config, *, admin: bool = True, client_api: bool = True) -> AsyncIterator[Node]:
    """`open_node` with the admin API and the client API (either can be left out)."""
    services: list[Service] = []
    if admin:
        services.append(_serve_admin)
    if client_api:
        services.append(_serve_client_api)
    async with open_node(config, services=services) as node:
        yield node


__all__ = ["open_server"]
