"""The shape of every scenario: a cluster, the workload, `ROUNDS` fault cycles, checks.

    report = await run(cluster, fault)

starts a cluster of `nodes`, starts the workload (roaming clients, one client pinned to
each node, a watcher on each node, the sampler), waits `warmup`, then runs
`fault(cluster, workload, round)` `ROUNDS` times (`ROBUSTNESS_ROUNDS=N`, default 1); a
fault injects its failure, removes it and calls `await workload.healed_now()` (which
records the moment and probes for the first acknowledged write). Then the clients
stop and `Workload.finish` checks everything (tests/robustness/workload.py).
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Awaitable, Callable

import trio

from tests.robustness.cluster import ROUNDS, Cluster
from tests.robustness.workload import Workload

Fault = Callable[[Cluster, Workload, int], Awaitable[None]]


class KnownBug(AssertionError):
    """What a `known_bug` reproduction raises when the bug shows (conftest.py)."""


async def run(cluster: Cluster, fault: Fault, *, nodes: int = 3, warmup: float = 1.5, settle: float = 1.0,
              rounds: int | None = None, pinned: bool = True, clients: int | None = None,
              started: bool = False) -> dict:
    t0 = time.monotonic()
    if not started:
        await cluster.start_cluster(nodes)
    kw = {} if clients is None else {"clients": clients}
    wl = Workload(cluster, **kw)
    if pinned:
        for i in cluster.ids():
            wl.pin_reader([cluster.specs[i].client_address], f"pinned to {i}")
    async with wl.running():
        await trio.sleep(warmup)
        for r in range(rounds if rounds is not None else ROUNDS):
            cluster.note(f"round {r + 1}")
            await fault(cluster, wl, r)
            await trio.sleep(settle)
        report = await wl.finish()
    report["wall_s"] = round(time.monotonic() - t0, 1)
    cluster.note(f"scenario passed in {report['wall_s']} s: {report['counts']} (errors {report['errors']})")
    return report


async def wait_listening(c: Cluster, node_id: int, timeout: float = 40) -> None:
    """Until the node's own raft port accepts connections (its process is up)."""
    spec = c.specs[node_id]

    async def up() -> bool:
        if not c.running(node_id):
            raise AssertionError(f"node {node_id} exited:\n{c.output(node_id)[-2000:]}")
        try:
            with socket.create_connection((spec.host, spec.raft_port), timeout=0.2):
                return True
        except OSError:
            return False

    await c.wait_for(up, timeout, f"node {node_id}'s raft port", interval=0.05)


async def restart(c: Cluster, wl: Workload, *ids: int) -> None:
    for i in ids:
        c.start(i)
    for i in ids:
        await wait_listening(c, i)
    for i in ids:
        wl.expected_exits.discard(i)


async def replace_member(c: Cluster, wl: Workload, node_id: int) -> None:
    """The documented repair of a node whose data dir is damaged or lost
    (docs/operations/cluster.md): remove it, wipe its raft_dir, join it again. The
    leader's log may still hold the entries where the old node was a member and its
    removal: the new node replays them without taking that removal for its own."""
    rest = [i for i in c.ids() if i != node_id and c.running(i)]
    leader = await c.wait_leader(rest)
    r = await c.run_cli("--leave-id", str(node_id), "--leave-via", c.raft_address(leader))
    assert r.returncode == 0, r.stdout + r.stderr
    await c.wait_for(lambda: _not_voter(c, leader, node_id), 20, f"node {node_id} to leave the voters")
    shutil.rmtree(c.specs[node_id].raft_dir, ignore_errors=True)
    wl.wiped.add(node_id)
    c.start(node_id, join=[leader])
    wl.expected_exits.discard(node_id)
    await c.wait_healthy(node_id)
    await c.wait_for(lambda: _voter(c, leader, node_id), 30, f"node {node_id} to be a voter again")


async def _voter(c: Cluster, via: int, node_id: int) -> bool:
    leader = await c.leader() or via
    return node_id in await c.voters(leader)


async def _not_voter(c: Cluster, via: int, node_id: int) -> bool:
    leader = await c.leader() or via
    st = await c.status(leader)
    return st is not None and node_id not in [int(v["name"]) for v in st["voters"]]


__all__ = ["Fault", "KnownBug", "replace_member", "restart", "run", "wait_listening"]
