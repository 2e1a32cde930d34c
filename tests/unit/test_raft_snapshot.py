"""Log compaction and InstallSnapshot in the pure raft core (thesis §5.1 and its Figure 5.3).

InstallSnapshot is specified in §5.1 (Figure 5.3), with memory-based snapshots.
"""

from __future__ import annotations

import pytest

from metanode.errors import RaftInvariantError
from metanode.raft import Membership, Snapshot, SnapshotMeta
from metanode.raft.messages import SnapshotRequest, SnapshotResponse
from metanode.raft.progress import ProgressState
from metanode.raft.types import LogId
from tests.unit.raft_helpers import (
    drain,
    leader_net,
    new_core,
    noop,
    state_with,
    take,
    to,
    view,
)

DATA = b"0123456789"
CHUNK = 4
META = SnapshotMeta(LogId(2, 5), Membership.of((1, 2, 3, 4)))


def lagging_net(**config):
    """Leader 1 compacted its log through 2-5 while 3 was cut off at 2-2; 2-6 follows.
    The leader's progress of 3 is about to probe below the purge point."""
    n = leader_net(**{"snapshot_chunk_size": CHUNK, "snapshot_timeout_ticks": 5, **config})
    c1 = n[1]
    for data in (b"a", b"b", b"c"):
        c1.propose(data)
    n.stabilize(cut=(3,))
    c1.compact(Snapshot(SnapshotMeta(LogId(2, 5), c1.membership), DATA), 5)
    c1.propose(b"d")
    n.stabilize(cut=(3,))
    assert c1.log.purged == LogId(2, 5) and c1.log.last_log_id == LogId(2, 6)
    # Two heartbeat answers without progress: the leader looks for 3's match again.
    for _ in range(2):
        c1.tick()
        n.flush(1)
        n.round_trip(2, 3)
    n.transcript.clear()
    return n  # the first chunk waits in the leader's next Ready


def receiver(commit: int = 2):
    """Node 3 at term 2 holding 1-1, 2-2 (committed up to `commit`), led by 1."""
    core = new_core(3, state=state_with([noop(2, 2)], term=2, commit=commit))
    drain(core)
    return core


def chunk(offset: int, size: int = CHUNK, meta: SnapshotMeta = META) -> SnapshotRequest:
    data = DATA[offset : offset + size]
    return SnapshotRequest(2, 1, 3, meta, offset, data, offset + len(data) >= len(DATA))


def test_a_follower_needing_purged_entries_gets_the_snapshot_one_chunk_at_a_time():
    """§5.1 (Figure 5.3): a follower whose next entry was compacted away is sent the snapshot in
    chunks; each chunk goes out after the previous one was acknowledged, and the answer
    names the offset expected next."""
    n = lagging_net()
    c1 = n[1]
    pr = c1.progress[3]
    assert pr.state is ProgressState.SNAPSHOT
    assert n.flush(1) == ["1->3 snap t2 last=2-5 @0+4"]
    n.deliver()
    assert n.flush(3) == ["3->1 snap_resp t2 last=2-5 next@4"]
    n.deliver()
    assert n.flush(1) == ["1->3 snap t2 last=2-5 @4+4"]
    n.deliver()
    assert n.flush(3) == ["3->1 snap_resp t2 last=2-5 next@8"]
    n.deliver()
    assert n.flush(1) == ["1->3 snap t2 last=2-5 @8+2 done"]


def test_after_the_install_the_leader_resumes_with_appends():
    """§5.1 (Figure 5.3): once the follower reports the snapshot installed, its match is the
    snapshot's last index and the leader sends the entries after it."""
    n = lagging_net()
    c1 = n[1]
    n.stabilize()
    assert n.transcript == [
        "1->3 snap t2 last=2-5 @0+4",
        "3->1 snap_resp t2 last=2-5 next@4",
        "1->3 snap t2 last=2-5 @4+4",
        "3->1 snap_resp t2 last=2-5 next@8",
        "1->3 snap t2 last=2-5 @8+2 done",
        "3->1 snap_resp t2 last=2-5 next@10 done",
        "1->3 append t2 prev=2-5 [6..6] c6",
        "3->1 append_resp t2 ok 6",
    ]
    assert c1.progress[3].state is ProgressState.REPLICATE
    assert c1.status().matched[3] == 6
    assert n[3].log.last_log_id == LogId(2, 6) and n[3].commit_index == 6


def test_the_follower_installs_the_snapshot_on_its_last_chunk():
    """§5.1 (Figure 5.3): the follower assembles the chunks, and on the last one
    replaces its log with the snapshot: its commit index and membership are the
    snapshot's. The runtime gets the snapshot in the Ready, with the answer."""
    core = receiver()
    core.step(chunk(0))
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-5 next@4"]}
    core.step(chunk(4))
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-5 next@8"]}
    assert core.log.last_log_id == LogId(2, 2)  # nothing changes before the last chunk
    core.step(chunk(8))
    assert view(take(core)) == {
        "hs": (2, None, 5),
        "snapshot": "2-5 {1,2,3,4} b'0123456789'",
        "msgs": ["3->1 snap_resp t2 last=2-5 next@10 done"],
    }
    status = core.status()
    assert (status.last_log_id, status.purged, status.commit, status.applied) == (LogId(2, 5), LogId(2, 5), 5, 5)
    assert status.snapshot_last_log_id == LogId(2, 5)
    assert core.membership == core.committed_membership == Membership.of((1, 2, 3, 4))
    assert not core.has_ready()


def test_a_chunk_at_the_wrong_offset_is_answered_with_the_offset_expected():
    """§5.1 (Figure 5.3): chunks are written at their offset in order; a chunk out of order (lost
    or reordered) is not used, and the answer tells the leader where to resume."""
    core = receiver()
    core.step(chunk(4))  # nothing received yet
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-5 next@0"]}
    core.step(chunk(0))
    take(core)
    core.step(chunk(8))  # 4..7 missing
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-5 next@4"]}
    other = SnapshotMeta(LogId(2, 6), META.membership)
    core.step(chunk(4, meta=other))  # a chunk of another snapshot
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-6 next@0"]}
    assert core.log.last_log_id == LogId(2, 2)


def test_a_first_chunk_restarts_the_reception():
    """§5.1 (Figure 5.3): "create new snapshot file if first chunk (offset is 0)"."""
    core = receiver()
    core.step(chunk(0))
    core.step(chunk(4))
    core.step(chunk(0))
    drain(core)
    core.step(chunk(8))
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-5 next@4"]}


def test_a_snapshot_the_follower_already_covers_is_answered_done_without_installing():
    """§5.1 (Figure 5.3): a snapshot that holds nothing past the follower's commit index is not
    installed (it would only lose entries); the follower says it is done."""
    core = receiver(commit=2)
    old = SnapshotMeta(LogId(2, 2), Membership.of((1, 2, 3)))
    core.step(SnapshotRequest(2, 1, 3, old, 0, b"xy", True))
    assert view(take(core)) == {"msgs": ["3->1 snap_resp t2 last=2-2 next@0 done"]}
    assert core.log.last_log_id == LogId(2, 2)
    assert core.log.snapshot is None


def test_a_lost_chunk_is_sent_again_after_the_snapshot_timeout():
    """§5.1 (Figure 5.3): the leader retries InstallSnapshot like any RPC: an unacknowledged chunk is
    resent after `snapshot_timeout_ticks`."""
    n = lagging_net()
    c1 = n[1]
    n.flush(1)
    assert n.drop(to(3)) == ["1->3 snap t2 last=2-5 @0+4"]
    for _ in range(4):
        c1.tick()
        assert n.flush(1) == ["1->2 hb t2 c6 ctx0", "1->3 hb t2 c2 ctx0"]
        n.drop()
    c1.tick()
    assert n.flush(1) == ["1->3 snap t2 last=2-5 @0+4", "1->2 hb t2 c6 ctx0", "1->3 hb t2 c2 ctx0"]


def test_a_lost_chunk_is_sent_again_when_heartbeats_come_back_without_its_answer():
    """A heartbeat sent after the chunk is answered on the same ordered stream, the chunk is
    not: it was lost (the link was down when it went out, say the follower had just
    restarted). The leader resends it then, without waiting out the snapshot timeout
    (found by the robustness suite: writes stalled 4 s on a 3 KB snapshot)."""
    n = lagging_net(snapshot_timeout_ticks=40)
    c1 = n[1]
    n.flush(1)
    assert n.drop(to(3)) == ["1->3 snap t2 last=2-5 @0+4"]
    c1.tick()
    assert n.flush(1) == ["1->2 hb t2 c6 ctx0", "1->3 hb t2 c2 ctx0"]
    n.round_trip(2, 3)  # one heartbeat period: the chunk's answer may still be on its way
    assert n.flush(1) == []
    c1.tick()
    assert n.flush(1) == ["1->2 hb t2 c6 ctx0", "1->3 hb t2 c2 ctx0"]
    n.round_trip(2, 3)
    assert n.flush(1) == ["1->3 snap t2 last=2-5 @0+4"]
    n.stabilize()
    assert c1.progress[3].state is ProgressState.REPLICATE and n[3].commit_index == 6


def test_the_fast_resend_is_once_per_chunk():
    """A follower that keeps dropping the chunk (no room to install it) gets it again only
    every snapshot timeout, not on every heartbeat answer."""
    n = lagging_net(snapshot_timeout_ticks=40)
    c1 = n[1]
    sent = []
    for _ in range(12):
        c1.tick()
        out = n.flush(1)
        sent += [m for m in out if " snap " in m]
        n.drop(lambda m: isinstance(m, SnapshotRequest))
        n.round_trip(2, 3)
        sent += [m for m in n.flush(1) if " snap " in m]
        n.drop(lambda m: isinstance(m, SnapshotRequest))
    # the first send (in the first Ready), and one fast resend
    assert sent == ["1->3 snap t2 last=2-5 @0+4"] * 2, sent


def test_a_snapshot_answer_for_another_snapshot_is_ignored():
    """§5.1 (Figure 5.3): the leader only acts on answers about the snapshot it is sending."""
    n = lagging_net()
    c1 = n[1]
    n.flush(1)
    n.drop()
    c1.step(SnapshotResponse(2, 3, 1, LogId(2, 4), 4))
    assert not c1.has_ready()
    assert c1.progress[3].snap_offset == 0


def test_compaction_keeps_the_snapshot_and_drops_the_log_prefix():
    """§5.1: after a snapshot of the applied state, the entries it covers may go;
    `purge_upto` may keep some for followers that are a little behind."""
    n = leader_net()
    c1 = n[1]
    for data in (b"a", b"b", b"c", b"d"):
        c1.propose(data)
    n.stabilize()
    snap = Snapshot(SnapshotMeta(LogId(2, 5), c1.membership), DATA)
    c1.compact(snap, 4)
    assert c1.log.purged == LogId(2, 4)
    assert c1.log.first_index == 5 and c1.log.last_index == 6
    assert c1.log.snapshot is snap
    assert c1.membership_at(5) == Membership.of((1, 2, 3))
    c1.compact(Snapshot(SnapshotMeta(LogId(2, 3), c1.membership), b"old"), 3)
    assert c1.log.snapshot is snap  # an older snapshot never replaces a newer one
    assert c1.log.purged == LogId(2, 4)


def test_compacting_beyond_the_applied_index_is_our_bug():
    """§5.1: a snapshot is of applied state only; asking otherwise is an invariant
    violation of the runtime, not a peer's nonsense."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    with pytest.raises(RaftInvariantError):
        c1.compact(Snapshot(SnapshotMeta(LogId(2, 3), c1.membership), DATA), 3)


def test_a_log_that_does_not_reach_the_snapshot_is_reset_and_the_runtime_told():
    """A restart whose log ends before the snapshot's last entry (a lost WAL tail, a
    crash during an install): the snapshot wins (§5.1), and `log_reset_to_snapshot`
    tells the runtime to drop the stored entries before it appends after the snapshot
    (else the store sees a gap). Found by the simulator once it ran the daemon's rules."""
    from metanode.raft import HardState, PersistedState, Snapshot, SnapshotMeta
    from metanode.raft.types import Membership
    from tests.unit.raft_helpers import entry, new_core

    snap = Snapshot(SnapshotMeta(LogId(2, 5), Membership.of((1, 2, 3))), b"")
    short = PersistedState(HardState(2, None, 3), snap, (entry(2, 2), entry(2, 3)), LogId(1, 1))
    core = new_core(2, state=short)
    assert core.log_reset_to_snapshot and core.log.purged == LogId(2, 5) and core.log.last_index == 5
    whole = PersistedState(HardState(2, None, 5), snap, tuple(entry(2, i) for i in range(2, 7)), LogId(1, 1))
    core = new_core(2, state=whole)
    assert not core.log_reset_to_snapshot and core.log.last_index == 6
