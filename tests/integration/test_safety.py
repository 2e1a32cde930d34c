"""Real processes on 127.0.0.1: three safety bugs found by hand on 3-node clusters.

1. A node whose data dir was wiped rejoins with its old id, votes with an empty log and
   lets a lagging follower win an election without the last committed entries.
2. One forged raft frame from a non-member (the cluster id is public: `GET
   /v1/cluster/status`) with a huge term resets every node's term and the leadership;
   so do responses nobody asked for, sent in a member's name.
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
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from metanode.client import MetaError, SyncMetaClient
from metanode.raft.messages import (
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from metanode.raft.types import LogId
from metanode.storage import records, wal
from metanode.transport.frames import Hello, frame_bytes
from metanode.wire.codec import PROTOCOL_VERSION
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


def port_open(address: str) -> bool:
    """Does something accept TCP connections at `address` (closed at once)?"""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


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
    # As soon as F answers (its raft port first, or its admin API) or exits. No assertion:
    # with G stopped and F gone the old leader may have lost its quorum and be unable to
    # answer the join, and a node may serve its admin API only once it joined.
    answers = lambda: not fproc.running or port_open(c.raft_address(f)) or c.admin(f).healthy()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not status_ok(answers):
        time.sleep(0.005)
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
        "F running": fproc.running, "acknowledged": len(acked),
        "lost (read on the leader)": len(lost) if read_error is None else "no answer",
        "new leader": new_leader, "voters": voter_ids,
        "last_applied of the members": {i: applied(st) for i, st in sts.items()},
        "acknowledged writes missing per member": lacking, "diverging members (first differences)": diverged,
        "read errors": {"leader": read_error, **read_errors},
    }
    print(json.dumps(report, indent=1, default=str))
    assert read_error is None, f"the leader {new_leader} serves no read of the acknowledged writes: {report}"
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


# --------------------------------------------------------------------------------------
# 2. Forged raft frames
# --------------------------------------------------------------------------------------

FORGED_ID = 99  # not a member


def send_forged(address: str, hello_from: int, cluster_id: str, frames: list[Any]) -> None:
    """One connection to a raft port: a hello claiming to be node `hello_from` of our
    cluster (the id is public), then `frames`. Waits (bounded) for the listener to close
    after our end of stream, so every frame was read before we go."""
    host, port = address.rsplit(":", 1)
    hello = Hello(PROTOCOL_VERSION, cluster_id, "metanode", hello_from)
    data = frame_bytes(hello) + b"".join(frame_bytes(fr) for fr in frames)
    with socket.create_connection((host, int(port)), timeout=2) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and s.recv(65536):
                pass
        except OSError:
            pass  # refused and closed: what a fixed node may do


def forged_frames(term: int, dst: int) -> list[Any]:
    """Every kind of raft frame a stranger could send, with term `term`."""
    src = FORGED_ID
    return [
        HeartbeatResponse(term, src, dst),
        AppendResponse(term, src, dst, success=False, index=0),
        AppendResponse(term, src, dst, success=True, index=10**9),
        VoteResponse(term, src, dst, granted=True),
        VoteResponse(term, src, dst, granted=True, pre_vote=True),
        VoteRequest(term, src, dst, LogId(term, 10**9)),
        VoteRequest(term, src, dst, LogId(term, 10**9), pre_vote=True),
        AppendRequest(term, src, dst, LogId(0, 0), (), 0),
        Heartbeat(term, src, dst, commit=0),
        TimeoutNow(term, src, dst),
    ]


class Writer(threading.Thread):
    """`count` writes, one every `pause` s, each on its own key; records failures."""

    def __init__(self, addresses: list[str], prefix: str, count: int, pause: float, stop_at: float) -> None:
        super().__init__(name=f"writer-{prefix}", daemon=True)
        self.addresses, self.prefix, self.count, self.pause, self.stop_at = addresses, prefix, count, pause, stop_at
        self.acked: dict[str, tuple[int, bytes]] = {}
        self.errors: list[str] = []
        self.elapsed = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            with SyncMetaClient(self.addresses, timeout=5) as cl:
                for n in range(self.count):
                    if time.monotonic() > self.stop_at:
                        self.errors.append(f"deadline passed after {n} writes")
                        return
                    key = f"{self.prefix}{n:04d}"
                    try:
                        ch = cl.upsert(key, key.encode())
                        self.acked[key] = (ch.result.seq, ch.result.data)  # type: ignore[union-attr]
                    except MetaError as e:
                        self.errors.append(f"{key}: {e}")
                    time.sleep(self.pause)
        except MetaError as e:
            self.errors.append(f"connect: {e}")
        finally:
            self.elapsed = round(time.monotonic() - started, 2)


def test_forged_frames_from_a_non_member_change_no_term_and_no_leader(cluster: SafetyCluster) -> None:
    c = cluster
    c.start(3)
    leader = wait_until(c.leader, 20, "a leader")
    wait_caught_up(c, [1, 2, 3], 20)
    before = {i: c.admin(i).status() for i in (1, 2, 3)}
    term0 = before[leader]["current_term"]
    assert all(st["current_term"] == term0 for st in before.values()), before
    cluster_id = before[leader]["cluster_id"]  # unauthenticated: anyone can read it

    writer = Writer(c.client_addresses(), "w", count=150, pause=0.02, stop_at=time.monotonic() + 30)
    writer.start()
    rounds = 0
    terms_seen: dict[int, set[int]] = {i: set() for i in (1, 2, 3)}
    leaders_seen: set[int | None] = set()
    deadline = time.monotonic() + 30
    while (writer.is_alive() or rounds < 20) and time.monotonic() < deadline and rounds < 400:
        rounds += 1
        term = term0 + 100_000 * rounds  # always above whatever a node may have adopted
        for i in (1, 2, 3):
            for fr in forged_frames(term, i):
                send_forged(c.raft_address(i), FORGED_ID, cluster_id, [fr])
        for i in (1, 2, 3):
            st = status_or_none(c, i)
            if st is not None:
                terms_seen[i].add(st["current_term"])
                if st["is_leader"]:
                    leaders_seen.add(i)
        time.sleep(0.1)
    writer.join(40)
    after = {i: c.admin(i).status() for i in (1, 2, 3)}
    report = {
        "rounds of forged frames": rounds, "term before": term0, "leader before": leader,
        "terms seen per node": {i: sorted(t)[:3] + (["..."] if len(t) > 3 else []) for i, t in terms_seen.items()},
        "terms after": {i: st["current_term"] for i, st in after.items()},
        "leaders seen": sorted(x for x in leaders_seen if x is not None),
        "writes acknowledged": len(writer.acked), "write errors": len(writer.errors),
        "first write errors": writer.errors[:3], "writer seconds": writer.elapsed,
    }
    print(json.dumps(report, indent=1))
    assert not writer.is_alive(), f"the writer did not finish within 40 s: {report}"
    assert all(t == {term0} for t in terms_seen.values()), f"a forged frame moved a term: {report}"
    assert leaders_seen == {leader}, f"the leadership changed: {report}"
    assert all(st["current_term"] == term0 for st in after.values()), report
    assert len(writer.acked) == 150 and not writer.errors, f"writes failed: {report}"


def test_unasked_responses_in_the_name_of_a_member_change_no_term_and_no_leader(cluster: SafetyCluster) -> None:
    """A hello claiming a member's id (no authentication yet): responses nobody asked for
    move no term and no leader: any response with a huge term to a follower (which asked
    nobody anything), and answers of the current term to the leader (votes it did not ask
    for, an append response past its log, a heartbeat response to a round it never
    started). The leader never believes a peer holds entries past its own log."""
    c = cluster
    c.start(3)
    leader = wait_until(c.leader, 20, "a leader")
    g, f = (i for i in (1, 2, 3) if i != leader)
    wait_caught_up(c, [1, 2, 3], 20)
    before = {i: c.admin(i).status() for i in (1, 2, 3)}
    term0 = before[leader]["current_term"]
    cluster_id = before[leader]["cluster_id"]

    def unasked(rounds: int) -> dict[int, list[Any]]:
        """Frames from g, by destination."""
        big = term0 + 100_000 * rounds
        return {
            # The leader did ask g (heartbeats, appends): a newer term in g's answer may be
            # true, so only answers of our term here.
            leader: [
                VoteResponse(term0, g, leader, granted=True),
                VoteResponse(term0, g, leader, granted=True, pre_vote=True),
                AppendResponse(term0, g, leader, success=True, index=10**9),  # past the leader's log
                HeartbeatResponse(term0, g, leader, ctx=10**9),
            ],
            f: [  # a follower asked g for nothing
                VoteResponse(big, g, f, granted=False),
                VoteResponse(big, g, f, granted=True, pre_vote=True),
                HeartbeatResponse(big, g, f),
                AppendResponse(big, g, f, success=False, index=0),
                AppendResponse(big, g, f, success=True, index=10**9),
            ],
        }

    writer = Writer(c.client_addresses(), "m", count=150, pause=0.02, stop_at=time.monotonic() + 30)
    writer.start()
    rounds = 0
    terms_seen: dict[int, set[int]] = {i: set() for i in (1, 2, 3)}
    leaders_seen: set[int] = set()
    overshoot: list[tuple[int, int]] = []  # (leader's view of g, leader's last log index)
    deadline = time.monotonic() + 30
    while (writer.is_alive() or rounds < 20) and time.monotonic() < deadline and rounds < 400:
        rounds += 1
        for dst, frames in unasked(rounds).items():
            for fr in frames:
                send_forged(c.raft_address(dst), g, cluster_id, [fr])
        for i in (1, 2, 3):
            st = status_or_none(c, i)
            if st is not None:
                terms_seen[i].add(st["current_term"])
                if st["is_leader"]:
                    leaders_seen.add(i)
                    if matched(st, g) > st["last_log_index"]:
                        overshoot.append((matched(st, g), st["last_log_index"]))
        time.sleep(0.1)
    writer.join(40)
    after = {i: c.admin(i).status() for i in (1, 2, 3)}
    report = {
        "rounds": rounds, "term before": term0, "leader before": leader, "impersonated": g,
        "terms seen per node": {i: sorted(t)[:3] + (["..."] if len(t) > 3 else []) for i, t in terms_seen.items()},
        "terms after": {i: st["current_term"] for i, st in after.items()},
        "leaders seen": sorted(leaders_seen), "leader's view of g past its own log": overshoot[:3],
        "writes acknowledged": len(writer.acked), "write errors": len(writer.errors),
        "first write errors": writer.errors[:3], "writer seconds": writer.elapsed,
    }
    print(json.dumps(report, indent=1))
    assert not writer.is_alive(), f"the writer did not finish within 40 s: {report}"
    assert all(t == {term0} for t in terms_seen.values()), f"an unasked response moved a term: {report}"
    assert leaders_seen == {leader}, f"the leadership changed: {report}"
    assert not overshoot, f"the leader believes {g} holds entries past its own log: {report}"
    assert len(writer.acked) == 150 and not writer.errors, f"writes failed: {report}"
    # g itself, the real one, still follows and has everything.
    sts = wait_caught_up(c, [1, 2, 3], 20)
    assert all(st["current_term"] == term0 for st in sts.values()), sts


# --------------------------------------------------------------------------------------
# 3. A follower whose log comes back shorter than what it acknowledged
# --------------------------------------------------------------------------------------

CUT_BYTES = 200


def warnings_with(log_file: Path, start: int, word: str) -> list[str]:
    """The WARNING (or worse) lines of a node's log file after byte `start` that contain
    `word` (the file is JSON lines by default; text lines are matched too)."""
    if not log_file.exists():
        return []
    with log_file.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            level, message = str(rec.get("level", "")), str(rec.get("message", ""))
        except ValueError:
            level, message = line, line
        if any(lv in level for lv in ("WARN", "ERROR", "CRITICAL")) and word in message:
            found.append(message)
    return found


def last_entry_index(segment: Path) -> int:
    """The index of the last entry in the intact records of a WAL segment (layout in
    docs/reference/data-dir.md: ``[1, first_index, [item, ...]]`` is a batch of entries);
    0 if it holds none. A torn last record is ignored, as the node does on open."""
    bodies, _damage = records.split(segment.read_bytes())
    last = 0
    for _offset, body in bodies:
        rec = msgpack.unpackb(bytes(body), raw=False, strict_map_key=False)
        if rec[0] == 1 and rec[2]:
            last = rec[1] + len(rec[2]) - 1  # a batch at or below the last replaces the suffix
    return last


def test_a_follower_whose_wal_lost_its_tail_catches_up_on_a_quiet_cluster(cluster: SafetyCluster) -> None:
    c = cluster
    c.start(3)
    leader = wait_until(c.leader, 20, "a leader")
    f = max(i for i in (1, 2, 3) if i != leader)
    acked: dict[str, tuple[int, bytes]] = {}
    write_keys([client_address(c, leader)], [f"q{n:04d}" for n in range(40)], acked)
    sts = wait_caught_up(c, [1, 2, 3], 20)
    f_last_before = sts[f]["last_log_index"]
    believed = wait_until(lambda: matched(c.admin(leader).status(), f) >= f_last_before, 10,
                          f"the leader to see {f} match {f_last_before}")
    assert believed

    # Power loss on F, and its disk loses the last writes it had acknowledged.
    c.procs[f].kill()
    segments = sorted((c.root / f"data{f}" / "wal").glob("*.wal"))
    assert segments, f"no WAL segment in data{f}/wal"
    newest = segments[-1]
    # Where its records end: the file goes on with preallocated zeros (wal.py).
    size = wal.split_segment(newest.read_bytes())[2]
    assert size > CUT_BYTES + 1000, f"{newest} holds only {size} bytes of records"
    with newest.open("r+b") as fh:
        fh.truncate(size - CUT_BYTES)
    f_last_after = last_entry_index(newest)
    # The harness's own precondition: the cut did remove acknowledged entries.
    assert 0 < f_last_after < f_last_before, f"the cut left entries up to {f_last_after} of {f_last_before}"
    log_file = c.root / f"logs{f}" / f"metanode-{f}.log"
    log_start = log_file.stat().st_size if log_file.exists() else 0
    c.restart(f)
    c.wait_healthy(f)
    restarted = time.monotonic()

    # A quiet cluster: one write a second, at most 25.
    samples: list[dict] = []
    caught_up_after: float | None = None
    with SyncMetaClient([client_address(c, leader)], timeout=10) as cl:
        for n in range(25):
            tick = time.monotonic()
            ch = cl.upsert(f"s{n:04d}", f"s{n:04d}".encode())
            assert ch.result is not None
            acked[f"s{n:04d}"] = (ch.result.seq, ch.result.data)
            time.sleep(0.3)
            st_l = c.admin(leader).status()  # the leader first: F's log only grows after
            st_f = c.admin(f).status()
            since = round(time.monotonic() - restarted, 2)
            samples.append({"t": since, "leader applied": applied(st_l), "leader's view of F": matched(st_l, f),
                            "F last_log_index": st_f["last_log_index"], "F applied": applied(st_f)})
            if caught_up_after is None and applied(st_f) >= applied(st_l):
                caught_up_after = since
            if caught_up_after is not None and since > 8:
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    probed = [s for s in samples if s["t"] >= 1.5]  # a few heartbeats after the restart
    overshoot = [s for s in probed if s["leader's view of F"] > s["F last_log_index"]]
    lost_warnings = warnings_with(log_file, log_start, "lost")
    report = {
        "leader": leader, "follower": f, "F last_log_index before the cut": f_last_before,
        "F's WAL ends at (after the cut)": f_last_after, "caught up after (s)": caught_up_after,
        "first samples": samples[:3], "last sample": samples[-1],
        "samples where the leader's view of F exceeds F's log": len(overshoot), "of": len(probed),
        "'lost' warnings": lost_warnings[:2],
    }
    print(json.dumps(report, indent=1))
    assert caught_up_after is not None and caught_up_after <= 10, f"F did not catch up within 10 s: {report}"
    assert not overshoot, f"the leader believes F matches past F's log: {report}"
    assert lost_warnings, f"F logged no WARNING saying it lost acknowledged entries: {report}"
    # And F holds exactly what the leader holds.
    sts = wait_caught_up(c, [1, 2, 3], 20)
    assert read_local(c, f, "") == read_local(c, leader, ""), "F diverges from the leader"
    assert not lost_writes({k: _SeqV(*v) for k, v in read_local(c, f, "").items()}, acked)
