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

import time
from collections.abc import Awaitable, Callable

import trio

from tests.robustness.cluster import ROUNDS, Cluster
from tests.robustness.workload import Workload

Fault = Callable[[Cluster, Workload, int], Awaitable[None]]


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


async def others(cluster: Cluster, node_id: int) -> list[int]:
    return [i for i in cluster.ids() if i != node_id]


__all__ = ["Fault", "run"]
