"""Leader election in the pure raft core: one test per rule (thesis §3.4, §3.6, §4.2, §6.2, §9.6)."""

from __future__ import annotations

import random

from metanode.raft import PersistedState, Role
from metanode.raft.messages import (
    AppendResponse,
    AppendRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from metanode.raft.types import LogId
from tests.unit.raft_helpers import (
    ELECTION,
    Net,
    drain,
    entry,
    new_core,
    state_with,
    take,
    ticks,
    to,
    view,
)


def timed_out(core, limit: int = 2 * ELECTION) -> int:
    """Tick until the core has something to say; the number of ticks it took."""
    for n in range(1, limit + 1):
        core.tick()
        if core.has_ready():
            return n
    raise AssertionError("no election timeout")


def test_election_timeout_is_drawn_from_the_injected_rng_in_election_ticks_to_twice():
    """§3.4: each server's election timeout is random in [T, 2T); drawn from the rng it
    is given, so the same seed times out after the same number of ticks."""
    seen = set()
    for seed in range(40):
        core = new_core(2, seed=seed)
        drain(core)
        expected = random.Random(seed).randrange(ELECTION, 2 * ELECTION)
        assert timed_out(core) == expected
        seen.add(expected)
    assert min(seen) >= ELECTION and max(seen) < 2 * ELECTION
    assert len(seen) > 5  # really randomized


def test_pre_vote_leaves_term_and_vote_alone():
    """§9.6: a pre-candidate asks for the next term without bumping its own term or
    casting a vote, and a server granting a pre-vote does not change its state."""
    n = Net()
    c1 = n[1]
    timed_out(c1)
    assert c1.role is Role.PRE_CANDIDATE
    assert (c1.term, c1.vote) == (1, None)
    assert view(n.ready(1)) == {"msgs": ["1->2 prevote t2 last=1-1", "1->3 prevote t2 last=1-1"]}
    n.deliver(to(2))
    assert view(n.ready(2)) == {"msgs": ["2->1 prevote_resp t2 yes"]}
    assert (n[2].term, n[2].vote) == (1, None)


def test_pre_candidate_needs_a_quorum_of_pre_votes_to_become_candidate():
    """§9.6: only with pre-votes from a majority does the pre-candidate start the real
    election (term + 1, vote for itself, persisted with the RequestVotes)."""
    n = Net((1, 2, 3, 4, 5))
    timed_out(n[1])
    n.flush(1)
    n.deliver(to(2))
    n.flush(2)
    n.deliver(to(1))  # 1 and 2: two of five
    assert n[1].role is Role.PRE_CANDIDATE
    assert not n[1].has_ready()
    n.deliver(to(3))
    n.flush(3)
    n.deliver(to(1))  # 1, 2 and 3: a majority
    assert n[1].role is Role.CANDIDATE
    assert view(take(n[1])) == {
        "hs": (2, 1, 1),
        "msgs": [
            "1->2 vote t2 last=1-1",
            "1->3 vote t2 last=1-1",
            "1->4 vote t2 last=1-1",
            "1->5 vote t2 last=1-1",
        ],
    }


def test_pre_candidate_rejected_by_a_majority_returns_to_follower_in_its_term():
    """§9.6: a pre-candidate that cannot get a majority gives up without having
    disturbed anyone's term, including its own."""
    n = Net(states={2: state_with([entry(1, 2)], term=1, commit=1), 3: state_with([entry(1, 2)], term=1, commit=1)})
    timed_out(n[1])
    n.flush(1)
    n.deliver()
    assert n.flush(2, 3) == ["2->1 prevote_resp t1 no", "3->1 prevote_resp t1 no"]
    n.deliver()
    assert n[1].role is Role.FOLLOWER
    assert (n[1].term, n[1].vote) == (1, None)
    assert not n[1].has_ready()


def test_a_granted_vote_is_persisted_in_the_same_ready_as_the_response():
    """§3.8 (Figure 3.1): currentTerm and votedFor are on stable storage before the
    server answers RequestVote, so both travel in one Ready, persisted first."""
    core = new_core(2)
    drain(core)
    core.step(VoteRequest(2, 1, 2, LogId(1, 1)))
    assert view(take(core)) == {"hs": (2, 1, 1), "msgs": ["2->1 vote_resp t2 yes"]}


def test_at_most_one_vote_per_term():
    """§3.4: a server votes for at most one candidate in a term (first come, first
    served); the candidate it voted for may ask again and is told yes again."""
    core = new_core(3)
    drain(core)
    core.step(VoteRequest(2, 1, 3, LogId(1, 1)))
    assert view(take(core)) == {"hs": (2, 1, 1), "msgs": ["3->1 vote_resp t2 yes"]}
    core.step(VoteRequest(2, 2, 3, LogId(1, 1)))
    assert view(take(core)) == {"msgs": ["3->2 vote_resp t2 no"]}
    core.step(VoteRequest(2, 1, 3, LogId(1, 1)))
    assert view(take(core)) == {"msgs": ["3->1 vote_resp t2 yes"]}


def test_a_voter_rejects_a_candidate_whose_log_is_less_up_to_date():
    """§3.6.1: the later last term wins; with equal last terms the longer log wins."""
    ours = state_with([entry(2, 2), entry(2, 3)], term=2, commit=1)
    cases = [
        (LogId(1, 9), False),  # longer but older last term
        (LogId(2, 2), False),  # same last term, shorter
        (LogId(2, 3), True),  # identical
        (LogId(2, 4), True),  # same last term, longer
        (LogId(3, 2), True),  # later last term, shorter
    ]
    for last, granted in cases:
        core = new_core(2, state=ours)
        drain(core)
        core.step(VoteRequest(3, 3, 2, last))
        vote = 3 if granted else None
        answer = "yes" if granted else "no"
        assert view(take(core)) == {"hs": (3, vote, 1), "msgs": [f"2->3 vote_resp t3 {answer}"]}, last


def test_a_server_seeing_a_higher_term_adopts_it_and_becomes_follower():
    """§3.3: a server that sees a larger term adopts it (persisted, vote cleared); a
    leader or candidate reverts to follower."""
    n = Net()
    c1 = n.elect(1)
    c1.step(AppendResponse(5, 2, 1, False, 0))  # answering the append 1 sent 2
    assert c1.role is Role.FOLLOWER
    assert (c1.term, c1.vote, c1.leader) == (5, None, None)
    assert view(take(c1)) == {"hs": (5, None, 2)}
    candidate = new_core(3, pre_vote=False)
    drain(candidate)
    timed_out(candidate)
    drain(candidate)
    assert candidate.role is Role.CANDIDATE
    candidate.step(VoteResponse(4, 2, 3, False))
    assert candidate.role is Role.FOLLOWER
    assert view(take(candidate)) == {"hs": (4, None, 1)}


def test_a_candidate_recognizes_a_leader_of_its_own_term():
    """§3.4: a candidate that receives AppendEntries from a leader of a term at least
    as large as its own returns to follower and accepts it."""
    n = Net()
    timed_out(n[3])
    n.flush(3)
    n.deliver(to(2))
    n.flush(2)
    n.deliver(to(3))
    assert n[3].role is Role.CANDIDATE and n[3].term == 2
    n.drop()
    n.flush(3)
    n[3].step(AppendRequest(2, 1, 3, LogId(1, 1), (), 1))
    assert n[3].role is Role.FOLLOWER and n[3].leader == 1
    assert view(take(n[3])) == {"msgs": ["3->1 append_resp t2 ok 1"]}


def test_a_follower_hearing_from_a_live_leader_ignores_vote_requests():
    """§4.2.3: within a minimum election timeout of hearing from the leader a server
    neither grants nor even considers a (pre)vote, and keeps its term."""
    n = Net()
    n.elect(1)
    n.heartbeat(1)
    c2 = n[2]
    c2.step(VoteRequest(3, 3, 2, LogId(2, 2), pre_vote=True))
    c2.step(VoteRequest(3, 3, 2, LogId(2, 2)))
    assert not c2.has_ready()
    assert (c2.term, c2.vote, c2.leader) == (2, 1, 1)


def test_the_leader_lease_of_a_follower_ends_after_election_ticks():
    """§4.2.3: the disruptive-server check lasts a minimum election timeout; after that
    the follower considers votes again."""
    n = Net()
    n.elect(1)
    n.heartbeat(1)
    c2 = n[2]
    ticks(c2, ELECTION - 1)
    c2.step(VoteRequest(3, 3, 2, LogId(2, 2), pre_vote=True))
    assert not c2.has_ready()
    c2.tick()
    assert c2.role is Role.FOLLOWER and c2.leader == 1  # its own timeout is later (seeded)
    c2.step(VoteRequest(3, 3, 2, LogId(2, 2), pre_vote=True))
    assert view(take(c2)) == {"msgs": ["2->3 prevote_resp t3 yes"]}


def test_a_transfer_vote_request_is_granted_despite_a_live_leader():
    """§3.10 with §4.2.3: a campaign started by TimeoutNow carries `transfer`, so voters
    that still hear from the old leader grant it."""
    n = Net()
    n.elect(1)
    n.heartbeat(1)
    c3 = n[3]
    c3.step(VoteRequest(3, 2, 3, LogId(2, 2), transfer=True))
    assert view(take(c3)) == {"hs": (3, 2, 2), "msgs": ["3->2 vote_resp t3 yes"]}


def test_check_quorum_a_leader_cut_off_from_a_majority_steps_down():
    """§6.2: a leader that did not hear from a majority within an election timeout
    steps down; one that did stays leader."""
    n = Net()
    c1 = n.elect(1)
    for _ in range(3 * ELECTION):
        n.heartbeat(1, cut=(3,))  # 2 answers: a majority with the leader
    assert c1.role is Role.LEADER
    # Now nobody answers. The answer to the last heartbeat still counts for the period
    # running now (ending at tick ELECTION); the next period hears nothing.
    for tick in range(1, 2 * ELECTION + 1):
        assert c1.role is Role.LEADER, tick
        c1.tick()
        n.drop()
        n.flush(1)
    assert c1.role is Role.FOLLOWER
    assert (c1.term, c1.leader) == (2, None)


def test_check_quorum_does_not_count_learners():
    """§6.2 with §4.2.1: only voters make the majority a leader must hear from; a leader
    that hears from its learner alone steps down."""
    n = Net((1, 2, 3, 4), learners=(4,))
    c1 = n.elect(1)
    for _ in range(2 * ELECTION):
        n.heartbeat(1, cut=(2, 3))
    assert c1.role is Role.FOLLOWER


def test_votes_from_another_election_are_not_counted():
    """§3.4: a candidate counts votes of its own term only; a pre-candidate counts only
    pre-votes for the term it asked about."""
    core = new_core(1, voters=(1, 2, 3, 4, 5), pre_vote=False)
    drain(core)
    timed_out(core)
    drain(core)
    timed_out(core)  # a second election: term 3
    drain(core)
    assert core.role is Role.CANDIDATE and core.term == 3
    core.step(VoteResponse(2, 2, 1, True))
    core.step(VoteResponse(2, 3, 1, True))
    core.step(VoteResponse(3, 2, 1, True, pre_vote=True))
    assert core.role is Role.CANDIDATE
    core.step(VoteResponse(3, 2, 1, True))
    core.step(VoteResponse(3, 3, 1, True))
    assert core.role is Role.LEADER


def test_learners_and_non_members_never_campaign():
    """§4.2.1 / §4.1: only voters of the latest configuration start elections; a
    learner or a server outside the configuration stays quiet, even on TimeoutNow."""
    learner = new_core(4, voters=(1, 2, 3), learners=(4,))
    outsider = new_core(5, voters=(1, 2, 3))
    empty = new_core(6, state=PersistedState())
    for core in (learner, outsider, empty):
        drain(core)
        ticks(core, 10 * ELECTION)
        core.step(TimeoutNow(core.term, 1, core.id))
        assert core.role is Role.FOLLOWER
        assert not core.has_ready()


def test_a_learner_grants_a_vote():
    """§4.1: a server answers RequestVote even if it does not (yet) see itself as a
    voter: it may be one in a configuration it has not received."""
    core = new_core(4, voters=(1, 2, 3), learners=(4,))
    drain(core)
    core.step(VoteRequest(2, 1, 4, LogId(1, 1)))
    assert view(take(core)) == {"hs": (2, 1, 1), "msgs": ["4->1 vote_resp t2 yes"]}


def test_a_new_leader_appends_a_noop_of_its_term():
    """§6.4 / §3.6.2: a new leader appends a no-op entry of its term at once (and sends
    it in the same Ready) so that it can commit entries of earlier terms."""
    n = Net()
    n.campaign(1)
    assert view(n.ready(1)) == {
        "entries": ["2-2:noop"],
        "msgs": ["1->2 append t2 prev=1-1 [2..2] c1", "1->3 append t2 prev=1-1 [2..2] c1"],
    }


def test_a_single_voter_elects_itself_and_commits_its_noop():
    """§3.4: a candidate that has votes from a majority wins; alone, its own vote is a
    majority. Its no-op commits once it is on its own disk."""
    core = new_core(1, voters=(1,))
    drain(core)
    timed_out(core)
    assert core.role is Role.LEADER
    assert view(take(core)) == {"hs": (2, 1, 1), "entries": ["2-2:noop"]}
    assert view(take(core)) == {"hs": (2, 1, 2), "committed": ["2-2:noop"]}
    assert not core.has_ready()


def test_a_split_vote_times_out_into_a_new_election_at_the_next_term():
    """§3.4: a candidate that neither wins nor loses times out and starts a new
    election, incrementing its term."""
    core = new_core(1, pre_vote=False)
    drain(core)
    timed_out(core)
    assert view(take(core)) == {"hs": (2, 1, 1), "msgs": ["1->2 vote t2 last=1-1", "1->3 vote t2 last=1-1"]}
    timed_out(core)
    assert view(take(core)) == {"hs": (3, 1, 1), "msgs": ["1->2 vote t3 last=1-1", "1->3 vote t3 last=1-1"]}


def test_a_restarted_voter_keeps_its_vote_of_the_term():
    """§3.8: the vote is persistent; after a restart the server still refuses a second
    candidate of the same term."""
    core = new_core(3, state=state_with([], term=2, commit=1, vote=1))
    assert (core.term, core.vote) == (2, 1)
    drain(core)
    core.step(VoteRequest(2, 2, 3, LogId(1, 1)))
    assert view(take(core)) == {"msgs": ["3->2 vote_resp t2 no"]}
