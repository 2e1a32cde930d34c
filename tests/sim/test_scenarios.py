"""Scripted scenarios on the simulated cluster, transcript style.

Each test drives a manual cluster (no automatic ticks or deliveries) step by step
and checks both the outcome and the messages exchanged (`str()` of each message, as
in the logs). The invariant checks of `cluster.py` run throughout.
"""

from __future__ import annotations

from typing import Any

import pytest

from metanode.errors import Unavailable
from metanode.raft import Role
from metanode.node.events import Propose
from metanode.raft.messages import AppendRequest, SnapshotRequest
from metanode.sm import Upsert
from tests.sim.cluster import Cluster, SimNode, encode_command

pytestmark = pytest.mark.sim


def write(c: Cluster, leader: SimNode, key: str, value: bytes) -> list[Any]:
    results: list[Any] = []
    leader.client_write(encode_command("put", key, value, None, c.now), results.append)
    return results


def campaign(c: Cluster, candidate: int, *voters: int) -> list[str]:
    """Let the voters' leases run out and `candidate` win an election; only messages
    to or from the candidate are delivered (the voters' own pre-votes stay unsent)."""
    for v in voters:
        c.tick(v, 20)
    c.tick(candidate, 20)
    delivered = c.deliver(
        only=lambda m: m.src == candidate and m.TAG == "vote" or m.dst == candidate and m.TAG == "vote_resp"
    )
    c.drop_inflight(only=lambda m: m.TAG in ("vote", "vote_resp"))
    assert c.nodes[candidate].core.is_leader, delivered
    return delivered


def test_new_leader_must_commit_its_own_entry_before_a_membership_change() -> None:
    """Ongaro's single-server-change bug (raft-dev, 2015): a new leader changes the
    membership only after an entry of its own term committed; until then it refuses."""
    c = Cluster(0, voters=3, manual=True, trace=True)
    c.elect(1)
    c.nodes[1].crash()
    campaign(c, 2, 3)
    leader = c.nodes[2]
    with pytest.raises(Unavailable, match="not yet committed an entry of its term"):
        leader.core.change_membership([2, 3])
    delivered = c.deliver()
    assert "2->3 append t3 prev=2-2 [3..3] c2" in delivered  # the no-op of term 3
    assert leader.core.commit_index == 3
    leader.core.change_membership([2, 3])
    assert leader.core.membership.configs == ((1, 2, 3), (2, 3))  # joint first (§4.3)
    leader.pump()
    c.deliver()
    c.settle()
    assert leader.core.committed_membership.configs == ((2, 3),)


def test_learner_votes_for_a_candidate_that_knows_it_is_a_voter() -> None:
    """§4.1: a server that does not know it is a voter yet must still grant votes,
    or a cluster whose C_new needs it could never elect a leader."""
    c = Cluster(0, voters=2, manual=True, trace=True)
    leader = c.elect(1)
    c.add_node(3)
    leader.core.change_membership([1, 2], [3])
    leader.pump()
    c.settle()
    assert c.nodes[3].core.committed_membership.learners == (3,)
    # Promote 3, but nothing reaches 3 any more: it still believes it is a learner.
    c.cut.update({(1, 3), (2, 3)})
    leader.core.change_membership([1, 2, 3])
    leader.pump()
    c.settle()
    assert c.nodes[2].core.committed_membership.configs == ((1, 2, 3),)
    assert c.nodes[3].core.membership.configs == ((1, 2),)
    c.cut.clear()
    c.drop_inflight()
    c.nodes[1].crash()
    delivered = campaign(c, 2, 3)
    assert "3->2 vote_resp t3 yes" in delivered  # the learner's vote elects 2
    c.settle()
    assert c.nodes[3].core.membership.configs == ((1, 2, 3),)


def test_removing_the_leader_hands_over_and_the_old_leader_retires() -> None:
    """§4.2.2: a leader removed from the configuration manages the change without
    counting itself, steps down once C_new commits, and (beyond the thesis) sends
    TimeoutNow to an up-to-date voter so the cluster does not wait for a timeout."""
    c = Cluster(0, voters=3, manual=True, trace=True)
    leader = c.elect(1)
    leader.core.change_membership([2, 3])
    leader.pump()
    delivered = c.deliver()
    timeout_now = [line for line in delivered if "timeout_now" in line]
    assert len(timeout_now) == 1 and timeout_now[0].startswith("1->")
    new = c.leader()
    assert new is not None and new.id in (2, 3) and new.core.term == 3
    c.settle()
    assert leader.retired  # it saw a committed membership without itself
    assert new.core.committed_membership.configs == ((2, 3),)
    result = write(c, new, "k", b"v")
    c.settle()
    assert result and c.nodes[5 - new.id].sm.get("k") is not None


def test_partitioned_follower_rejoins_without_disrupting_the_leader() -> None:
    """§9.6 PreVote: a follower cut off for a long time does not bump its term, so
    when it comes back the leader keeps its term and leadership."""
    c = Cluster(0, voters=3, manual=True, trace=True)
    leader = c.elect(1)
    term = leader.core.term
    c.isolate(3)
    for _ in range(100):
        c.tick_all()
        c.deliver()
    assert c.nodes[3].core.term == term  # pre-votes failed; nothing was incremented
    assert c.nodes[3].core.role is Role.PRE_CANDIDATE
    write(c, leader, "k", b"v")
    c.heal()
    for _ in range(10):
        c.tick_all()
        c.deliver()
    assert leader.core.is_leader and leader.core.term == term
    assert c.nodes[3].sm.get("k") is not None


def test_without_prevote_a_rejoining_follower_does_disrupt() -> None:
    """The contrast that motivates §9.6: without PreVote the same partition makes the
    isolated node's term grow, and its return deposes the leader."""
    c = Cluster(0, voters=3, manual=True, pre_vote=False, check_quorum=False)
    leader = c.elect(1)
    term = leader.core.term
    c.isolate(3)
    for _ in range(100):
        c.tick_all()
        c.deliver()
    assert c.nodes[3].core.term > term + 1
    c.heal()
    for _ in range(10):
        c.tick_all()
        c.deliver()
    assert leader.core.term > term


def test_partial_connectivity_does_not_cause_leader_churn() -> None:
    """A and C cannot talk, both reach B. With PreVote and CheckQuorum the leader A
    keeps its term: C's pre-votes are ignored by B, which hears from a live leader
    (§4.2.3), and writes keep committing through B."""
    c = Cluster(0, voters=3, manual=True, trace=True)
    leader = c.elect(1)
    term = leader.core.term
    c.cut.update({(1, 3), (3, 1)})
    for i in range(60):
        c.tick_all()
        if i % 10 == 0:
            write(c, leader, f"k{i}", b"v")
        c.deliver()
    assert leader.core.is_leader and leader.core.term == term
    assert c.nodes[2].core.term == term and c.nodes[3].core.term == term
    assert c.nodes[2].sm.get("k50") is not None
    assert any("3->2 prevote" in line and "ignored" not in line for line in c.transcript)


def test_follower_far_behind_is_caught_up_by_a_chunked_snapshot() -> None:
    """§5.1, Figure 5.3: when the entries a follower needs are compacted, the leader sends its
    snapshot in chunks; the follower installs it and continues from the log."""
    c = Cluster(0, voters=3, manual=True, trace=True, snapshot_every=64, keep_after_snapshot=16)
    leader = c.elect(1)
    c.nodes[3].crash()
    for i in range(200):
        write(c, leader, f"key-{i:03}", b"x" * 20)
        c.deliver()
    assert leader.core.log.purged.index > c.nodes[3].core.log.last_index
    c.nodes[3].start()
    sent: list[str] = []
    for _ in range(20):
        c.tick(1, 2)
        sent += c.deliver()
    chunks = [s for s in sent if s.startswith("1->3 snap ")]
    assert len(chunks) > 3 and chunks[-1].endswith("done")
    assert "@0+512" in chunks[0]
    assert any(s.startswith("1->3 append") for s in sent[sent.index(chunks[-1]):])
    write(c, leader, "after", b"y")
    c.settle()
    assert c.nodes[3].sm.snapshot() == leader.sm.snapshot()
    assert c.nodes[3].core.log.snapshot is not None


def test_duplicated_and_reordered_appends_are_harmless() -> None:
    """§3.5: AppendEntries is idempotent; an old duplicate arriving late neither
    truncates nor rolls back a follower."""
    c = Cluster(0, voters=3, manual=True)
    leader = c.elect(1)
    write(c, leader, "a", b"1")
    old = [m for m in c.inflight if isinstance(m, AppendRequest)]
    c.deliver()
    write(c, leader, "a", b"2")
    c.deliver()
    follower = c.nodes[2]
    last = follower.core.log.last_index
    for m in old:
        c.inflight.append(m)
    c.deliver()
    assert follower.core.log.last_index == last
    c.settle()
    assert follower.sm.get("a").data == b"2"  # type: ignore[union-attr]
    assert not [m for m in c.inflight if isinstance(m, SnapshotRequest)]


def test_a_voter_whose_log_came_back_shorter_catches_up_on_a_quiet_cluster() -> None:
    """A follower restarts with its last acknowledged entries gone (a cut WAL tail) and
    nobody writes: the leader's heartbeat (its commit capped at what it believes the
    follower matched) shows the follower the loss, the follower rejects that index, the
    leader lowers its match and sends the entries again. Before: the leader kept
    counting entries the follower no longer had and it never caught up."""
    c = Cluster(0, voters=3, manual=True, trace=True)
    leader = c.elect(1)
    for i in range(4):
        write(c, leader, f"k{i}", b"v")
        c.deliver()
    c.settle()
    f = c.nodes[3]
    top = leader.core.log.last_index
    assert f.core.log.last_index == top and leader.core.progress[3].match == top
    f.crash()
    del f.disk.entries[-2:]
    f.start()
    assert f.core.log.last_index == top - 2
    c.settle()
    assert f.core.log.last_index == top and f.applied == top
    assert leader.core.progress[3].match == top
    assert any("append_resp" in line and "reject" in line for line in c.transcript)


def test_a_wiped_voter_is_refused_and_a_forged_term_moves_nothing() -> None:
    """The safety issue's scenario in the simulator: a voter with an empty data dir
    asking to join under its old id is refused by the leader's own decision (naming
    `--leave-id`); an empty node never votes; and frames from a non-member with a far
    term leave every term as it was."""
    from metanode.errors import BadRequest
    from metanode.raft.messages import HeartbeatResponse, VoteRequest
    from metanode.raft.types import LogId
    from tests.sim.workload import _record

    c = Cluster(0, voters=3, manual=True)
    leader = c.elect(1)
    with pytest.raises(BadRequest, match="--leave-id 2"):
        leader.driver.plan_join(2, _record(2), fresh=True, learner=False, promote=False)
    wiped = c.add_node(9)  # an empty disk, trusting the members
    wiped.deliver(VoteRequest(leader.core.term + 1, 3, 9, LogId(1, 1), transfer=True))
    assert [m for m in c.inflight if m.src == 9 and "yes" in str(m)] == []
    terms = {n.id: n.core.term for n in c.nodes.values()}
    for n in (1, 2, 3):
        c.nodes[n].deliver(HeartbeatResponse(terms[n] + 100_000, 99, n, 0, 0))
        c.nodes[n].deliver(VoteRequest(terms[n] + 100_000, 99, n, LogId(10**5, 10**6)))
    assert {n.id: n.core.term for n in c.nodes.values()} == terms
    assert leader.core.is_leader


def test_a_leader_applies_its_own_command_only_to_the_entry_it_proposed() -> None:
    """A leader applies its own proposals from the command it had at hand
    (`Propose.known`), without decoding them. When another leader's entry took that
    index, the node applies what the log holds there, not what it had proposed, and
    the write is answered as not applied."""
    c = Cluster(0, voters=3, manual=True)
    old = c.elect(1)
    c.isolate(1)
    answers: list[Any] = []
    for n, value in enumerate((b"lost-1", b"lost-2")):
        data = encode_command("put", "x", value, None, c.now)
        req_id = 1_000 + n
        old._request("write", Propose(((req_id, data),), ((c.now, Upsert("x", value)),)), answers.append)
    c.drop_inflight()
    campaign(c, 2, 3)
    new = c.nodes[2]
    assert write(c, new, "x", b"kept") == []  # (answered once applied)
    c.deliver()
    c.heal()
    for _ in range(20):
        c.tick_all()
        c.deliver()
    c.settle()
    assert answers == [False, False]  # (the sim's answer for Unavailable: never applied)
    assert old.sm.get("x") is not None and old.sm.get("x").data == b"kept"
    c.check_converged()
