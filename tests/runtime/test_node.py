"""`open_node` in-process on loopback TCP: bootstrap, join, leave, restart, failures.

Faster and more precise than the multi-process tests: the test reads the nodes'
state directly. Real sockets, so the real clock (docs/architecture/stack.md: no autojump with I/O).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from metanode.config import Config, load_config
from metanode.errors import ConfigError
from metanode.node import rpc
from metanode.node.leave import _leave
from metanode.node.node import JoinFailed, Node, open_node
from metanode.sm import Upsert
from tests.net import free_port, until

pytestmark = pytest.mark.runtime


class Ports:
    def __init__(self) -> None:
        self.raft: dict[int, int] = {}

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.raft.setdefault(i, free_port())}"


def config(tmp: Path, ports: Ports, i: int, *extra: str) -> Config:
    return load_config(
        [
            "--id", str(i), "--raft-dir", str(tmp / f"d{i}"), "--log-dir", str(tmp / "logs"),
            "--raft-api-port", ports.address(i).split(":")[1], "--raft-advertise-host", "127.0.0.1",
            "--heartbeat-interval", "50", "--wait-leader-timeout", "5000", *extra,
        ],
        {},
    )


def voter_ids(status: dict) -> list[int]:
    """The voters of a status document, as databend's scripts read them."""
    return [int(v["name"]) for v in status["voters"]]


@asynccontextmanager
async def node(tmp: Path, ports: Ports, i: int, *extra: str) -> AsyncIterator[Node]:
    async with open_node(config(tmp, ports, i, *extra)) as n:
        yield n


async def test_a_single_node_bootstraps_and_publishes_its_record(tmp_path: Path) -> None:
    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        await until(lambda: n1.cluster_nodes() != [], "record")
        assert n1.cluster_nodes() == [
            {"name": "1", "endpoint": {"addr": "127.0.0.1", "port": ports.raft[1]}, "grpc_api_advertise_address": None}
        ]
        st = n1.cluster_status()
        assert st["is_leader"] and voter_ids(st) == [1] and st["cluster_id"]
        assert n1.storage.meta is not None and n1.storage.meta.cluster_id == st["cluster_id"]


async def test_node_id_0_is_a_node_like_any_other(tmp_path: Path) -> None:
    """databend-meta's shipped config has `id = 0`: node 0 bootstraps, node 1 joins it,
    both are voters, its record is published, and its address is learned from hellos."""
    ports = Ports()
    async with AsyncExitStack() as stack:
        n0 = await stack.enter_async_context(node(tmp_path, ports, 0, "--single"))
        n1 = await stack.enter_async_context(node(tmp_path, ports, 1, "--join", ports.address(0)))
        await until(lambda: voter_ids(n1.cluster_status()) == [0, 1], "node 1 sees voters 0 and 1")
        await until(lambda: [x["name"] for x in n0.cluster_nodes()] == ["0", "1"], "both records")
        assert n0.core.is_leader and n1.core.leader == 0
        assert (await n1.client_write(Upsert("k", b"v", None, None, None))).result is not None


async def test_nodes_join_through_any_member_and_leave_including_the_leader(tmp_path: Path) -> None:
    ports = Ports()
    async with AsyncExitStack() as stack:
        n1 = await stack.enter_async_context(node(tmp_path, ports, 1, "--single"))
        n2 = await stack.enter_async_context(node(tmp_path, ports, 2, "--join", ports.address(1)))
        # Node 3 joins through follower 2, which forwards to the leader.
        n3 = await stack.enter_async_context(node(tmp_path, ports, 3, "--join", ports.address(2)))
        for n in (n1, n2, n3):
            await until(lambda n=n: [x["name"] for x in n.cluster_nodes()] == ["1", "2", "3"], "3 members")
        # The join returned once the leader applied C_new; node 3 learns its commit next.
        await until(lambda: voter_ids(n3.cluster_status()) == [1, 2, 3], "node 3 sees 3 voters")
        assert n3.meta is not None and n3.meta.cluster_id == n1.meta.cluster_id  # type: ignore[union-attr]
        # Remove the leader (node 1) via node 3.
        assert await _leave(1, [ports.address(3)], n3.config) == 0
        await until(n1.removed.is_set, "node 1 to see its removal")
        await until(lambda: n2.core.is_leader or n3.core.is_leader, "a new leader")
        await until(lambda: [x["name"] for x in n2.cluster_nodes()] == ["2", "3"], "2 and 3 left")
        # Not a member any more: leave says so and succeeds.
        assert await _leave(1, [ports.address(2)], n2.config) == 0


async def test_a_restarted_member_skips_join_and_keeps_its_state(tmp_path: Path) -> None:
    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        async with node(tmp_path, ports, 2, "--join", ports.address(1)) as n2:
            await until(lambda: len(n2.cluster_nodes()) == 2, "2 members")
            await n1.propose(Upsert("k", b"v"))
        # Node 2 restarts with its join list: the committed membership has it.
        async with node(tmp_path, ports, 2, "--join", ports.address(1)) as n2:
            await until(lambda: n2.sm.get("k") is not None, "replay")
            assert not n2.removed.is_set()
            assert voter_ids(n2.cluster_status()) == [1, 2]


async def test_a_join_that_fails_everywhere_names_every_address(tmp_path: Path) -> None:
    ports = Ports()
    dead = [ports.address(8), ports.address(9)]
    with pytest.raises(JoinFailed) as info:
        async with node(tmp_path, ports, 2, "--join", *dead):
            pass
    message = str(info.value)
    assert all(a in message for a in dead) and message.count("try") == 6


async def test_data_dir_rules(tmp_path: Path) -> None:
    ports = Ports()
    with pytest.raises(ConfigError, match="single = true"):
        async with node(tmp_path, ports, 1):
            pass
    async with node(tmp_path, ports, 1, "--single"):
        pass
    with pytest.raises(ConfigError, match="raft_config.id: 5 differs from node id 1"):
        async with open_node(config(tmp_path, ports, 5, "--raft-dir", str(tmp_path / "d1"))):
            pass
    async with node(tmp_path, ports, 1) as n1:  # initialized: neither single nor join needed
        await until(lambda: n1.core.is_leader, "leader again")


async def test_unknown_calls_and_bad_payloads_are_refused(tmp_path: Path) -> None:
    from metanode.errors import BadRequest
    from metanode.transport import call

    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        await until(lambda: n1.core.is_leader, "leader")
        with pytest.raises(BadRequest, match="unknown method"):
            await call(ports.address(1), n1.identity(), "nope", b"", timeout=5)
        with pytest.raises(BadRequest):
            await call(ports.address(1), n1.identity(), rpc.LEAVE, b"\xc1", timeout=5)


async def test_concurrent_joins_are_serialized_and_nobody_is_dropped(tmp_path: Path) -> None:
    """Three nodes join at once: the leader runs one membership change at a time, each
    from the latest membership, so no join undoes another (a stale target once dropped
    a learner, which then exited as removed)."""
    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        await until(lambda: n1.core.is_leader, "leader")
        joined: dict[int, Node] = {}
        done = trio.Event()

        async def run(i: int) -> None:
            async with node(tmp_path, ports, i, "--join", ports.address(1)) as n:
                joined[i] = n
                await done.wait()

        async with trio.open_nursery() as nursery:
            for i in (2, 3, 4):
                nursery.start_soon(run, i)
            await until(lambda: voter_ids(n1.cluster_status()) == [1, 2, 3, 4], "four voters")
            await until(lambda: len(joined) == 3, "three joins answered")
            assert not any(n.removed.is_set() for n in joined.values())
            done.set()


async def test_a_removed_node_restarted_with_join_stays_out(tmp_path: Path) -> None:
    """contract §3: a node whose committed membership no longer has it exits; restarted
    with its old `join` list it must not join again (it used to rejoin as a voter and
    then exit, leaving a dead voter behind)."""
    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        async with node(tmp_path, ports, 2, "--join", ports.address(1)) as n2:
            await until(lambda: voter_ids(n1.cluster_status()) == [1, 2], "two voters")
            assert await _leave(2, [ports.address(1)], n1.config) == 0
            await until(n2.removed.is_set, "node 2 sees its removal")
        async with node(tmp_path, ports, 2, "--join", ports.address(1)) as again:
            assert again.removed.is_set()
        assert voter_ids(n1.cluster_status()) == [1]
        assert n1.core.membership.node_ids == {1}


async def test_a_fresh_node_cannot_take_over_a_members_id(tmp_path: Path) -> None:
    """Two processes voting as one node would break Raft's safety: a join from an empty
    data dir with the id of a member at another address is refused."""
    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        async with node(tmp_path, ports, 2, "--join", ports.address(1)):
            await until(lambda: voter_ids(n1.cluster_status()) == [1, 2], "two voters")
            impostor = load_config(
                ["--id", "2", "--raft-dir", str(tmp_path / "impostor"), "--log-dir", str(tmp_path / "logs"),
                 "--raft-api-port", str(free_port()), "--raft-advertise-host", "127.0.0.1",
                 "--heartbeat-interval", "50", "--wait-leader-timeout", "2000", "--join", ports.address(1)],
                {},
            )
            with pytest.raises(JoinFailed, match="--leave-id 2"):
                async with open_node(impostor):
                    pass
            assert n1.address_of(2) == ports.address(2)


async def test_a_member_restarted_on_a_new_port_is_found_and_republishes(tmp_path: Path) -> None:
    """contract §3: a node re-publishes its record when its address changes; the leader
    learns the new address from the node's own hello before the record is applied."""
    ports = Ports()
    async with node(tmp_path, ports, 1, "--single") as n1:
        async with node(tmp_path, ports, 2, "--join", ports.address(1)):
            await until(lambda: voter_ids(n1.cluster_status()) == [1, 2], "two voters")
        ports.raft[2] = free_port()
        async with node(tmp_path, ports, 2) as n2:
            await until(lambda: n2.core.leader is not None and n1.core.leader == n2.core.leader, "one leader again")
            await until(lambda: n1.sm.node(2) is not None and n1.sm.node(2).endpoint.port == ports.raft[2], "new record")


STATUS_KEYS = [
    "id", "binary_version", "data_version", "endpoint", "raft_log", "snapshot_key_count", "state",
    "is_leader", "current_term", "last_log_index", "last_applied", "snapshot_last_log_id", "purged",
    "leader", "replication", "voters", "non_voters", "last_seq", "cluster_id", "state_digest",
]
RAFT_LOG_KEYS = [
    "cache_items", "cache_used_size", "wal_total_size", "wal_open_chunk_size", "wal_offset",
    "wal_closed_chunk_count", "wal_closed_chunk_total_size", "wal_closed_chunk_sizes",
]


def is_log_id(value: object) -> bool:
    return (
        isinstance(value, dict) and list(value) == ["leader_id", "index"]
        and list(value["leader_id"]) == ["term", "node_id"]
        and all(isinstance(v, int) for v in (value["index"], *value["leader_id"].values()))
    )


async def test_cluster_status_is_databend_meta_s_meta_node_status(tmp_path: Path) -> None:
    """docs/reference/admin-api.md: MetaNodeStatus field for field, in its order, plus
    cluster_id; nodes as /v1/cluster/nodes shows them; replication on the leader only,
    covering every voter and learner, itself included."""
    import json

    from metanode import __version__
    from metanode.sm import Upsert

    ports = Ports()
    async with AsyncExitStack() as stack:
        n1 = await stack.enter_async_context(node(tmp_path, ports, 1, "--single", "--max-applied-log-to-keep", "0"))
        n2 = await stack.enter_async_context(node(tmp_path, ports, 2, "--join", ports.address(1)))
        n3 = await stack.enter_async_context(node(tmp_path, ports, 3, "--join", ports.address(1), "--learner"))
        for n in (n1, n2, n3):
            await until(lambda n=n: [x["name"] for x in n.cluster_nodes()] == ["1", "2", "3"], "3 records")
        await n1.propose(Upsert("a", b"1"))
        await n1.propose(Upsert("b", b"2"))
        last = n1.core.log.last_index
        await until(lambda: all(n.applied.index >= last for n in (n1, n2, n3)), "every node applied")

        st = n1.cluster_status()
        json.dumps(st)
        assert list(st) == STATUS_KEYS
        assert list(st["raft_log"]) == RAFT_LOG_KEYS
        assert (st["id"], st["state"], st["is_leader"]) == (1, "Leader", True)
        assert st["binary_version"] == f"metanode {__version__}" and st["data_version"] == "V001"
        assert st["endpoint"] == f"127.0.0.1:{ports.raft[1]}"
        assert st["voters"] == n1.cluster_nodes()[:2] and st["non_voters"] == n1.cluster_nodes()[2:]
        assert st["leader"] == n1.cluster_nodes()[0]
        assert st["snapshot_key_count"] == 2 and st["last_seq"] == 2
        assert st["last_log_index"] == last and is_log_id(st["last_applied"])
        assert st["last_applied"] == {"leader_id": {"term": st["current_term"], "node_id": 1}, "index": last}
        assert st["snapshot_last_log_id"] is None and st["purged"] is None
        await until(lambda: all(v == n1.cluster_status()["last_applied"]
                                for v in n1.cluster_status()["replication"].values()), "replication caught up")
        assert sorted(n1.cluster_status()["replication"]) == ["1", "2", "3"]
        rl = st["raft_log"]
        assert rl["cache_items"] == last and rl["cache_used_size"] > 0
        assert rl["wal_total_size"] == rl["wal_open_chunk_size"] + rl["wal_closed_chunk_total_size"] > 0
        assert rl["wal_closed_chunk_count"] == len(rl["wal_closed_chunk_sizes"])

        follower, learner = n2.cluster_status(), n3.cluster_status()
        assert (follower["state"], follower["is_leader"], follower["replication"]) == ("Follower", False, None)
        assert (learner["state"], learner["replication"]) == ("Learner", None)
        assert follower["leader"] == learner["leader"] == st["leader"]
        assert [v["name"] for v in learner["voters"]] == ["1", "2"]
        assert [v["name"] for v in learner["non_voters"]] == ["3"]

        # A snapshot with nothing kept behind it: snapshot_last_log_id and purged.
        await n1.trigger_snapshot()
        after = n1.cluster_status()
        assert after["snapshot_last_log_id"] == after["last_applied"] == after["purged"]
        assert after["raft_log"]["cache_items"] == after["last_log_index"] - after["purged"]["index"]
