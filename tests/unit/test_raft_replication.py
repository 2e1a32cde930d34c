"""Log replication and commitment in the pure raft core (thesis §3.5, §3.6.2, §10.2)."""

from __future__ import annotations

import pytest

from metanode.errors import RaftInvariantError
from metanode.raft.core import Role
from metanode.raft.messages import AppendRequest, AppendResponse, Heartbeat, VoteRequest
from metanode.raft.progress import ProgressState
from metanode.raft.types import LogId
from tests.unit.raft_helpers import (
    Net,
    drain,
    entry,
    frm,
    leader_net,
    new_core,
    state_with,
    take,
    to,
    view,
)


def follower(*entries, term: int = 2, commit: int = 1):
    """Node 2 with the bootstrap entry 1-1 then `entries`, everything up to `commit` applied."""
    core = new_core(2, state=state_with(entries, term=term, commit=commit))
    drain(core)
    return core


def entry_lost_to_3() -> Net:
    """Leader 1 of term 2 committed 2-3 with 2; its append to 3 was lost."""
    n = leader_net()
    n[1].propose(b"a")
    n.flush(1)
    assert n.drop(to(3)) == ["1->3 append t2 prev=2-2 [3..3] c2"]
    n.stabilize()
    assert n[1].commit_index == 3
    return n


def test_a_follower_rejects_an_append_whose_prev_does_not_match_with_a_term_hint():
    """§3.5: AppendEntries fails when the follower has no entry matching prevLogIndex and
    prevLogTerm; the answer names the conflicting term and the first index the follower
    holds of it (the fast back-off of §3.5's last paragraphs)."""
    core = follower(entry(2, 2), entry(2, 3), entry(2, 4))
    core.step(AppendRequest(3, 1, 2, LogId(3, 4), (entry(3, 5),), 1))
    assert view(take(core)) == {"hs": (3, None, 1), "msgs": ["2->1 append_resp t3 reject 4 hint=2-2"]}
    assert core.log.last_log_id == LogId(2, 4)


def test_a_follower_with_a_short_log_hints_its_next_index():
    """§3.5: when the follower's log is too short to hold prevLogIndex, the hint is the
    index just past its last entry (no term)."""
    core = follower(entry(2, 2), term=2)
    core.step(AppendRequest(2, 1, 2, LogId(2, 7), (entry(2, 8),), 1))
    assert view(take(core)) == {"msgs": ["2->1 append_resp t2 reject 7 hint=0-3"]}


def test_the_leader_backs_off_a_whole_term_at_a_time():
    """§3.5: with the hint the leader skips every entry of the conflicting term in one
    round trip instead of one index per rejection."""
    a = state_with([entry(3, i) for i in range(2, 7)], term=3, commit=1)
    b = state_with([entry(2, i) for i in range(2, 7)], term=2, commit=1)
    n = Net(states={1: a, 2: b, 3: a})
    n.elect(1)
    assert [t for t in n.transcript if "append" in t and "2" in t.split()[0]] == [
        "1->2 append t4 prev=3-6 [7..7] c1",
        "2->1 append_resp t4 reject 6 hint=2-2",
        "1->2 append t4 prev=1-1 [2..7] c1",
        "2->1 append_resp t4 ok 7",
    ]
    assert n[2].log.last_log_id == LogId(4, 7)


def test_the_leader_retries_after_the_last_entry_it_shares_of_the_hinted_term():
    """§3.5: when the leader also has entries of the follower's conflicting term, it
    retries just after its own last entry of that term."""
    a = state_with([entry(2, 2), entry(2, 3), entry(4, 4)], term=4, commit=1)
    b = state_with([entry(2, 2), entry(2, 3), entry(2, 4), entry(2, 5)], term=2, commit=1)
    n = Net(states={1: a, 2: b, 3: a})
    n.campaign(1)
    n.flush(1)
    n.deliver(to(2))
    assert n.flush(2) == ["2->1 append_resp t5 reject 4 hint=2-2"]
    n.deliver(frm(2))
    assert n.flush(1) == ["1->2 append t5 prev=2-3 [4..5] c1"]


def test_conflicting_uncommitted_entries_are_truncated_and_replaced():
    """§3.5: if an existing entry conflicts with a new one (same index, other term),
    the follower deletes it and all that follow, then appends the leader's."""
    core = follower(entry(2, 2), entry(2, 3), entry(2, 4))
    core.step(AppendRequest(3, 1, 2, LogId(2, 2), (entry(3, 3),), 2))
    assert view(take(core)) == {
        "hs": (3, None, 2),
        "entries": ["3-3:1B"],
        "msgs": ["2->1 append_resp t3 ok 3"],
        "committed": ["2-2:1B"],
    }
    assert core.log.last_log_id == LogId(3, 3)


def test_an_old_append_of_entries_already_held_truncates_nothing():
    """§3.5: only a conflict truncates; a delayed append whose entries the follower
    already has leaves the later entries in place, and the answer says what matched."""
    core = follower(entry(2, 2), entry(2, 3), entry(2, 4))
    core.step(AppendRequest(2, 1, 2, LogId(1, 1), (entry(2, 2),), 1))
    assert view(take(core)) == {"msgs": ["2->1 append_resp t2 ok 2"]}
    assert core.log.last_log_id == LogId(2, 4)


def test_committed_entries_are_never_truncated():
    """§3.6 (Leader Completeness): a committed entry is never replaced. A forged append
    that conflicts with committed entries leaves them alone (a peer's nonsense is
    dropped), and the log itself refuses to cut below its commit index."""
    core = follower(entry(2, 2), entry(2, 3), commit=3)
    core.step(AppendRequest(2, 1, 2, LogId(1, 1), (entry(2, 2, b"other"), entry(2, 3, b"other")), 3))
    assert view(take(core)) == {"msgs": ["2->1 append_resp t2 ok 3"]}
    assert [str(e) for e in core.log.entries] == ["1-1:conf{1,2,3}", "2-2:1B", "2-3:1B"]
    core.step(AppendRequest(2, 1, 2, LogId(1, 1), (entry(9, 2), entry(9, 3)), 3))
    assert not core.has_ready()  # entries of a term newer than the message's: dropped
    with pytest.raises(RaftInvariantError):
        core.log.append([entry(9, 3)])


def test_a_stale_leader_is_told_the_current_term():
    """§3.3: a request from an older term is rejected and carries the current term, so
    that the stale leader steps down."""
    core = follower(entry(2, 2), term=3)
    core.step(AppendRequest(2, 1, 2, LogId(2, 2), (), 2))
    core.step(Heartbeat(2, 1, 2, 2))
    assert view(take(core)) == {
        "msgs": ["2->1 append_resp t3 reject 0 hint=0-0", "2->1 append_resp t3 reject 0 hint=0-0"]
    }
    assert core.commit_index == 1


def test_only_entries_of_the_current_term_commit_by_counting_replicas():
    """§3.6.2 (Figure 3.7): an entry of an older term on a majority is not committed by
    counting; it commits only with an entry of the leader's term stored on a majority."""
    five = (1, 2, 3, 4, 5)
    old = state_with([entry(2, 2)], term=3, commit=1, voters=five)
    other = state_with([entry(3, 2)], term=3, commit=1, voters=five)
    n = Net(five, states={1: old, 2: old, 5: other})
    c1 = n.campaign(1)
    assert c1.term == 4
    assert view(n.ready(1)) == {
        "entries": ["4-3:noop"],
        "msgs": [f"1->{p} append t4 prev=2-2 [3..3] c1" for p in (2, 3, 4, 5)],
    }
    n.drop()
    # 2-2 reaches 1, 2 and 3: a majority of five, but of term 2.
    c1.step(AppendResponse(4, 2, 1, True, 2))
    c1.step(AppendResponse(4, 3, 1, True, 2))
    assert c1.commit_index == 1
    assert view(take(c1)) == {
        "msgs": ["1->2 append t4 prev=2-2 [3..3] c1", "1->3 append t4 prev=2-2 [3..3] c1"]
    }
    # The no-op of term 4 on the same majority commits both.
    c1.step(AppendResponse(4, 2, 1, True, 3))
    c1.step(AppendResponse(4, 3, 1, True, 3))
    assert view(take(c1)) == {"hs": (4, 1, 3), "committed": ["2-2:1B", "4-3:noop"]}


def test_the_leader_counts_its_own_entry_only_once_persisted():
    """§10.2.1: the leader may send entries before they are on its disk, but counts
    itself for commitment only after persisting them (advance). (Our runtime does not
    step the core between take_ready and advance; one writing in parallel would.)"""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    ready = c1.take_ready()
    assert view(ready) == {
        "entries": ["2-3:1B"],
        "msgs": ["1->2 append t2 prev=2-2 [3..3] c2", "1->3 append t2 prev=2-2 [3..3] c2"],
    }
    c1.step(AppendResponse(2, 2, 1, True, 3))  # one follower has it, the leader not yet
    assert c1.commit_index == 2
    c1.advance(ready)
    assert c1.commit_index == 3
    assert view(take(c1)) == {"hs": (2, 1, 3), "committed": ["2-3:1B"]}


def test_a_single_voter_commits_once_its_own_disk_has_the_entry():
    """§10.2.1: alone, the leader's own persisted copy is the majority."""
    core = new_core(1, voters=(1,))
    drain(core)
    for _ in range(20):
        core.tick()
    drain(core)
    core.propose(b"a")
    core.propose(b"bb")
    assert view(take(core)) == {"entries": ["2-3:1B", "2-4:2B"]}
    assert view(take(core)) == {"hs": (2, 1, 4), "committed": ["2-3:1B", "2-4:2B"]}


def test_the_commit_index_reaches_followers_in_appends_and_heartbeats():
    """§3.5: the leader includes its commit index in AppendEntries, heartbeats included;
    a follower then applies what it learns is committed."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    n.stabilize()
    assert c1.commit_index == 3 and n[2].commit_index == 2
    c1.tick()
    assert n.flush(1) == ["1->2 hb t2 c3 ctx0", "1->3 hb t2 c3 ctx0"]
    n.deliver(to(2))
    assert view(n.ready(2)) == {"hs": (2, 1, 3), "msgs": ["2->1 hb_resp t2 ctx0 c3"], "committed": ["2-3:1B"]}
    c1.propose(b"b")
    assert n.flush(1) == ["1->2 append t2 prev=2-3 [4..4] c3", "1->3 append t2 prev=2-3 [4..4] c3"]


def test_a_heartbeat_carries_at_most_the_followers_match_as_commit():
    """§3.5: the leader never tells a follower to commit past what it knows the follower
    holds, since the follower's entries beyond that may still conflict."""
    n = entry_lost_to_3()
    n[1].tick()
    assert n.flush(1) == ["1->2 hb t2 c3 ctx0", "1->3 hb t2 c2 ctx0"]


def test_a_follower_commits_no_further_than_its_own_log():
    """§3.5: commitIndex = min(leaderCommit, index of last new entry). (A heartbeat's
    commit is capped at the follower's match, so one past our log also says we lost
    entries we acknowledged: the follower rejects that index too.)"""
    core = follower(entry(2, 2))
    core.step(Heartbeat(2, 1, 2, 9))
    assert view(take(core)) == {
        "hs": (2, None, 2),
        "msgs": ["2->1 append_resp t2 reject 9 hint=0-3", "2->1 hb_resp t2 ctx0 c2"],
        "committed": ["2-2:1B"],
    }
    core.step(AppendRequest(2, 1, 2, LogId(1, 1), (entry(2, 2),), 9))
    assert core.commit_index == 2


def test_a_probing_leader_sends_one_append_then_replicates_after_a_match():
    """§3.5 (etcd's probe/replicate): until a follower's match is known the leader has
    one append in flight; after the first success it streams without waiting."""
    n = Net()
    c1 = n.campaign(1)
    assert n.flush(1) == ["1->2 append t2 prev=1-1 [2..2] c1", "1->3 append t2 prev=1-1 [2..2] c1"]
    assert c1.progress[2].state is ProgressState.PROBE
    c1.propose(b"a")
    assert view(take(c1)) == {"entries": ["2-3:1B"]}  # probing: nothing more is sent
    n.round_trip(2)
    assert c1.progress[2].state is ProgressState.REPLICATE
    assert n.flush(1) == ["1->2 append t2 prev=2-2 [3..3] c2"]
    c1.propose(b"b")
    assert n.flush(1) == ["1->2 append t2 prev=2-3 [4..4] c2"]  # no wait for the answer


def test_the_inflight_window_limits_appends_to_a_replicating_follower():
    """§10.2.2 (pipelining, bounded): at most `max_inflight` appends are in flight to a
    follower; an acknowledgement opens the window again."""
    n = leader_net(max_inflight=2)
    c1 = n[1]
    sent = []
    for data in (b"a", b"b", b"c", b"d"):
        c1.propose(data)
        sent += n.flush(1)
    assert [m for m in sent if m.startswith("1->2")] == [
        "1->2 append t2 prev=2-2 [3..3] c2",
        "1->2 append t2 prev=2-3 [4..4] c2",
    ]
    n.drop(to(3))
    first = n.inflight[0]
    n.deliver(lambda m: m is first)  # only the first append reaches 2
    n.flush(2)
    n.deliver(frm(2))
    assert n.flush(1) == ["1->2 append t2 prev=2-4 [5..6] c3"]


def test_many_proposals_before_take_ready_share_one_append_per_peer():
    """§10.2.2 (batching): proposals made before the runtime takes a Ready are written
    together and sent in one AppendEntries per follower."""
    n = leader_net()
    c1 = n[1]
    for i in range(5):
        c1.propose(bytes([i]))
    assert view(take(c1)) == {
        "entries": ["2-3:1B", "2-4:1B", "2-5:1B", "2-6:1B", "2-7:1B"],
        "msgs": ["1->2 append t2 prev=2-2 [3..7] c2", "1->3 append t2 prev=2-2 [3..7] c2"],
    }


def test_a_follower_acknowledges_in_the_ready_that_persists_the_entries():
    """§3.8 / §10.2.1: a follower's success answer travels in the same Ready as the
    entries it acknowledges, so the runtime persists them before sending it."""
    core = follower(entry(2, 2), commit=2)
    core.step(AppendRequest(2, 1, 2, LogId(2, 2), (entry(2, 3), entry(2, 4)), 3))
    assert view(take(core)) == {
        "hs": (2, None, 3),
        "entries": ["2-3:1B", "2-4:1B"],
        "msgs": ["2->1 append_resp t2 ok 4"],
    }
    # Committed entries are applied only once persisted: 3 is applied after advance.
    assert view(take(core)) == {"committed": ["2-3:1B"]}


def assert_ignored_by_a_replicating_leader(*answers: AppendResponse) -> None:
    """Leader 1 replicates to 2 (match 3, next 4); `answers` from 2 change nothing."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    n.stabilize()
    pr = c1.progress[2]
    assert (pr.state, pr.match, pr.next) == (ProgressState.REPLICATE, 3, 4)
    for answer in answers:
        c1.step(answer)
    assert not c1.has_ready()
    assert (pr.state, pr.match, pr.next) == (ProgressState.REPLICATE, 3, 4)


def test_stale_responses_are_ignored():
    """§3.5: an answer from an older term, or a rejection of an index the follower
    already acknowledged (it was overtaken by reordering), changes nothing."""
    assert_ignored_by_a_replicating_leader(
        AppendResponse(1, 2, 1, False, 1, 0, 1),  # older term
        AppendResponse(2, 2, 1, False, 2, 1, 2),  # rejection of 2 < match
        AppendResponse(2, 2, 1, True, 2),  # old success
    )


def test_a_rejection_of_the_matched_index_lowers_the_match_and_probes_again():
    """§3.5 assumes disks keep what they acknowledged. A rejection of the matched index
    means the follower no longer holds it (a lost disk tail) or is an old answer: the
    leader must not count the entry for it any more, so it probes from there (an old
    answer costs one probe; counting an entry the follower lost could commit it on a
    minority)."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    n.stabilize()
    pr = c1.progress[2]
    assert (pr.state, pr.match) == (ProgressState.REPLICATE, 3)
    c1.step(AppendResponse(2, 2, 1, False, 3, 0, 3))  # "my log ends at 2"
    assert (pr.state, pr.match, pr.next) == (ProgressState.PROBE, 2, 3)
    assert n.flush(1) == ["1->2 append t2 prev=2-2 [3..3] c3"]
    n.stabilize()
    assert (pr.state, pr.match) == (ProgressState.REPLICATE, 3)


def test_a_term_conflict_below_the_match_trusts_nothing_of_the_follower():
    """A follower that answers with a term conflict at or below what it acknowledged
    has a log unlike the one it acknowledged: its match drops to 0 until a probe finds
    the real one."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    n.stabilize()
    c1.step(AppendResponse(2, 2, 1, False, 3, 1, 2))
    pr = c1.progress[2]
    assert pr.state is ProgressState.PROBE and pr.match == 0


def test_a_follower_whose_log_came_back_shorter_catches_up_on_a_quiet_cluster():
    """A follower restarts with its last acknowledged entries gone (a cut WAL tail).
    With no new writes, the leader's heartbeats find it lagging, the probe of the match
    is rejected, the match drops to the follower's real end and the entries are sent
    again; the follower says it lost acknowledged entries."""
    n = leader_net()
    c1 = n[1]
    for data in (b"a", b"b", b"c"):
        c1.propose(data)
    n.stabilize()
    n.heartbeat(1)
    assert c1.progress[3].match == 5 and n[3].log.last_index == 5
    # Node 3 restarts with the log up to 3 (entries 4 and 5 lost), commit 3.
    kept = [n[3].log.entry(i) for i in (2, 3)]
    n.add(3, new_core(3, state=state_with(kept, term=2, commit=3)))
    drain(n[3])
    for _ in range(4):  # heartbeat rounds: no writes
        n.heartbeat(1)
    assert n[3].log.last_log_id == c1.log.last_log_id
    assert c1.progress[3].match == 5 and n[3].commit_index == 5


def test_a_reconnected_follower_is_probed_from_its_match():
    """A new hello from a peer (it may have restarted) makes the leader probe it again
    at once rather than wait for stalled heartbeats."""
    n = leader_net()
    c1 = n[1]
    c1.peer_reconnected(3)
    assert c1.progress[3].state is ProgressState.PROBE
    assert c1.progress[3].match == 0  # counts nothing of it until it acknowledges again
    assert n.flush(1) == ["1->3 append t2 prev=2-2 [] c2"]
    n.stabilize()
    assert c1.progress[3].match == 2
    c1.peer_reconnected(99)  # unknown peers: nothing
    n[2].peer_reconnected(3)  # a follower: nothing
    assert not n[2].has_ready()


def test_a_follower_warns_when_the_leader_counts_entries_it_no_longer_has(caplog):
    """Raft assumes disks keep what they acknowledged; a heartbeat whose commit (capped
    at what the leader believes we matched) is past our log shows they did not."""
    core = follower(entry(2, 2))
    core.step(Heartbeat(2, 1, 2, 5, 0))
    assert "2 lost acknowledged entries: leader 1 counts us up to 5 but our log ends at 2" in caplog.text
    assert core.commit_index == 2


def test_a_lost_probe_is_resent_on_a_heartbeat_response():
    """§3.5: the leader retries AppendEntries indefinitely; a heartbeat answer from a
    follower still missing entries restarts a probe whose append was lost."""
    n = Net()
    c1 = n.campaign(1)
    n.flush(1)
    assert n.drop(to(3)) == ["1->3 append t2 prev=1-1 [2..2] c1"]
    n.stabilize()
    c1.tick()
    n.flush(1)
    n.deliver()
    assert n.flush() == ["2->1 hb_resp t2 ctx0 c2", "3->1 hb_resp t2 ctx0 c1"]
    n.deliver(frm(3))
    assert n.flush(1) == ["1->3 append t2 prev=1-1 [2..2] c2"]


def test_a_replicating_follower_whose_appends_were_lost_is_probed_again():
    """§3.5: in the optimistic replicate state, lost appends are noticed when two
    heartbeat answers in a row show no progress; the leader probes from the match."""
    n = entry_lost_to_3()
    c1 = n[1]
    answers = []
    for _ in range(2):
        c1.tick()
        n.flush(1)
        n.round_trip(2, 3)
        answers.append(n.flush(1))
    # One silent round may be a late answer: wait. Two: probe from the match.
    assert answers == [[], ["1->3 append t2 prev=2-2 [3..3] c3"]]
    assert c1.progress[3].state is ProgressState.PROBE


def test_messages_for_another_node_are_dropped():
    """§3.3: a server handles only RPCs addressed to it; nonsense is logged, not raised."""
    core = follower(entry(2, 2))
    core.step(AppendRequest(2, 1, 3, LogId(2, 2), (entry(2, 3),), 2))
    assert not core.has_ready()
    assert core.log.last_log_id == LogId(2, 2)


def test_replication_reaches_every_follower():
    """§3.5 (Log Matching): once quiet, every log equals the leader's."""
    n = leader_net((1, 2, 3, 4, 5))
    for i in range(20):
        n[1].propose(bytes([i]))
        if i % 3 == 0:
            n.flush(1)
    n.stabilize()
    n.heartbeat(1)
    assert set(n.logs().values()) == {LogId(2, 22)}
    assert {c.commit_index for c in n.cores.values()} == {22}
    assert all(len(a) == 22 for a in n.applied.values())


@pytest.mark.parametrize(
    "msg",
    [
        AppendRequest(2, 1, 2, LogId(1, 1), (entry(2, 3),), 1),  # gap after prev
        AppendRequest(2, 1, 2, LogId(1, 1), (entry(2, 2), entry(2, 4)), 1),  # gap inside
        AppendRequest(2, 1, 2, LogId(2, 1), (entry(1, 2),), 1),  # term goes back
        AppendRequest(2, 1, 2, LogId(3, 1), (), 1),  # prev newer than the leader's term
        AppendRequest(2, 2, 2, LogId(1, 1), (), 1),  # from itself
        AppendRequest(2, 1, 3, LogId(1, 1), (), 1),  # for someone else
        VoteRequest(2, 3, 2, LogId(5, 9)),  # last entry newer than the candidate's term
    ],
    ids=str,
)
def test_impossible_messages_from_peers_are_dropped_not_raised(msg):
    """design §3: a remote peer's nonsense is logged and dropped, never raised; nothing
    changes and nothing is answered."""
    core = follower(entry(2, 2), commit=1, term=2)
    before = core.status()
    core.step(msg)
    assert not core.has_ready() and core.status() == before


def test_a_second_leader_of_the_same_term_is_dropped():
    """§3.6.3 election safety cannot be broken by a peer: a leader that receives an
    append from another self-declared leader of its term ignores it."""
    n = leader_net()
    n.take_msgs()
    n[1].step(AppendRequest(n[1].term, 2, 1, LogId(1, 1), (), 1))
    assert n[1].role is Role.LEADER and not n[1].has_ready()


def test_a_short_log_hint_below_the_match_lowers_it_even_for_an_older_index():
    """A follower that acknowledged an uncommitted tail and lost it answers a heartbeat
    (whose commit is below its match) with a rejection of that lower index: its
    short-log hint at or below the match still lowers the match, so the leader never
    counts the lost tail toward a commit."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    c1.propose(b"b")
    n.stabilize()
    pr = c1.progress[2]
    assert pr.match == 4
    c1.step(AppendResponse(2, 2, 1, False, 3, 0, 3))  # rejects 3 (< match 4): "my log ends at 2"
    assert (pr.state, pr.match, pr.next) == (ProgressState.PROBE, 2, 3)
