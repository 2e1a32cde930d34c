"""Leadership transfer (thesis §3.10) and linearizable reads by ReadIndex (§6.4)."""

from __future__ import annotations

import pytest

from metanode.errors import BadRequest, NotLeader, Unavailable
from metanode.raft import Role
from metanode.raft.messages import AppendResponse, HeartbeatResponse
from tests.unit.raft_helpers import (
    ELECTION,
    Net,
    drain,
    frm,
    leader_net,
    new_core,
    take,
    ticks,
    to,
    view,
)

# ---------------------------------------------------------------- transfer (§3.10)


def test_transfer_to_an_up_to_date_voter_sends_timeout_now_at_once():
    """§3.10: when the target's log already matches the leader's, the leader tells it
    to start an election right away."""
    n = leader_net()
    n[1].transfer_leadership(2)
    assert view(take(n[1])) == {"msgs": ["1->2 timeout_now t2"]}


def test_transfer_to_a_lagging_voter_first_catches_it_up():
    """§3.10: the leader first brings the target's log up to date with AppendEntries,
    and sends TimeoutNow only once the target matches its last entry."""
    n = leader_net()
    c1 = n[1]
    c1.propose(b"a")
    n.flush(1)
    held = n.take_msgs(to(3))
    n.stabilize()  # committed with 2; 3's copy is still on its way
    c1.transfer_leadership(3)
    assert not c1.has_ready()  # the append is in flight: no TimeoutNow yet
    n.inflight.extend(held)
    n.deliver()
    n.flush(3)
    n.deliver(frm(3))
    assert view(take(c1)) == {"msgs": ["1->3 timeout_now t2"]}


def test_transfer_to_a_probed_voter_sends_it_the_missing_entries():
    """§3.10: a target whose match is unknown is probed with AppendEntries first."""
    n = Net()
    c1 = n.campaign(1)
    n.flush(1)
    n.drop(to(3))
    n.stabilize()
    c1.tick()
    n.flush(1)
    n.round_trip(3)  # the heartbeat answer re-opens the probe
    assert n.flush(1) == ["1->3 append t2 prev=1-1 [2..2] c2"]
    c1.transfer_leadership(3)
    assert not c1.has_ready()
    n.round_trip(3)
    assert n.flush(1) == ["1->3 timeout_now t2"]


def test_proposals_are_refused_during_a_transfer():
    """§3.10: the leader stops accepting client requests while leadership moves, so the
    target can catch up and the entries are not lost by the change."""
    n = leader_net()
    c1 = n[1]
    c1.transfer_leadership(2)
    with pytest.raises(Unavailable):
        c1.propose(b"a")
    with pytest.raises(Unavailable):
        c1.change_membership((1, 2))


def test_a_transfer_that_does_not_complete_aborts_after_an_election_timeout():
    """§3.10: if the transfer does not finish within an election timeout, the leader
    aborts it and accepts client requests again."""
    n = leader_net()
    c1 = n[1]
    c1.transfer_leadership(3)
    n.flush(1)
    n.drop()
    for _ in range(ELECTION - 1):
        n.heartbeat(1, cut=(3,))
    with pytest.raises(Unavailable):
        c1.propose(b"a")
    n.heartbeat(1, cut=(3,))
    assert c1.role is Role.LEADER
    assert c1.propose(b"a").index == 3


def test_transfer_is_for_the_leader_and_to_a_voter():
    """§3.10: only a leader transfers, and only a voter can be elected."""
    n = leader_net((1, 2, 3, 4), learners=(4,))
    with pytest.raises(NotLeader):
        n[2].transfer_leadership(3)
    with pytest.raises(BadRequest):
        n[1].transfer_leadership(4)
    n[1].transfer_leadership(1)  # already there
    assert not n[1].has_ready()


def test_the_target_campaigns_at_once_and_voters_in_lease_grant_it():
    """§3.10 with §4.2.3: TimeoutNow makes the target start a real election at once (no
    PreVote, no timeout), marked `transfer`, and voters that still hear from the old
    leader grant it instead of ignoring it."""
    n = leader_net()
    n[1].transfer_leadership(2)
    n.flush(1)
    n.deliver()
    assert view(n.ready(2)) == {
        "hs": (3, 2, 2),
        "msgs": ["2->1 vote t3 last=2-2 transfer", "2->3 vote t3 last=2-2 transfer"],
    }
    n.deliver()  # 1 (the old leader) and 3 both heard from 1 within the lease
    assert n.flush(1, 3) == ["1->2 vote_resp t3 yes", "3->2 vote_resp t3 yes"]
    n.stabilize()
    assert n[2].role is Role.LEADER and n[2].term == 3
    assert n[1].role is Role.FOLLOWER and n[1].leader == 2


# ---------------------------------------------------------------- ReadIndex (§6.4)


def test_read_index_on_a_follower_names_the_leader():
    """§6.4: only the leader serves ReadIndex; others redirect."""
    n = leader_net()
    with pytest.raises(NotLeader) as info:
        n[2].read_index("r")
    assert info.value.leader == 1


def test_a_new_leader_holds_reads_until_its_noop_commits():
    """§6.4 step 1: a leader's commit index is only known to be current once it has
    committed an entry of its term; reads wait for that, then use the new commit index."""
    n = Net()
    c1 = n.campaign(1)
    c1.read_index("r")
    assert view(n.ready(1)) == {
        "entries": ["2-2:noop"],
        "msgs": ["1->2 append t2 prev=1-1 [2..2] c1", "1->3 append t2 prev=1-1 [2..2] c1"],
    }
    n.round_trip(2)
    assert view(n.ready(1)) == {
        "hs": (2, 1, 2),
        "msgs": ["1->2 hb t2 c2 ctx1", "1->3 hb t2 c0 ctx1"],
        "committed": ["2-2:noop"],
    }
    n.round_trip(2)
    assert view(n.ready(1)) == {"reads": [("r", 2)]}


def test_a_read_is_released_after_a_quorum_answers_a_heartbeat_round_started_after_it():
    """§6.4 steps 2-3: the leader records its commit index, then confirms it is still
    leader by a round of heartbeats started after the read; answers to older rounds do
    not count."""
    n = leader_net()
    c1 = n[1]
    c1.read_index("r")
    assert view(n.ready(1)) == {"msgs": ["1->2 hb t2 c2 ctx1", "1->3 hb t2 c2 ctx1"]}
    c1.step(HeartbeatResponse(2, 2, 1, ctx=0, commit=2))  # an older round
    assert not c1.has_ready()
    c1.step(HeartbeatResponse(2, 2, 1, ctx=1, commit=2))  # with the leader: a majority
    assert view(take(c1)) == {"reads": [("r", 2)]}
    c1.step(HeartbeatResponse(2, 3, 1, ctx=1, commit=2))
    assert not c1.has_ready()


def test_a_learner_does_not_confirm_a_read():
    """§6.4 with §4.2.1: the heartbeat round must reach a majority of voters; a learner's
    answer does not count."""
    n = leader_net((1, 2, 3, 4), learners=(4,))
    c1 = n[1]
    c1.read_index("r")
    n.flush(1)
    n.round_trip(4)
    assert not c1.has_ready()
    n.round_trip(2)
    assert view(take(c1)) == {"reads": [("r", 2)]}


def test_a_read_index_is_the_commit_index_when_the_read_arrived():
    """§6.4 step 1: entries committed after the read arrived need not be visible."""
    n = leader_net()
    c1 = n[1]
    c1.read_index("r")
    c1.propose(b"a")
    n.stabilize()
    assert c1.commit_index == 3
    assert [r for ready in n.readies[1] for r in ready.read_states][0].index == 2


def test_a_single_voter_leader_releases_a_read_at_once():
    """§6.4: with no other voter the leader is the majority; no round trip is needed."""
    core = new_core(1, voters=(1,))
    drain(core)
    ticks(core, 2 * ELECTION)
    drain(core)
    core.read_index("r")
    assert view(take(core)) == {"reads": [("r", 2)]}


def test_reads_before_take_ready_share_one_heartbeat_round():
    """§6.4 (batching): many reads arriving together are confirmed by one round of
    heartbeats, and released together."""
    n = leader_net()
    c1 = n[1]
    for ctx in ("a", "b", "c"):
        c1.read_index(ctx)
    assert view(n.ready(1)) == {"msgs": ["1->2 hb t2 c2 ctx1", "1->3 hb t2 c2 ctx1"]}
    c1.read_index("d")  # after the round went out: the next round
    assert view(n.ready(1)) == {"msgs": ["1->2 hb t2 c2 ctx2", "1->3 hb t2 c2 ctx2"]}
    n.deliver(lambda m: m.dst == 2 and "ctx1" in str(m))
    n.flush(2)
    n.deliver(frm(2))
    assert view(n.ready(1)) == {"reads": [("a", 2), ("b", 2), ("c", 2)]}


def test_stepping_down_drops_pending_reads():
    """§6.4: a server that is no longer leader cannot confirm a read; the reads it held
    are reported dropped so that clients retry elsewhere."""
    n = leader_net()
    c1 = n[1]
    c1.read_index("r")
    n.flush(1)
    c1.step(HeartbeatResponse(3, 2, 1))
    assert view(take(c1)) == {"hs": (3, None, 2), "dropped": ["r"]}


def test_stepping_down_drops_reads_waiting_for_the_noop():
    """§6.4: reads held until the new leader's no-op commits are dropped too."""
    n = Net()
    c1 = n.campaign(1)
    c1.read_index("r")
    n.flush(1)
    c1.step(AppendResponse(3, 2, 1, False, 0))  # answering the append of its no-op
    assert view(take(c1)) == {"hs": (3, None, 1), "dropped": ["r"]}
