"""Three "hosts": each node in its own network namespace with its own address on a
bridge, configured with that address (listen and advertise; the default ports, as on
separate machines). A partition is a link taken down: the leader's, then a follower's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import trio

from tests.robustness.cluster import Cluster
from tests.robustness.netns import NetnsHosts
from tests.robustness.scenario import run
from tests.robustness.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.robustness]


@pytest.fixture
def hosts() -> Iterator[NetnsHosts]:
    if shutil.which("ip") is None:
        pytest.fail("the multi-host test needs iproute2 (`ip`) and root")
    h = NetnsHosts()
    try:
        h.setup_bridge()
        yield h
    finally:
        left = h.close()
        assert not left and not h.leftovers(), f"network namespaces or links left behind: {left or h.leftovers()}"


@pytest.mark.cluster_options(proxied=False)
async def test_nodes_on_separate_hosts_partitioned_by_a_link_down(cluster: Cluster, hosts: NetnsHosts) -> None:
    cluster.host_for = hosts.host
    # Every process is stopped before the fixture deletes the namespaces (the cluster
    # fixture ends first: it was set up last).

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        for who in ("leader", "follower"):
            leader = await c.wait_leader()
            victim = leader if who == "leader" else next(i for i in c.ids() if i != leader)
            hosts.link_down(victim)
            c.paused.add(victim)  # unreachable: the checks and probes leave it alone
            c.note(f"link of node {victim} ({who}, {hosts.address(victim)}) down")
            rest = [i for i in c.ids() if i != victim]
            await c.wait_leader(rest, timeout=15)
            await trio.sleep(2.0)
            hosts.link_up(victim)
            c.paused.discard(victim)
            c.note(f"link of node {victim} up")
            await wl.healed_now()
            await trio.sleep(1.0)

    report = await run(cluster, fault)
    st = await cluster.status(1)
    assert st is not None and st["endpoint"] == f"{hosts.address(1)}:28004", st and st["endpoint"]
    assert report["convergence"]["ok"]
