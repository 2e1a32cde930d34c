"""Who may talk to a core, and who may vote: non-members, unasked responses, empty disks.

Raft assumes every message comes from a member of the cluster and every server keeps
what it acknowledged. Outside the paper: a forged frame from a stranger, an answer
nobody asked for, and a server back with an empty disk. None of them may move a term,
win a vote or count toward a quorum.
"""

from __future__ import annotations

import pytest

from metanode.raft.core import Role
from metanode.raft.messages import (
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    SnapshotResponse,
    VoteRequest,
    VoteResponse,
)
from metanode.raft.types import LogId, PersistedState
from tests.unit.raft_helpers import drain, leader_net, new_core, take, view

FAR = 100_000


@pytest.mark.parametrize(
    "msg",
    [
        HeartbeatResponse(2 + FAR, 99, 1, 0, 0),
        AppendResponse(2 + FAR, 99, 1, False, 5),
        VoteResponse(2 + FAR, 99, 1, True),
        VoteRequest(2 + FAR, 99, 1, LogId(FAR, FAR)),
        AppendRequest(2 + FAR, 99, 1, LogId(0, 0), (), 0),
        Heartbeat(2 + FAR, 99, 1, 0),
    ],
    ids=str,
)
def test_messages_from_a_non_member_are_dropped_and_counted(msg):
    """A sender in no configuration of our log (nor tracked by the leader) is dropped:
    the term, the role and the leader stay as they were."""
    n = leader_net()
    c1 = n[1]
    before = c1.dropped_messages
    c1.step(msg)
    assert (c1.term, c1.role, c1.leader) == (2, Role.LEADER, 1)
    assert c1.dropped_messages == before + 1
    assert not c1.has_ready()


@pytest.mark.parametrize(
    "msg",
    [
        HeartbeatResponse(2 + FAR, 3, 2, 0, 0),
        AppendResponse(2 + FAR, 3, 2, False, 5),
        VoteResponse(2 + FAR, 3, 2, False),
        SnapshotResponse(2 + FAR, 3, 2, LogId(1, 1), 0),
    ],
    ids=str,
)
def test_a_newer_term_in_a_response_nobody_asked_for_is_dropped(msg):
    """A follower sends no requests, so no answer from a newer term can be for it: a
    member's forged (or garbled) response does not raise its term."""
    n = leader_net()
    c2 = n[2]
    c2.step(msg)
    assert (c2.term, c2.role, c2.leader) == (2, Role.FOLLOWER, 1)
    assert c2.dropped_messages == 1


def test_a_newer_term_answering_our_request_is_adopted():
    """§3.3: a leader that hears a newer term in the answer to its own append steps down."""
    n = leader_net()
    c1 = n[1]
    c1.tick()  # a heartbeat round: 1 asked 2 and 3 in term 2
    drain(c1)
    c1.step(HeartbeatResponse(7, 2, 1, 0, 2))
    assert (c1.term, c1.role) == (7, Role.FOLLOWER)


def test_a_node_without_a_membership_never_votes():
    """A node with an empty disk (wiped, or being added and not yet sent the log) does
    not know the cluster: its empty log makes every candidate look up to date, so its
    vote could elect a leader that lacks committed entries. It rejects, and only
    accepts messages from the members its join reply named."""
    empty = new_core(2, state=PersistedState())
    empty.step(VoteRequest(3, 3, 2, LogId(2, 5)))
    assert not empty.has_ready() and empty.dropped_messages == 1  # not even trusted yet
    empty.trust([1, 2, 3])
    empty.step(VoteRequest(3, 3, 2, LogId(2, 5)))
    assert view(take(empty)) == {"hs": (3, None, 0), "msgs": ["2->3 vote_resp t3 no"]}
    empty.step(VoteRequest(4, 3, 2, LogId(2, 5), pre_vote=True))
    assert view(take(empty)) == {"msgs": ["2->3 prevote_resp t3 no"]}


def test_a_node_being_added_votes_once_its_log_names_it():
    """The first append from the leader brings the membership with the node in it;
    from then on it is a member like any other (a learner votes, §4.1)."""
    n = leader_net()
    c1 = n[1]
    joiner = new_core(4, state=PersistedState())
    joiner.trust([1, 2, 3])
    n.add(4, joiner)
    c1.change_membership((1, 2, 3), learners=(4,))
    n.stabilize()
    assert joiner.membership.learners == (4,)
    joiner.step(VoteRequest(3, 2, 4, c1.log.last_log_id, transfer=True))  # past the lease
    assert view(take(joiner))["msgs"] == ["4->2 vote_resp t3 yes"]


def test_a_node_whose_log_predates_the_leader_trusts_it_once_a_member_vouches():
    """A learner that was down while the membership changed holds a log that does not
    name the new leader: it drops the leader's messages and notes the stranger; once a
    member of its log names the current members (`trust`), it follows that leader."""
    stale = new_core(4, voters=(1, 2, 3), learners=(4,))
    drain(stale)
    hb = Heartbeat(5, 6, 4, 0)
    stale.step(hb)
    assert stale.term == 1 and stale.strangers == {6}
    stale.trust([1, 2, 6, 4])
    assert stale.strangers == set()
    stale.step(hb)
    assert (stale.term, stale.leader) == (5, 6)


def test_a_newer_term_in_a_member_response_of_another_kind_than_asked_is_dropped():
    """A leader asks its followers for appends and heartbeats, never votes in its
    term: a vote response from a member with a far term answers nothing it asked."""
    n = leader_net()
    c1 = n[1]
    c1.tick()
    drain(c1)
    c1.step(VoteResponse(2 + FAR, 2, 1, False))
    c1.step(SnapshotResponse(2 + FAR, 3, 1, LogId(1, 1), 0))
    assert (c1.term, c1.role) == (2, Role.LEADER)
    assert c1.dropped_messages == 2


def test_a_follower_back_with_a_shorter_log_is_told_it_lost_acknowledged_entries(caplog):
    """After a follower's raft stream restarts, the leader probes its old match; the
    short-log rejection shows the loss, and the next append tells the follower how
    far it had acknowledged, so it can say it lost acknowledged entries."""
    from tests.unit.raft_helpers import state_with

    n = leader_net()
    c1 = n[1]
    for data in (b"a", b"b", b"c"):
        c1.propose(data)
    n.stabilize()
    kept = [n[3].log.entry(i) for i in (2, 3)]
    n.add(3, new_core(3, state=state_with(kept, term=2, commit=3)))
    drain(n[3])
    c1.peer_reconnected(3)
    n.stabilize()
    assert "3 lost acknowledged entries: leader 1 says we acknowledged up to 5 but our log ends at 3" in caplog.text
    assert n[3].log.last_log_id == c1.log.last_log_id and c1.progress[3].match == 5
