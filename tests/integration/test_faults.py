"""Real processes on 127.0.0.1 under crashes, restarts, leader removal and bad peers."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import msgpack
import pytest
import trio

from metanode.errors import Unauthenticated
from metanode.transport import Identity, call
from tests.integration.harness import LocalCluster, voter_ids, wait_until

pytestmark = pytest.mark.integration


def start_three(c: LocalCluster) -> None:
    c.add(1, single=True)
    c.wait_healthy(1)
    wait_until(lambda: c.admin(1).node_names() == ["1"], 20, "node 1 to publish itself")
    c.add(2, join=[1])
    c.add(3, join=[1, 2])  # at the same time as node 2, and through either node
    for i in (2, 3):
        c.wait_healthy(i)
    wait_until(lambda: c.admin(3).node_names() == ["1", "2", "3"], 30, "three members on node 3")


def agree(c: LocalCluster, ids: list[int]) -> dict:
    """Every node in `ids` reports the same voters and records; returns one status."""
    statuses = {i: c.admin(i).status() for i in ids}
    voters = {tuple(voter_ids(s)) for s in statuses.values()}
    names = {tuple(c.admin(i).node_names()) for i in ids}
    return statuses[ids[0]] if len(voters) == 1 and len(names) == 1 else {}


def test_a_killed_leader_is_replaced_and_the_survivors_agree(cluster: LocalCluster) -> None:
    start_three(cluster)
    leader = wait_until(cluster.leader, 20, "a leader")
    killed_at = time.monotonic()
    cluster.procs[leader].kill()
    survivors = [i for i in (1, 2, 3) if i != leader]
    new = wait_until(lambda: cluster.leader(survivors), 20, "a new leader")
    print(f"new leader {new} {time.monotonic() - killed_at:.2f} s after SIGKILL of {leader}")
    st = wait_until(lambda: agree(cluster, survivors), 20, "survivors to agree")
    assert voter_ids(st) == [1, 2, 3]
    cluster.restart(leader)
    cluster.wait_healthy(leader)
    wait_until(lambda: agree(cluster, [1, 2, 3]), 20, "all three to agree again")


def test_a_whole_cluster_killed_comes_back_with_its_membership_and_log(cluster: LocalCluster) -> None:
    start_three(cluster)
    before = wait_until(lambda: agree(cluster, [1, 2, 3]), 20, "agreement")
    for i in (1, 2, 3):
        cluster.procs[i].kill()
    for i in (1, 2, 3):
        cluster.restart(i)
    for i in (1, 2, 3):
        cluster.wait_healthy(i)
    wait_until(cluster.leader, 20, "a leader after the restart")
    after = wait_until(lambda: agree(cluster, [1, 2, 3]), 20, "agreement after the restart")
    assert voter_ids(after) == voter_ids(before) == [1, 2, 3]
    assert after["last_log_index"] >= before["last_log_index"]
    assert after["cluster_id"] == before["cluster_id"]
    assert cluster.admin(2).node_names() == ["1", "2", "3"]


def test_removing_the_leader(cluster: LocalCluster) -> None:
    start_three(cluster)
    leader = wait_until(cluster.leader, 20, "a leader")
    via = cluster.raft_address(leader)
    from tests.integration.harness import run_cli

    result = run_cli(["--leave-id", str(leader), "--leave-via", via], cluster.root)
    assert result.returncode == 0, result.stderr
    assert cluster.procs[leader].wait(30) == 0
    survivors = [i for i in (1, 2, 3) if i != leader]
    new = wait_until(lambda: cluster.leader(survivors), 20, "a new leader")
    assert new in survivors
    st = wait_until(lambda: agree(cluster, survivors), 20, "the survivors to agree")
    assert voter_ids(st) == survivors
    assert cluster.admin(new).node_names() == [str(i) for i in survivors]


def test_leave_refuses_the_last_voter_and_reports_unreachable_addresses(cluster: LocalCluster) -> None:
    from tests.integration.harness import free_port, run_cli

    cluster.add(1, single=True)
    cluster.wait_healthy(1)
    wait_until(lambda: cluster.admin(1).node_names() == ["1"], 20, "node 1 published")
    dead = f"127.0.0.1:{free_port()}"
    result = run_cli(["--leave-id", "1", "--leave-via", dead, cluster.raft_address(1)], cluster.root)
    assert result.returncode == 1
    assert dead in result.stderr and "last voter" in result.stderr
    assert cluster.procs[1].running


def test_peers_of_another_cluster_are_refused_and_change_nothing(cluster: LocalCluster) -> None:
    cluster.add(1, single=True)
    cluster.wait_healthy(1)
    leader = wait_until(lambda: cluster.admin(1).status()["is_leader"] and cluster.admin(1).status(), 20, "leader")
    address = cluster.raft_address(1)
    host, port = address.split(":")

    async def join_as_stranger() -> None:
        ident = Identity(9, "metanode", "another-cluster-id", None)
        with pytest.raises(Unauthenticated):
            await call(address, ident, "join", b"", timeout=5)

    trio.run(join_as_stranger)
    # A raw vote request with a huge term from another cluster: refused before raft.
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for frame in (
            {"t": "hello", "v": 1, "cluster_id": "another-cluster-id", "cluster_name": "metanode", "from": 9},
            {"t": "vote", "term": 1000, "src": 9, "dst": 1, "last_log_id": [999, 999]},
        ):
            body = msgpack.packb(frame)
            s.sendall(struct.pack(">I", len(body)) + body)
        s.settimeout(5)
        reply = s.recv(65536)
        assert b"error" in reply
    after = cluster.admin(1).status()
    assert after["current_term"] == leader["current_term"] and after["is_leader"]
    assert voter_ids(after) == [1]


@pytest.mark.parametrize(
    "toml, message",
    [
        ("log_dir = \n", "line 1"),
        ('[raft_config]\nid = "one"\nsingle = true\n', "raft_config.id"),
        ("[raft_config]\nsingle = true\n", "raft_config.id"),
        ('[raft_config]\nid = 1\nraft_api_port = 28999\nraft_advertise_host = "127.0.0.1"\njoin = ["127.0.0.1:28999"]\n', "join"),
        ("[raft_config]\nid = 1\n", "single = true"),
    ],
    ids=["bad-toml", "wrong-type", "missing-id", "join-itself", "empty-dir-no-single-no-join"],
)
def test_bad_configs_exit_2_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    from tests.integration.harness import run_cli

    (tmp_path / "bad.toml").write_text(toml)
    result = run_cli(["-c", "bad.toml", "--raft-dir", str(tmp_path / "d"), "--log-dir", str(tmp_path / "l")], tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_stored_id_wins_and_ports_in_use_are_config_errors(cluster: LocalCluster) -> None:
    from tests.integration.harness import run_cli

    cluster.add(1, single=True)
    cluster.wait_healthy(1)
    cfg = cluster.root / "node1.toml"
    # The admin and raft ports of node 1 are taken: a second node on them fails fast.
    other = cluster.root / "other"
    result = run_cli(["-c", str(cfg), "--id", "5", "--raft-dir", str(other), "--single"], cluster.root)
    assert result.returncode == 2 and "raft_api_port" in result.stderr, result.stderr
    cluster.procs[1].stop()
    result = run_cli(["-c", str(cfg), "--id", "5"], cluster.root)
    assert result.returncode == 2 and "raft_config.id" in result.stderr and "stored" in result.stderr


def test_an_unwritable_data_dir_is_a_config_error(tmp_path: Path) -> None:
    from tests.integration.harness import run_cli

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli(["--id", "1", "--single", "--raft-dir", str(blocker / "d"), "--log-dir", str(tmp_path / "l")], tmp_path)
    assert result.returncode == 2 and str(blocker) in result.stderr, result.stderr


def test_sigterm_stops_a_node_that_is_still_joining(tmp_path: Path) -> None:
    """contract §1: SIGTERM shuts down gracefully (exit 0), also while the node is still
    trying its join addresses."""
    import signal

    from tests.integration.harness import Proc, free_port, wait_until, write_config

    cfg = write_config(tmp_path / "n.toml", 2, free_port(), free_port(), free_port(),
                       join=[f"127.0.0.1:{free_port()}"], extra="")
    proc = Proc("joining", ["-c", str(cfg)], tmp_path).start()
    # Its banner is printed once it runs (a loaded machine may take seconds to start
    # Python); then it is inside its 3 tries, 1 s apart.
    wait_until(lambda: "start:" in proc.output(), 20, "the node's banner")
    time.sleep(0.5)
    assert proc.running
    started = time.monotonic()
    assert proc.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 5
