"""Cluster membership changes in the pure raft core (thesis chapter 4: §4.1-§4.3)."""

from __future__ import annotations

import pytest

from metanode.errors import BadRequest, NotLeader, Unavailable
from metanode.raft import Membership, PersistedState, Role
from metanode.raft.core import RETIRE_TIMEOUT_ELECTIONS
from metanode.raft.messages import AppendRequest, AppendResponse, TimeoutNow
from metanode.raft.types import LogId
from tests.unit.raft_helpers import (
    ELECTION,
    Net,
    conf,
    drain,
    frm,
    leader_net,
    new_core,
    noop,
    state_with,
    take,
    to,
    view,
)


def with_new_nodes(net: Net, *ids: int) -> Net:
    """Add empty nodes (no log, no membership), as a joining server starts: they trust
    the members their join reply named."""
    for i in ids:
        core = new_core(i, state=PersistedState())
        core.trust(net.cores)
        net.add(i, core)
    return net


def test_only_the_leader_changes_the_membership():
    """§4.1: configuration changes are log entries, which only the leader appends; a
    follower redirects the caller to the leader it knows."""
    n = leader_net()
    with pytest.raises(NotLeader) as info:
        n[2].change_membership((1, 2))
    assert info.value.leader == 1


def test_a_new_leader_changes_membership_only_after_committing_an_entry_of_its_term():
    """§4.1 (the single-server change bug fixed in Ongaro's 2015 raft-dev post): until
    the new leader's no-op commits, a change could conflict with one a previous leader
    left uncommitted, so it is refused as unavailable."""
    n = Net()
    c1 = n.campaign(1)
    with pytest.raises(Unavailable):
        c1.change_membership((1, 2))
    n.stabilize()
    assert c1.change_membership((1, 2)) == LogId(2, 3)


def test_one_membership_change_at_a_time():
    """§4.1 / §4.3: a new change waits until the previous one, C_new included, has
    committed."""
    n = with_new_nodes(leader_net(), 4)
    c1 = n[1]
    c1.change_membership((1, 2, 4))
    with pytest.raises(Unavailable):  # C_old,new appended, not committed
        c1.change_membership((1, 2, 3, 4))
    n.flush()
    n.round_trip(2, 3, 4)  # C_old,new commits; C_new is appended, not committed
    assert c1.membership == Membership.of((1, 2, 4)) and c1.commit_index == 3
    with pytest.raises(Unavailable):
        c1.change_membership((1, 2, 3, 4))
    n.stabilize()
    assert c1.committed_membership == Membership.of((1, 2, 4))
    assert c1.change_membership((1, 2, 3, 4)) == LogId(2, 5)


def test_a_voter_change_goes_through_joint_consensus():
    """§4.3: the leader appends C_old,new; once it commits, the leader appends C_new by
    itself, in the same Ready that applies C_old,new."""
    n = with_new_nodes(leader_net(), 4)
    c1 = n[1]
    assert c1.change_membership((1, 2, 4)) == LogId(2, 3)
    assert view(n.ready(1)) == {
        "entries": ["2-3:conf{1,2,3}&{1,2,4}"],
        "msgs": [
            "1->2 append t2 prev=2-2 [3..3] c2",
            "1->3 append t2 prev=2-2 [3..3] c2",
            "1->4 append t2 prev=2-3 [] c2",
        ],
    }
    n.round_trip(2, 3, 4)
    assert view(n.ready(1)) == {
        "hs": (2, 1, 3),
        "entries": ["2-4:conf{1,2,4}"],
        "msgs": [
            "1->2 append t2 prev=2-3 [4..4] c3",
            "1->3 append t2 prev=2-3 [4..4] c3",
            "1->4 append t2 prev=0-0 [1..4] c3",  # 4 had nothing: it gets the whole log
        ],
        "committed": ["2-3:conf{1,2,3}&{1,2,4}"],
    }
    n.stabilize()
    n.heartbeat(1)
    assert c1.committed_membership == Membership.of((1, 2, 4))
    assert n.applied[4][-1] == conf(2, 4, (1, 2, 4))


def test_joint_consensus_needs_a_majority_of_both_configurations():
    """§4.3: while joint, an entry commits only on a majority of C_old and a majority of
    C_new; the old majority alone is not enough."""
    n = with_new_nodes(leader_net(), 4, 5)
    c1 = n[1]
    c1.change_membership((1, 4, 5))
    n.flush(1)
    n.drop(to(4))
    n.drop(to(5))
    n.round_trip(2, 3)  # 1, 2, 3 have C_old,new: all of C_old, only 1 of {1,4,5}
    assert c1.status().matched == {2: 3, 3: 3, 4: 0, 5: 0}
    assert c1.commit_index == 2
    c1.step(AppendResponse(2, 4, 1, True, 3))  # now 1 and 4 of {1,4,5}
    assert c1.commit_index == 3


def test_joint_consensus_elections_need_a_majority_of_both_configurations():
    """§4.3: while joint, a candidate needs votes from a majority of C_old and of C_new."""
    joint = state_with([conf(2, 2, (1, 2, 3), (1, 4, 5))], term=2, commit=1)
    n = Net((1, 2, 3, 4, 5), states={i: joint for i in (1, 2, 3, 4, 5)})
    c1 = n[1]
    for _ in range(2 * ELECTION):
        c1.tick()
        if c1.has_ready():
            break
    assert n.flush(1) == [f"1->{p} prevote t3 last=2-2" for p in (2, 3, 4, 5)]
    n.round_trip(2, 3)  # all of C_old, only itself of C_new
    assert c1.role is Role.PRE_CANDIDATE
    n.round_trip(4)  # and 4: a majority of C_new too
    assert c1.role is Role.CANDIDATE


def test_learners_receive_entries_but_do_not_count_for_commitment():
    """§4.2.1: a non-voting member gets the log like everyone else, but it is not part
    of any majority."""
    n = leader_net((1, 2, 3, 4), learners=(4,))
    c1 = n[1]
    c1.propose(b"a")
    assert n.flush(1) == [f"1->{p} append t2 prev=2-2 [3..3] c2" for p in (2, 3, 4)]
    n.round_trip(4)
    assert c1.status().matched[4] == 3
    assert c1.commit_index == 2
    n.round_trip(2)
    assert c1.commit_index == 3


def test_adding_a_learner_needs_no_joint_phase():
    """§4.2.1 / §4.3: the voter sets do not change, so one entry is enough."""
    n = with_new_nodes(leader_net(), 4)
    c1 = n[1]
    c1.change_membership((1, 2, 3), learners=(4,))
    assert view(n.ready(1))["entries"] == ["2-3:conf{1,2,3}+learners{4}"]
    n.stabilize()
    assert c1.committed_membership == Membership.of((1, 2, 3), (4,))
    assert c1.log.last_index == 3


def test_a_configuration_takes_effect_when_appended_not_when_committed():
    """§4.1: a server uses the latest configuration in its log, committed or not: a
    follower holding an uncommitted C_old,new campaigns in the joint configuration."""
    core = new_core(2, state=state_with([noop(2, 2)], term=2, commit=2))
    drain(core)
    core.step(AppendRequest(2, 1, 2, LogId(2, 2), (conf(2, 3, (1, 2, 3), (1, 2, 4)),), 2))
    drain(core)
    assert core.commit_index == 2
    assert core.membership == Membership(((1, 2, 3), (1, 2, 4)))
    assert core.committed_membership == Membership.of((1, 2, 3))
    for _ in range(3 * ELECTION):
        core.tick()
        if core.has_ready():
            break
    assert view(take(core)) == {
        "msgs": ["2->1 prevote t3 last=2-3", "2->3 prevote t3 last=2-3", "2->4 prevote t3 last=2-3"]
    }


def test_a_truncated_uncommitted_configuration_is_reverted():
    """§4.1: when a log entry holding a configuration is removed by a conflict, the
    server falls back to the previous configuration in its log."""
    core = new_core(2, state=state_with([noop(2, 2), conf(2, 3, (1, 2, 3), (1, 2, 4))], term=2, commit=2))
    drain(core)
    assert core.membership == Membership(((1, 2, 3), (1, 2, 4)))
    core.step(AppendRequest(3, 3, 2, LogId(2, 2), (noop(3, 3),), 2))
    assert view(take(core)) == {"hs": (3, None, 2), "entries": ["3-3:noop"], "msgs": ["2->3 append_resp t3 ok 3"]}
    assert core.membership == Membership.of((1, 2, 3))
    for _ in range(3 * ELECTION):
        core.tick()
        if core.has_ready():
            break
    assert view(take(core)) == {"msgs": ["2->1 prevote t4 last=3-3", "2->3 prevote t4 last=3-3"]}


def test_a_new_leader_finishes_an_inherited_joint_change():
    """§4.3: a leader that finds C_old,new in its log commits it with its no-op and then
    appends C_new itself."""
    joint = state_with([noop(2, 2), conf(2, 3, (1, 2, 3), (1, 2, 4))], term=2, commit=2)
    n = with_new_nodes(Net(states={1: joint, 2: joint, 3: joint}), 4)
    c2 = n.campaign(2)
    assert c2.term == 3
    n.stabilize()
    assert [str(e) for e in c2.log.entries[2:]] == ["2-3:conf{1,2,3}&{1,2,4}", "3-4:noop", "3-5:conf{1,2,4}"]
    assert c2.committed_membership == Membership.of((1, 2, 4))


def test_removing_the_leader_it_replicates_without_counting_itself_then_hands_over():
    """§4.2.2: a leader removed from the configuration manages the cluster until C_new
    commits without counting itself in C_new's majorities, then steps down; it sends
    TimeoutNow to an up-to-date voter so no election timeout is lost (§3.10)."""
    n = leader_net()
    c1 = n[1]
    c1.change_membership((2, 3))
    n.flush(1)
    n.round_trip(2, 3)  # C_old,new commits on {1,2,3} and on {2,3}
    assert c1.committed_membership == Membership(((1, 2, 3), (2, 3)))
    c1.propose(b"a")  # still serving while C_new is pending
    assert c1.membership == Membership.of((2, 3))
    assert n.flush(1) == [
        "1->3 append t2 prev=2-3 [4..4] c3",  # sent on 3's answer, which committed 3
        "1->2 append t2 prev=2-3 [4..5] c3",
        "1->3 append t2 prev=2-4 [5..5] c3",
    ]
    n.round_trip(2)  # 1 and 2 would be a majority of {1,2,3}, not of {2,3}
    assert c1.commit_index == 3 and c1.role is Role.LEADER
    n.deliver(to(3))
    n.flush(3)
    assert n.deliver(frm(3)) == ["3->1 append_resp t2 ok 4", "3->1 append_resp t2 ok 5"]
    # C_new commits on 3's first answer: the leader steps down there and then, and
    # hands over to 2, which holds everything (5 is left to the next leader).
    assert c1.role is Role.FOLLOWER
    assert view(take(c1)) == {
        "hs": (2, 1, 4),
        "msgs": ["1->2 timeout_now t2"],
        "committed": ["2-4:conf{2,3}"],
    }
    n[2].step(TimeoutNow(2, 1, 2))
    n.stabilize()
    assert n[2].role is Role.LEADER and n[2].term == 3
    assert n[2].committed_membership == Membership.of((2, 3))
    assert n[2].commit_index == 6  # 2-5 and the new leader's no-op 3-6


def test_a_server_whose_removal_is_not_committed_still_campaigns():
    """§4.2.2 (Figure 4.6): "a server that is not part of its own latest configuration
    should still start new elections, as it might still be needed until the C_new entry
    is committed" (its own vote counting nowhere). Here 1 removes itself from {1,2} and
    loses leadership before 2 got C_new: 2 needs 1's vote, which 1 refuses for 2's
    shorter log, so only 1 can lead the cluster to C_new."""
    n = leader_net((1, 2))
    c1 = n[1]
    c1.change_membership((2,))
    n.flush(1)
    n.deliver()
    n.flush(2)
    n.deliver()  # C_old,new commits; C_new {2} is appended on 1 only
    assert n.drop() == []
    assert n.flush(1) == ["1->2 append t2 prev=2-3 [4..4] c3"]
    n.drop()
    while c1.role is Role.LEADER:  # 2 is silent: CheckQuorum (§6.2) deposes 1
        c1.tick()
        n.flush(1)
        n.drop()
    assert c1.membership == Membership.of((2,)) and c1.commit_index == 3
    assert n[2].membership == Membership(((1, 2), (2,)))
    for _ in range(10 * ELECTION):
        for core in n.cores.values():
            core.tick()
        n.stabilize()
    assert n[2].role is Role.LEADER
    assert n[2].committed_membership == Membership.of((2,))


def test_removing_the_last_voter_is_refused():
    """§4.1: a configuration needs at least one voter to make progress."""
    n = leader_net()
    with pytest.raises(BadRequest):
        n[1].change_membership(())
    with pytest.raises(BadRequest):
        n[1].change_membership((), learners=(1, 2, 3))
    assert not n[1].has_ready()


def test_a_removed_peer_hears_heartbeats_until_it_committed_its_removal():
    """§4.2.3: a removed server must learn it was removed (or it would time out and
    disrupt); the leader keeps sending it heartbeats, and the entries it lacks, until
    its heartbeat answer shows it committed C_new."""
    n = leader_net()
    c1 = n[1]
    c1.change_membership((1, 2))
    n.flush(1)
    n.round_trip(2, 3)  # C_old,new commits; C_new goes out
    n.flush(1)
    n.drop(to(3))
    n.stabilize()
    assert c1.committed_membership == Membership.of((1, 2))
    assert n[3].log.last_index == 3
    n.transcript.clear()
    to3 = []
    for _ in range(6):
        n.heartbeat(1)
        to3.append([t for t in n.transcript if t.startswith(("1->3", "3->1"))])
        n.transcript.clear()
    assert to3[0] == ["1->3 hb t2 c3 ctx0", "3->1 hb_resp t2 ctx0 c3"]
    assert to3[1] == [
        "1->3 hb t2 c3 ctx0",
        "3->1 hb_resp t2 ctx0 c3",
        "1->3 append t2 prev=2-3 [4..4] c4",
        "3->1 append_resp t2 ok 4",
    ]
    assert to3[2] == ["1->3 hb t2 c4 ctx0", "3->1 hb_resp t2 ctx0 c4"]
    assert to3[3:] == [[], [], []]
    assert n[3].committed_membership == Membership.of((1, 2))
    for _ in range(10 * ELECTION):  # and it never campaigns
        n[3].tick()
    assert not n[3].has_ready()


def test_a_removed_peer_that_never_answers_is_forgotten_after_a_long_timeout():
    """§4.2.3: the leader does not inform a silent removed server forever."""
    n = leader_net()
    c1 = n[1]
    c1.change_membership((1, 2))
    n.stabilize(cut=(3,))
    n.heartbeat(1, cut=(3,))
    assert 3 in c1.progress
    for _ in range(RETIRE_TIMEOUT_ELECTIONS * ELECTION - 2):
        n.heartbeat(1, cut=(3,))
    assert 3 in c1.progress
    n.heartbeat(1, cut=(3,))
    assert 3 not in c1.progress
    c1.tick()
    assert view(take(c1)) == {"msgs": ["1->2 hb t2 c4 ctx0"]}


def test_a_no_op_change_returns_the_id_of_the_entry_holding_the_configuration():
    """§4.1: a configuration lives in a log entry; asking for the current one appends
    nothing and names that entry (term and index), so a caller can wait for it."""
    n = leader_net()
    assert n[1].change_membership((1, 2, 3)) == LogId(1, 1)
    assert not n[1].has_ready()


def test_a_node_cannot_be_voter_and_learner_or_demoted_in_one_change():
    """§4.1/§4.3: learners are disjoint from voters; demoting a voter is two changes
    (remove it, then add it as a learner), refused as a bad request, not a crash."""
    n = leader_net()
    with pytest.raises(BadRequest, match="both learners and voters"):
        n[1].change_membership((1, 2, 3), learners=(3,))
    with pytest.raises(BadRequest, match=r"nodes \[3\] are voters"):
        n[1].change_membership((1, 2), learners=(3,))
    assert not n[1].has_ready()


def test_a_new_leader_finishes_a_joint_change_it_knows_is_committed():
    """§4.3: C_new must follow a committed C_old,new even when the new leader learned
    that commit from the old leader (a heartbeat) and never got C_new: it appends C_new
    once its own no-op commits, or every later change waits forever."""
    joint = state_with([noop(2, 2), conf(2, 3, (1, 2, 3), (1, 2))], term=2, commit=3)
    n = Net(states={1: joint, 2: joint, 3: joint})
    c1 = n.campaign(1)
    n.stabilize()
    assert [str(e) for e in c1.log.entries[2:]] == ["2-3:conf{1,2,3}&{1,2}", "3-4:noop", "3-5:conf{1,2}"]
    assert c1.committed_membership == Membership.of((1, 2))


def test_a_member_added_again_after_its_removal_starts_with_no_progress():
    """A peer removed and then added again under the same id may be another node (an
    empty disk): the leader's old progress of it (kept while telling it of its removal)
    must not count toward commits."""
    n = leader_net((1, 2, 3, 4))
    c1 = n[1]
    n.stabilize()
    assert c1.progress[4].match == c1.log.last_index
    c1.change_membership((1, 2, 3))
    n.stabilize(cut=[4])
    assert 4 in c1.progress  # still told of its removal
    c1.change_membership((1, 2, 3), learners=(4,))
    assert c1.progress[4].match == 0
