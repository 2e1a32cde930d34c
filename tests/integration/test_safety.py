"""Real processes on 127.0.0.1: three safety bugs found by hand on 3-node clusters.

1. A node whose data dir was wiped rejoins with its old id, votes with an empty log and
   lets a lagging follower win an election without the last committed entries.
2. One forged raft frame from a non-member (the cluster id is public: `GET
   /v1/cluster/status`) with a huge term resets every node's term and the leadership.
3. A follower whose WAL lost its tail (entries it had acknowledged) never catches up on a
   quiet cluster: the leader keeps believing it matches past its real end.

Each test asserts the safety property, whatever the fix looks like, with the cluster's
heartbeat at 200 ms (as found). Every process is stopped by the fixture, by its PID
(SIGCONT first, in case a test left one stopped); every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metanode.client import MetaError, SyncMetaClient
from tests.integration.harness import (
    LocalCluster,
    Proc,
    run_cli,
    wait_until,
    write_config,
)
from tests.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEARTBEAT_MS = 200


class SafetyCluster(LocalCluster):
    """`LocalCluster` with the heartbeat of the bug reports and no snapshot during a test
    (so that a compaction cannot hide a replication bug)."""

    FLAGS = ("--snapshot-logs-since-last", "1000000")

    def __init__(self, root: Path) -> None:
        super().__init__(root, heartbeat_ms=HEARTBEAT_MS)

    def add(self, node_id: int, *, single: bool = False, join: list[int] | None = None, extra: str = "") -> Proc:
        if node_id not in self.ports:
            self.ports[node_id] = (free_port(), free_port(), free_port())
        raft, admin, grpc = self.ports[node_id]
        cfg = write_config(
            self.root / f"node{node_id}.toml", node_id, raft, admin, grpc, single=single,
            join=[self.raft_address(j) for j in join or []], extra=extra, heartbeat_ms=self.heartbeat_ms,
        )
        proc = Proc(f"node{node_id}", ["-c", str(cfg), *self.FLAGS], self.root)
        self.procs[node_id] = proc
        return proc.start()

    def signal(self, node_id: int, sig: int) -> None:
        """Send `sig` (SIGSTOP, SIGCONT...) to node `node_id` if it runs."""
        proc = self.procs[node_id]
        if proc.running:
            proc.popen.send_signal(sig)  # type: ignore[union-attr]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SafetyCluster]:
    c = SafetyCluster(tmp_path)
    try:
        yield c
    finally:
        for i in c.procs:
            c.signal(i, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        c.stop_all()


def client_address(c: LocalCluster, node_id: int) -> str:
    return f"127.0.0.1:{c.ports[node_id][2]}"


def status_or_none(c: LocalCluster, node_id: int) -> dict | None:
    if not c.procs[node_id].running:
        return None
    try:
        return c.admin(node_id).status()
    except (httpx.HTTPError, ValueError):
        return None


def status_ok(pred: Any) -> bool:
    """`pred()`, False when the node does not answer (yet)."""
    try:
        return bool(pred())
    except (httpx.HTTPError, OSError, ValueError):
        return False


def applied(st: dict) -> int:
    return int(st["last_applied"]["index"]) if st.get("last_applied") else 0


def voters(st: dict) -> list[int]:
    """The voter ids of a status document: ids, or node records named by their id."""
    return sorted(int(v["name"]) if isinstance(v, dict) else int(v) for v in st["voters"])


def matched(st: dict, peer: int) -> int:
    """What the leader whose status this is believes `peer` matches (0 if unknown)."""
    v = (st.get("replication") or {}).get(str(peer))
    return int(v["index"]) if v else 0


def write_keys(addresses: list[str], keys: list[str], acked: dict[str, tuple[int, bytes]]) -> None:
    """Write every key (value = the key) and record what was acknowledged."""
    with SyncMetaClient(addresses, timeout=10) as cl:
        for key in keys:
            ch = cl.upsert(key, key.encode())
            assert ch.result is not None
            acked[key] = (ch.result.seq, ch.result.data)


def lost_writes(found: dict[str, Any], acked: dict[str, tuple[int, bytes]]) -> list[str]:
    return [k for k, (seq, data) in acked.items() if found.get(k) is None or (found[k].seq, found[k].data) != (seq, data)]


def read_local(c: LocalCluster, node_id: int, prefix: str) -> dict[str, tuple[int, bytes]]:
    """Every key under `prefix` as node `node_id` itself holds it (no leader involved)."""
    with SyncMetaClient([client_address(c, node_id)], timeout=10) as cl:
        return {k: (v.seq, v.data) for k, v in cl.list(prefix, consistency="local")}


def wait_caught_up(c: LocalCluster, ids: list[int], timeout: float) -> dict[int, dict]:
    """Until every node of `ids` has applied what the leader among them applied."""

    def check() -> dict[int, dict] | None:
        sts = {i: c.admin(i).status() for i in ids}
        leaders = [st for st in sts.values() if st["is_leader"]]
        if len(leaders) != 1:
            return None
        target = applied(leaders[0])
        return sts if all(applied(st) >= target for st in sts.values()) else None

    return wait_until(check, timeout, f"nodes {ids} to apply what their leader applied")  # type: ignore[no-any-return]


def settle(c: LocalCluster, ids: list[int], timeout: float) -> dict[int, dict]:
    """The statuses of `ids` once they all report one applied index and a leader among
    them, or as they are after `timeout` (the caller asserts on them)."""
    deadline = time.monotonic() + timeout
    while True:
        sts = {i: c.admin(i).status() for i in ids}
        if len({applied(st) for st in sts.values()}) == 1 and any(st["is_leader"] for st in sts.values()):
            return sts
        if time.monotonic() > deadline:
            return sts
        time.sleep(0.1)


# --------------------------------------------------------------------------------------
# 1. A wiped node rejoining with its old id
# --------------------------------------------------------------------------------------


def test_a_wiped_node_rejoining_with_its_old_id_loses_no_acknowledged_write(cluster: SafetyCluster) -> None:
    c = cluster
    c.start(3)
    leader = wait_until(c.leader, 20, "a leader")
    g, f = (i for i in (1, 2, 3) if i != leader)
    acked: dict[str, tuple[int, bytes]] = {}
    # The writer talks to the leader only: a connection to the stopped G would hang.
    write_keys([client_address(c, leader)], [f"k{n:04d}" for n in range(150)], acked)
    wait_caught_up(c, [1, 2, 3], 20)

    c.signal(g, signal.SIGSTOP)  # G lags from here
    write_keys([client_address(c, leader)], [f"k{n:04d}" for n in range(150, 250)], acked)
    st_leader = c.admin(leader).status()
    committed = applied(st_leader)  # every acknowledged write is at or below it
    wait_until(lambda: applied(c.admin(f).status()) >= committed, 20, f"node {f} to apply index {committed}")

    # F loses its disk and comes back with the same id, address and a join list.
    c.procs[f].kill()
    shutil.rmtree(c.root / f"data{f}")
    out_before = len(c.procs[f].output())
    c.add(f, join=[leader])
    fproc = c.procs[f]
    cluster_id = st_leader["cluster_id"]
    wait_until(lambda: not fproc.running or c.admin(f).healthy(), 20, f"node {f} to answer or exit")
    # Let its join finish if it can (no assertion: with G stopped and F gone the old
    # leader may have no quorum left to answer it).
    joined_or_gone = lambda: not fproc.running or c.admin(f).status().get("cluster_id") == cluster_id
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not status_ok(joined_or_gone):
        time.sleep(0.02)
    c.procs[leader].kill()
    c.signal(g, signal.SIGCONT)

    # While the old leader is down: whoever leads must hold every committed entry.
    window: list[tuple[float, int, dict]] = []  # (seconds after the kill, node, status) of leaders seen
    t0 = time.monotonic()
    for _ in range(60):  # 4 s at most
        for i in (g, f):
            st = status_or_none(c, i)
            if st is not None and st["is_leader"]:
                window.append((round(time.monotonic() - t0, 2), i, st))
        if time.monotonic() - t0 > 4:
            break
        time.sleep(0.05)
    short_leaders = {(i, st["current_term"], st["last_log_index"]) for _, i, st in window if st["last_log_index"] < committed}
    f_status = status_or_none(c, f)

    # The old leader comes back: a quorum of members exists whatever happened to F.
    c.restart(leader)
    c.wait_healthy(leader)
    running = [i for i in (1, 2, 3) if c.procs[i].running]
    new_leader = wait_until(lambda: c.leader(running), 30, "a leader once the old leader is back")
    voter_ids = voters(c.admin(new_leader).status())
    # Read through the leader itself: a follower may still hold entries the leader lost.
    keys = sorted(acked)
    read_error = None
    try:
        with SyncMetaClient([client_address(c, new_leader)], timeout=10) as cl:
            found = dict(zip(keys, cl.mget(keys)))
    except MetaError as e:
        found, read_error = {}, str(e)
    lost = lost_writes(found, acked)
    # The members that run must converge to one state: same applied index, same keys.
    members = [i for i in voter_ids if c.procs[i].running]
    sts = settle(c, members, 15)
    states: dict[int, dict] = {}
    read_errors = {}
    for i in members:
        try:
            states[i] = read_local(c, i, "k")
        except MetaError as e:
            states[i], read_errors[i] = {}, str(e)
    diverged = {i: sorted(set(states[i].items()) ^ set(states[new_leader].items()))[:3] for i in members
                if states[i] != states[new_leader]}
    lacking = {i: len(lost_writes({k: _SeqV(*v) for k, v in states[i].items()}, acked)) for i in members}
    report = {
        "leader": leader, "lagging G": g, "wiped F": f, "committed": committed,
        "leaders without the committed entries (node, term, last_log_index)": sorted(short_leaders),
        "F status after the election window": f_status and {k: f_status[k] for k in ("state", "current_term", "last_log_index")},
        "F running": fproc.running, "acknowledged": len(acked), "lost (read on the leader)": len(lost),
        "new leader": new_leader, "voters": voter_ids,
        "last_applied of the members": {i: applied(st) for i, st in sts.items()},
        "acknowledged writes missing per member": lacking, "diverging members (first differences)": diverged,
        "read errors": {"leader": read_error, **read_errors},
    }
    print(json.dumps(report, indent=1, default=str))
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost (first {lost[:5]}): {report}"
    assert not short_leaders, f"a leader was elected without the committed entries: {report}"
    assert len({applied(st) for st in sts.values()}) == 1, f"the members did not converge: {report}"
    assert not diverged and not any(lacking.values()), f"the members' states differ: {report}"

    # Refused: the wiped F exits non-zero, naming the way out. Its first start may have
    # failed for want of a leader (its join address died); with a leader it is refused.
    wait_until(lambda: not fproc.running, 30, f"the wiped node {f} to exit")
    f_out = fproc.output()[out_before:]
    if "--leave-id" not in f_out:
        out_before = len(fproc.output())
        shutil.rmtree(c.root / f"data{f}", ignore_errors=True)
        c.add(f, join=[new_leader])
        fproc = c.procs[f]
        wait_until(lambda: not fproc.running, 30, f"the wiped node {f} to exit (second start, a leader is up)")
        f_out = fproc.output()[out_before:]
    assert fproc.popen is not None and fproc.popen.returncode != 0, f_out[-3000:]
    assert "--leave-id" in f_out, f_out[-3000:]

    # The documented fix: remove F, then join it again with an empty dir.
    result = run_cli(["--leave-id", str(f), "--leave-via", c.raft_address(new_leader)], c.root)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: f not in voters(c.admin(new_leader).status()), 20, f"node {f} to leave the voters")
    shutil.rmtree(c.root / f"data{f}", ignore_errors=True)
    c.add(f, join=[new_leader])
    c.wait_healthy(f)
    wait_until(lambda: f in voters(c.admin(new_leader).status()), 30, f"node {f} to be a voter again")
    wait_caught_up(c, [i for i in (1, 2, 3) if c.procs[i].running], 30)
    assert not lost_writes({k: _SeqV(*v) for k, v in read_local(c, f, "k").items()}, acked)


class _SeqV:
    def __init__(self, seq: int, data: bytes) -> None:
        self.seq = seq
        self.data = data
