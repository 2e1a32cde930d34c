"""The client API on TLS (docs/operations/security.md#the-client-api) against a real
node in-process, and the raft port's security inside a two-node in-process cluster
(open_server makes each node's `PeerSecurity` current for its tasks). Certificates
are made here (tests/pki.py). Every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from metanode.client import MetaClient, SyncMetaClient, Unauthenticated, Unavailable
from metanode.config import load_config
from metanode.node.node import Node
from metanode.server import open_server
from metanode.transport import CallPool, Identity, serve_raft
from tests.net import free_port, until
from tests.pki import PKI

pytestmark = pytest.mark.runtime

LIMIT = 20.0


@asynccontextmanager
async def tls_node(tmp: Path, pki: PKI, i: int, *extra: str, raft_port: int | None = None,
                   grpc_port: int | None = None) -> AsyncIterator[tuple[Node, str]]:  # fmt: skip
    pair = pki.issue(f"meta{i}")
    grpc = f"127.0.0.1:{grpc_port or free_port()}"
    args = [
        "--id", str(i), "--raft-dir", str(tmp / f"d{i}"), "--log-dir", str(tmp / "logs"),
        "--raft-api-port", str(raft_port or free_port()), "--raft-advertise-host", "127.0.0.1",
        "--grpc-api-address", grpc, "--heartbeat-interval", "50", "--wait-leader-timeout", "5000",
        "--grpc-tls-server-cert", str(pair.cert), "--grpc-tls-server-key", str(pair.key), *extra,
    ]  # fmt: skip
    async with open_server(load_config(args, {}), admin=False) as node:
        yield node, grpc


def trusting(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_cert))


async def test_a_tls_client_api_serves_tls_clients_only(tmp_path: Path) -> None:
    pki, other = PKI(tmp_path / "pki"), PKI(tmp_path / "other", "other")
    with trio.fail_after(LIMIT):
        async with tls_node(tmp_path, pki, 1, "--single", "--grpc-api-token", "tok") as (n1, grpc):
            await until(lambda: n1.core.is_leader)
            async with MetaClient.connect([grpc], token="tok", tls=trusting(pki), timeout=5) as c:
                await c.upsert("k", b"v")
                assert (await c.get("k")).data == b"v"
                # A plaintext client and a client trusting another CA are refused; the
                # connected client goes on undisturbed.
                with pytest.raises(Unavailable):
                    async with MetaClient.connect([grpc], token="tok", timeout=1):
                        pass
                with pytest.raises(Unavailable, match="TLS handshake failed: .*CERTIFICATE_VERIFY_FAILED"):
                    async with MetaClient.connect([grpc], token="tok", tls=trusting(other), timeout=1):
                        pass
                with pytest.raises(Unauthenticated):
                    async with MetaClient.connect([grpc], token="wrong", tls=trusting(pki), timeout=5):
                        pass
                assert (await c.get("k")).data == b"v"

            def blocking() -> bytes:
                with SyncMetaClient([grpc], token="tok", tls=trusting(pki), timeout=5) as s:
                    s.upsert("s", b"sync")
                    return s.get("s").data

            assert await trio.to_thread.run_sync(blocking) == b"sync"


async def test_two_in_process_nodes_join_and_replicate_over_mutual_tls_and_a_strict_secret(tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    ports = {1: free_port(), 2: free_port()}

    def raft_args(i: int) -> list[str]:
        return [*pki.raft_flags(pki.issue(f"raft{i}")), "--raft-secret", "s", "--raft-secret-strict"]

    with trio.fail_after(LIMIT):
        async with tls_node(tmp_path, pki, 1, "--single", *raft_args(1), raft_port=ports[1]) as (n1, _):
            await until(lambda: n1.core.is_leader)
            join = ["--join", f"127.0.0.1:{ports[1]}"]
            async with tls_node(tmp_path, pki, 2, *join, *raft_args(2), raft_port=ports[2]) as (n2, grpc2):
                await until(lambda: n1.applied_membership.configs == ((1, 2),), "two voters")
                async with MetaClient.connect([grpc2], tls=trusting(pki), timeout=5) as c:
                    await c.upsert("k", b"through a follower")  # forwarded to the leader
                await until(lambda: n2.sm.get("k") is not None, "replicated to node 2")


async def test_a_pool_does_not_reuse_a_connection_its_peer_closed() -> None:
    """A restarted peer (here: a server started again on the same port) left its old
    connections closed in the pool: the next call dials anew instead of failing."""

    async def echo(method: str, payload: bytes, hello: object) -> bytes:
        return payload

    ident = Identity(2, "c", "c1")
    port = free_port()
    pool = CallPool(lambda: ident)
    with trio.fail_after(LIMIT):
        for round_ in range(2):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: serve_raft(
                        "127.0.0.1", port, identity=lambda: Identity(1, "c", "c1"), on_message=lambda m: None,
                        on_call=echo, task_status=task_status,
                    )
                )
                assert await pool.call(f"127.0.0.1:{port}", "m", b"%d" % round_, timeout=5) == b"%d" % round_
                nursery.cancel_scope.cancel()
        assert pool.connects == 2
        await pool.aclose()
