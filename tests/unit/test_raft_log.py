"""The in-memory raft log (RaftLog) and a core's restart from its persisted state.

Reference: thesis §3.5 (log matching, term runs), §3.8 (persisted state), §5.1
(compaction, InstallSnapshot, restart from a snapshot), §10.2 (stable vs. unstable tail,
batching).
"""

from __future__ import annotations

import pytest

from metanode.errors import RaftInvariantError
from metanode.raft import HardState, Membership, PersistedState, Role, Snapshot, SnapshotMeta
from metanode.raft.log import RaftLog
from metanode.raft.types import ZERO_LOG_ID, LogId
from tests.unit.raft_helpers import conf, drain, entry, new_core, noop, state_with, take, view


def make_log(*terms: int, purged: LogId = ZERO_LOG_ID, commit: int = 0, applied: int = 0) -> RaftLog:
    """A log after `purged` whose entries have these terms, one byte of data each."""
    first = purged.index + 1
    return RaftLog(purged, [entry(t, first + i) for i, t in enumerate(terms)], commit, applied)


# ---------------------------------------------------------------- reading


def test_term_at_knows_the_purge_point_and_nothing_outside_the_log():
    """§5.1: after compaction the log still knows the id of its last purged entry
    (prevLogTerm of the first retained entry); anything before it or past the end is
    unknown."""
    lg = make_log(2, 2, 3, purged=LogId(2, 4), commit=4, applied=4)
    assert (lg.first_index, lg.last_index, lg.last_log_id) == (5, 7, LogId(3, 7))
    assert lg.term_at(4) == 2  # the purge point
    assert [lg.term_at(i) for i in (5, 6, 7)] == [2, 2, 3]
    assert lg.term_at(3) is None
    assert lg.term_at(8) is None
    empty = RaftLog(ZERO_LOG_ID, [], 0, 0)
    assert empty.term_at(0) == 0 and empty.last_log_id == ZERO_LOG_ID


def test_matches_compares_term_and_index():
    """§3.5 (Log Matching): two entries with the same index and term are the same."""
    lg = make_log(1, 2, 2)
    assert lg.matches(LogId(2, 3))
    assert lg.matches(ZERO_LOG_ID)
    assert not lg.matches(LogId(1, 3))
    assert not lg.matches(LogId(2, 4))


def test_is_up_to_date_compares_last_term_then_length():
    """§3.6.1: the log whose last entry has the later term is more up-to-date; with equal
    terms, the longer log."""
    lg = make_log(1, 2, 2)
    assert lg.is_up_to_date(LogId(2, 3))
    assert lg.is_up_to_date(LogId(2, 4))
    assert lg.is_up_to_date(LogId(3, 1))
    assert not lg.is_up_to_date(LogId(2, 2))
    assert not lg.is_up_to_date(LogId(1, 9))


def test_slice_respects_count_and_bytes_but_returns_at_least_one_entry():
    """§10.2.2 (batching bounds): an AppendEntries carries at most `max_count` entries and
    about `max_bytes`; a single entry larger than the limit still goes alone."""
    lg = RaftLog(ZERO_LOG_ID, [entry(1, i, b"x" * 100) for i in range(1, 6)], 0, 0)
    assert [e.index for e in lg.slice(2, 6, 10, 1 << 20)] == [2, 3, 4, 5]
    assert [e.index for e in lg.slice(2, 6, 2, 1 << 20)] == [2, 3]
    assert [e.index for e in lg.slice(2, 4, 10, 1 << 20)] == [2, 3]
    assert [e.index for e in lg.slice(1, 6, 10, 300)] == [1, 2]  # 132 bytes each
    assert [e.index for e in lg.slice(1, 6, 10, 1)] == [1]
    assert lg.slice(6, 6, 10, 1 << 20) == []


def test_first_index_of_term_finds_the_start_of_a_term_run():
    """§3.5 (fast back-off): the follower hints the first index it holds of the
    conflicting term; the run is cut at the purge point."""
    lg = make_log(1, 2, 2, 2, 4, 4)
    assert [lg.first_index_of_term(i) for i in range(1, 7)] == [1, 2, 2, 2, 5, 5]
    purged = make_log(2, 2, 3, purged=LogId(2, 4), commit=4, applied=4)
    assert purged.first_index_of_term(6) == 5


def test_last_index_of_term_finds_the_end_of_a_term_run():
    """§3.5 (fast back-off): the leader retries after its last entry of the follower's
    conflicting term, when it has one."""
    lg = make_log(1, 2, 2, 4, 4)
    assert lg.last_index_of_term(2, 5) == 3
    assert lg.last_index_of_term(2, 2) == 2
    assert lg.last_index_of_term(4, 9) == 5
    assert lg.last_index_of_term(3, 5) is None  # no entry of term 3
    assert lg.last_index_of_term(5, 5) is None
    assert lg.last_index_of_term(1, 5) == 1
    purged = make_log(3, 3, purged=LogId(2, 4), commit=4, applied=4)
    assert purged.last_index_of_term(2, 6) == 4  # the purge point itself
    assert purged.last_index_of_term(1, 6) is None


# ---------------------------------------------------------------- writing


def test_append_cuts_the_suffix_from_the_first_new_index():
    """§3.5: appending at index i replaces the entries from i on; the unstable tail (to
    be persisted) starts there."""
    lg = make_log(1, 2, 2, 2)
    lg.append([entry(3, 3), entry(3, 4), entry(3, 5)])
    assert [str(e.log_id) for e in lg.entries] == ["1-1", "2-2", "3-3", "3-4", "3-5"]
    assert lg.stable == 2
    assert [e.index for e in lg.unstable()] == [3, 4, 5]


def test_append_refuses_gaps_and_committed_or_purged_indexes():
    """§3.6 (Leader Completeness) and §3.5: a committed entry is never replaced and a log
    has no holes; breaking either is our own bug."""
    lg = make_log(1, 2, 2, purged=LogId(1, 1), commit=3, applied=2)
    with pytest.raises(RaftInvariantError):
        lg.append([entry(2, 6)])  # gap after 4
    with pytest.raises(RaftInvariantError):
        lg.append([entry(3, 3)])  # committed
    with pytest.raises(RaftInvariantError):
        lg.append([entry(3, 1)])  # purged
    lg.append([entry(3, 4)])
    assert lg.last_log_id == LogId(3, 4)


def test_stable_to_ignores_an_entry_that_was_replaced():
    """§10.2.1: an acknowledgement from the disk for an entry that was since replaced
    (same index, other term) does not make the new entry stable."""
    lg = make_log(1, 2)
    lg.append([entry(2, 3)])
    lg.append([entry(3, 3)])
    lg.stable_to(LogId(2, 3))
    assert lg.stable == 2
    lg.stable_to(LogId(3, 3))
    assert lg.stable == 3


def test_to_apply_is_bounded_by_commit_persistence_and_batch_size():
    """§3.5 / §10.2.1: only committed entries that are on disk are applied, in order."""
    lg = make_log(1, 1, 1, 1, 1, commit=4, applied=1)
    lg.append([entry(2, 5)])
    lg.commit = 5
    assert [e.index for e in lg.to_apply(10)] == [2, 3, 4]  # 5 is not on disk yet
    assert [e.index for e in lg.to_apply(2)] == [2, 3]
    lg.stable_to(LogId(2, 5))
    assert [e.index for e in lg.to_apply(10)] == [2, 3, 4, 5]


def test_purge_drops_applied_entries_and_remembers_the_last_id():
    """§5.1: compaction discards entries covered by the snapshot, only applied ones."""
    lg = make_log(1, 2, 2, 3, commit=4, applied=3)
    lg.purge(2)
    assert lg.purged == LogId(2, 2) and lg.first_index == 3
    lg.purge(1)  # already gone: nothing
    assert lg.purged == LogId(2, 2)
    with pytest.raises(RaftInvariantError):
        lg.purge(4)


def test_data_bytes_follows_appends_truncates_purges_and_restores():
    """The payload bytes a status poll reports are kept up to date, not summed per
    poll: after each change they equal the sum over the entries held."""
    lg = RaftLog(ZERO_LOG_ID, [entry(1, i, b"x" * i) for i in range(1, 6)], 0, 0)

    def held() -> int:
        return sum(len(e.data) for e in lg.entries)

    assert lg.data_bytes == held() == 15
    lg.append([entry(1, 6, b"y" * 10), entry(1, 7, b"")])
    assert lg.data_bytes == held() == 25
    lg.append([entry(2, 4, b"z" * 3)])  # a conflicting suffix from 4 on is cut
    assert lg.data_bytes == held() == 1 + 2 + 3 + 3
    lg.commit = lg.applied = 3
    lg.purge(2)
    assert lg.data_bytes == held() == 3 + 3
    lg.restore(Snapshot(SnapshotMeta(LogId(4, 9), Membership.of((1, 2))), b"s"))
    assert lg.data_bytes == held() == 0
    lg.append([entry(4, 10, b"abc")])
    assert lg.data_bytes == held() == 3


def test_restore_resets_the_log_to_a_snapshot():
    """§5.1 (Figure 5.3): a follower installing a snapshot discards its log; everything up to the
    snapshot's last entry is committed and applied."""
    lg = make_log(1, 2, 2, commit=1, applied=1)
    snap = Snapshot(SnapshotMeta(LogId(4, 9), Membership.of((1, 2))), b"s")
    lg.restore(snap)
    assert (lg.purged, lg.last_log_id, lg.commit, lg.applied, lg.stable) == (LogId(4, 9), LogId(4, 9), 9, 9, 9)
    assert lg.entries == [] and lg.snapshot is snap


def test_a_log_must_start_right_after_its_purge_point_and_go_up():
    """§3.5: indexes are consecutive and terms never decrease along the log."""
    with pytest.raises(RaftInvariantError):
        RaftLog(LogId(1, 1), [entry(1, 3)], 0, 0)
    with pytest.raises(RaftInvariantError):
        RaftLog(ZERO_LOG_ID, [entry(2, 1), entry(1, 2)], 0, 0)


# ---------------------------------------------------------------- restart (§3.8, §5.1)

M0 = Membership.of((1, 2, 3))
M1 = Membership.of((1, 2, 3), learners=(4,))
M2 = Membership(((1, 2, 3), (1, 2, 3, 4)))


def test_a_core_restarts_from_its_snapshot_log_and_hard_state():
    """§3.8 and §5.1: on restart a server reloads term, vote and commit, its snapshot
    and the log after it; the latest configuration in the log is in effect (§4.1), and
    the committed entries after the snapshot are applied again."""
    state = PersistedState(
        HardState(term=4, vote=2, commit=8),
        Snapshot(SnapshotMeta(LogId(2, 5), M0), b"sm"),
        (entry(2, 6), conf(3, 7, (1, 2, 3), learners=(4,)), entry(3, 8), conf(3, 9, (1, 2, 3), (1, 2, 3, 4))),
        LogId(2, 5),
    )
    core = new_core(1, state=state)
    status = core.status()
    assert (status.role, status.term, status.vote, status.leader) == (Role.FOLLOWER, 4, 2, None)
    assert (status.commit, status.applied, status.purged, status.last_log_id) == (8, 5, LogId(2, 5), LogId(3, 9))
    assert status.snapshot_last_log_id == LogId(2, 5)
    assert core.membership == M2
    assert core.committed_membership == M1
    assert core.membership_at(6) == M0
    assert view(take(core)) == {"committed": ["2-6:1B", "3-7:conf{1,2,3}+learners{4}", "3-8:1B"]}
    assert not core.has_ready()


def test_a_core_restarted_without_a_snapshot_applies_the_log_from_the_start():
    """§3.8: the state machine is volatile; without a snapshot every committed entry is
    applied again from index 1."""
    core = new_core(2, state=state_with([noop(2, 2), entry(2, 3), entry(2, 4)], term=2, commit=3, vote=1))
    assert (core.term, core.vote, core.commit_index) == (2, 1, 3)
    assert view(take(core)) == {"committed": ["1-1:conf{1,2,3}", "2-2:noop", "2-3:1B"]}
    assert not core.has_ready()


def test_a_core_restarted_from_a_snapshot_alone_starts_after_it():
    """§5.1: a snapshot with no log after it (just installed) is the whole state: the
    log is empty after the snapshot's last entry, which is committed."""
    snap = Snapshot(SnapshotMeta(LogId(3, 7), M1), b"sm")
    core = new_core(4, state=PersistedState(HardState(3, None, 2), snap))
    assert core.log.last_log_id == LogId(3, 7) and core.commit_index == 7
    assert core.membership == core.committed_membership == M1
    assert not core.has_ready()
    drain(core)


def test_a_restart_keeps_log_entries_behind_the_snapshot():
    """§5.1 with max_applied_log_to_keep: entries behind the snapshot stay in the log
    (for followers a little behind); configurations among them are older than the
    snapshot's and do not become the latest."""
    snap = Snapshot(SnapshotMeta(LogId(3, 7), M1), b"sm")
    entries = (conf(3, 5, (1, 2, 3)), entry(3, 6), entry(3, 7), entry(3, 8))
    core = new_core(1, state=PersistedState(HardState(3, None, 8), snap, entries, LogId(2, 4)))
    assert core.log.purged == LogId(2, 4) and core.log.last_log_id == LogId(3, 8)
    assert core.membership == M1
    assert view(take(core)) == {"committed": ["3-8:1B"]}


def test_a_restart_after_a_crash_during_a_snapshot_install_trusts_the_snapshot():
    """§5.1 (Figure 5.3 steps 6-7): when the log does not hold the snapshot's last entry
    (the crash came between writing the snapshot and cutting the log), the log is
    discarded and the snapshot is the whole state."""
    snap = Snapshot(SnapshotMeta(LogId(3, 9), M1), b"sm")
    behind = state_with([entry(2, 2), entry(2, 3)], term=3, commit=3)
    stale = PersistedState(behind.hard_state, snap, behind.entries)
    core = new_core(1, state=stale)
    assert core.log.purged == LogId(3, 9) and core.log.last_log_id == LogId(3, 9)
    assert (core.commit_index, core.log.applied) == (9, 9)
    conflicting = PersistedState(behind.hard_state, snap, behind.entries + tuple(entry(2, i) for i in range(4, 12)))
    core = new_core(1, state=conflicting)
    assert core.log.last_log_id == LogId(3, 9) and core.membership == M1
    assert not core.has_ready()
