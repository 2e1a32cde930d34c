"""Readiness (metanode/node/ready.py): the rule behind `/v1/health` and systemd's READY=1,
on in-process nodes over loopback TCP; and sd_notify's datagrams (metanode/node/sdnotify.py)."""

from __future__ import annotations

import os
import socket
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from metanode.node.ready import readiness_of
from metanode.node.sdnotify import notify
from metanode.sm import Upsert
from tests.net import free_port, until
from tests.runtime.test_node import Ports, config, node

pytestmark = pytest.mark.runtime

LIMIT = 20


async def test_a_follower_is_ready_once_it_applied_the_leader_s_commit(tmp_path: Path) -> None:
    ports = Ports()
    with trio.fail_after(LIMIT):
        async with AsyncExitStack() as stack:
            n1 = await stack.enter_async_context(node(tmp_path, ports, 1, "--single"))
            await until(lambda: n1.core.is_leader, "leader")
            for i in range(20):
                await n1.propose(Upsert(f"k{i}", b"v"))
            n2 = await stack.enter_async_context(node(tmp_path, ports, 2, "--join", ports.address(1)))
            ready = readiness_of(n2)
            assert readiness_of(n2) is ready, "one per node"
            assert await ready.confirm(5)
            # Confirmed: the leader's commit index when asked is applied here.
            assert n2.applied.index >= n1.core.commit_index - 1 and n2.sm.get("k19") is not None
            assert ready.reason() is None and await ready.check() is None
            # A steady stream of writes does not make it flap.
            for i in range(20):
                await n1.propose(Upsert(f"more{i}", b"v"))
                assert ready.reason() is None
            leader_ready = readiness_of(n1)
            assert await leader_ready.check() is None
            # The leader goes away: no leader, not ready, and confirming fails.
            await stack.aclose()
    # (both closed) -- a lone member of a two-voter cluster never gets a leader:
    with trio.fail_after(LIMIT):
        async with node(tmp_path, ports, 2) as alone:
            ready = readiness_of(alone)
            assert ready.reason() in ("no leader known",) or ready.reason().startswith("catching up")  # type: ignore[union-attr]
            assert not await ready.confirm(0.5)
            assert await ready.check(0.2) == "no leader known"
        assert ready.reason() == "shutting down"


async def test_health_answers_503_with_the_reason_then_200(tmp_path: Path) -> None:
    """`/v1/health` on a real node: 503 `{"status":"fail","reason":...}` while the node
    knows no leader (a lone member of a two-voter cluster), 200 pass once it has one."""
    from metanode.server import open_server

    ports = Ports()
    with trio.fail_after(LIMIT):
        async with node(tmp_path, ports, 1, "--single") as n1:
            async with node(tmp_path, ports, 2, "--join", ports.address(1)):
                await until(lambda: n1.core.membership.voter_ids == {1, 2}, "two voters")
        admin = f"127.0.0.1:{free_port()}"
        cfg = config(tmp_path, ports, 2, "--admin-api-address", admin, "--grpc-api-address", f"127.0.0.1:{free_port()}")
        async with open_server(cfg) as n2, httpx.AsyncClient(base_url=f"http://{admin}") as client:
            r = await client.get("/v1/health")
            assert r.status_code == 503 and r.json()["status"] == "fail"
            assert r.json()["reason"] in ("no leader known",) or r.json()["reason"].startswith("catching up")
            async with node(tmp_path, ports, 1):
                await until(lambda: n2.core.leader is not None, "a leader")
                while (r := await client.get("/v1/health")).status_code != 200:
                    assert r.status_code == 503
                    await trio.sleep(0.05)
                assert r.json() == {"status": "pass"}


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False, "not under systemd: nothing to do"
    path = str(tmp_path / "notify.sock")
    abstract = f"@metanode-test-{os.getpid()}-{free_port()}"
    for name, bind_to in ((path, path), (abstract, "\0" + abstract[1:])):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind_to)
            sock.settimeout(5)
            assert notify("READY=1\nSTATUS=ready", {"NOTIFY_SOCKET": name}) is True
            assert sock.recv(4096) == b"READY=1\nSTATUS=ready"
    # Nobody listening: logged, not raised.
    assert notify("STOPPING=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
