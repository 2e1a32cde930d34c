"""A randomized run of the simulated cluster: clients, faults and membership churn.

`run_seed(seed)` builds a 3- or 5-voter cluster, lets concurrent clients issue KV
writes, conditional writes, deletes and linearizable reads while the network drops,
delays, duplicates, reorders and partitions messages, nodes crash and restart (losing
what they had not persisted), disks stall, and an operator adds learners, promotes
them, removes followers and leaders and transfers leadership. Invariants are checked
during the run (see `cluster.py`); at the end the faults stop, the cluster must make
progress and converge, and the client history must be linearizable.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import attrs

from metanode.errors import BadRequest, ClientError
from metanode.raft.messages import (
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    SnapshotResponse,
    VoteRequest,
    VoteResponse,
)
from metanode.raft.types import LogId
from metanode.sm import ApplyError, Change, Endpoint, NodeRecord
from tests.sim.cluster import Cluster, Disk, InvariantViolation, SimNode, encode_command

FORGED_TERM = 100_000  # forged frames claim terms this far ahead; no node may reach it
from tests.sim.linearizability import Op, assert_linearizable

KEYS = ("a", "b", "c", "d")
CLIENT_TIMEOUT_MS = 3000


@attrs.define
class RunStats:
    seed: int
    sim_ms: int = 0
    ops_ok: int = 0
    ops_unknown: int = 0
    elections: int = 0
    membership_changes: int = 0
    crashes: int = 0
    partitions: int = 0
    messages: int = 0
    snapshots_installed: int = 0
    removed_nodes_exited: int = 0
    rejoins: int = 0  # nodes joined under the id of a removed one
    forged_frames: int = 0
    wiped_voters_refused: int = 0
    shortened_logs: int = 0


def _sv(seqv: Any) -> tuple[int, bytes] | None:
    return None if seqv is None else (seqv.seq, seqv.data)


class Client:
    """A sequential client: one operation at a time, retried elsewhere on NotLeader."""

    def __init__(self, run: Run, cid: int) -> None:
        self.run = run
        self.id = cid
        self.counter = itertools.count()
        self.leader_hint: int | None = None

    def start(self) -> None:
        self.run.cluster.schedule(self.run.rng.randrange(10, 300), self.next_op)

    def next_op(self) -> None:
        run = self.run
        if run.cluster.now >= run.clients_stop_ms:
            return
        rng = run.rng
        key = rng.choice(KEYS)
        r = rng.random()
        if r < 0.35:
            kind = "get"
        elif r < 0.7:
            kind = "put"
        elif r < 0.9:
            kind = "cas"
        else:
            kind = "delete"
        value = f"c{self.id}-{next(self.counter)}".encode()
        expect = rng.choice(list(run.last_seen_seq.get(key, {0}))) if kind == "cas" else None
        self.attempt(kind, key, value, expect, tries=0)

    def pick_node(self) -> SimNode | None:
        c = self.run.cluster
        if self.run.rng.random() < 0.1:
            self.leader_hint = None  # now and then ask around again
        if self.leader_hint is not None and self.leader_hint in c.nodes and c.nodes[self.leader_hint].up:
            return c.nodes[self.leader_hint]
        up = [n for n in c.up_nodes() if not n.retired]
        return self.run.rng.choice(up) if up else None

    def attempt(self, kind: str, key: str, value: bytes, expect: int | None, tries: int) -> None:
        run = self.run
        c = run.cluster
        node = self.pick_node()
        if node is None or tries > 20:
            c.schedule(200, self.next_op)
            return
        call = c.now
        done = [False]

        def finish(op: Op | None) -> None:
            if done[0]:
                return
            done[0] = True
            if op is not None:
                run.history.append(op)
                if op.ret is None:
                    run.stats.ops_unknown += 1
                else:
                    run.stats.ops_ok += 1
            c.schedule(run.rng.randrange(20, 200), self.next_op)

        def timeout() -> None:
            self.leader_hint = None  # that node may be cut off: try another next time
            if kind != "get":
                finish(self._op(kind, key, value, expect, call, None, None))
            else:
                finish(None)

        c.schedule(CLIENT_TIMEOUT_MS, timeout)
        try:
            if kind == "get":

                def on_read(index: int) -> None:
                    if index < 0:  # the read failed: it had no effect
                        finish(None)
                        return
                    out = _sv(node.sm.get(key))
                    c.schedule(run.rng.randint(1, 5), finish, self._op(kind, key, value, expect, call, c.now, out))

                node.client_read(on_read)
            else:
                data = encode_command(kind, key, value, expect, c.now)

                def on_write(result: Any) -> None:
                    if result is None:  # node crashed: unknown outcome
                        finish(self._op(kind, key, value, expect, call, None, None))
                    elif result is False:  # definitely not applied
                        finish(None)
                    else:
                        assert isinstance(result, Change), result
                        out = (_sv(result.prev), _sv(result.result))
                        if result.result is not None:
                            run.last_seen_seq.setdefault(key, {0}).add(result.result.seq)
                        if run.rng.random() < 0.02:  # the reply is lost on the way
                            finish(self._op(kind, key, value, expect, call, None, None))
                            return
                        c.schedule(run.rng.randint(1, 5), finish, self._op(kind, key, value, expect, call, c.now, out))

                node.client_write(data, on_write)
        except ClientError as e:
            done[0] = True  # refused before doing anything
            self.leader_hint = getattr(e, "leader", None)
            c.schedule(run.rng.randrange(10, 100), self.attempt, kind, key, value, expect, tries + 1)

    def _op(self, kind: str, key: str, value: bytes, expect: int | None, call: int, ret: int | None, out: Any) -> Op:
        ret_f = None if ret is None else float(ret)
        if kind == "get":
            return Op.get(self.id, key, float(call), ret_f, out)
        if kind == "put":
            return Op.put(self.id, key, value, float(call), ret_f, out)
        if kind == "cas":
            return Op.cas(self.id, key, value, expect or 0, float(call), ret_f, out)
        return Op.delete(self.id, key, float(call), ret_f, out)


class Run:
    def __init__(self, seed: int, duration_ms: int = 60_000, trace: bool = False) -> None:
        self.seed = seed
        pick = random.Random(seed)
        voters = pick.choice((3, 5))
        # A quarter of the runs go without CheckQuorum: a cut-off leader then stays
        # leader, and only ReadIndex keeps its reads linearizable.
        check_quorum = pick.random() < 0.75
        self.cluster = c = Cluster(seed, voters=voters, trace=trace, check_quorum=check_quorum)
        self.rng = rng = c.rng
        c.drop = rng.choice((0.0, 0.01, 0.05))
        c.dup = rng.choice((0.0, 0.01))
        c.delay = rng.choice(((1, 5), (1, 20), (5, 60)))
        # A third of the runs are storms: a fault every 0.1-1 s instead of 0.5-4 s.
        self.fault_every = rng.choice(((500, 4000), (500, 4000), (100, 1000)))
        self.duration_ms = duration_ms
        self.calm_ms = duration_ms - 15_000  # faults and churn stop here
        self.clients_stop_ms = duration_ms - 3_000
        self.history: list[Op] = []
        self.last_seen_seq: dict[str, set[int]] = {}
        self.stats = RunStats(seed)
        self.next_id = max(c.nodes) + 1
        for n in c.nodes.values():
            n.clock_rate = rng.uniform(0.9, 1.1)
        self.clients = [Client(self, i) for i in range(rng.choice((3, 4, 5)))]

    # -- faults
    def fault(self) -> None:
        c, rng = self.cluster, self.rng
        if c.now >= self.calm_ms:
            return
        c.schedule(rng.randrange(*self.fault_every), self.fault)
        live = [n for n in c.nodes.values() if not n.retired]
        r = rng.random()
        if r < 0.3:
            victims = [n for n in live if n.up]
            if victims:
                n = rng.choice(victims)
                n.crash()
                self.stats.crashes += 1
                c.log(f"crash {n.id}")
                c.schedule(rng.randrange(300, 6000), self.restart, n)
        elif r < 0.55 and len(live) >= 2:  # (wiped voters can leave a single node)
            self.stats.partitions += 1
            ids = [n.id for n in live]
            kind = rng.random()
            leader = c.leader()
            if kind < 0.2 and leader is not None:
                c.isolate(leader.id)
                c.log(f"isolate leader {leader.id}")
            elif kind < 0.4:
                victim = rng.choice(ids)
                c.isolate(victim)
                c.log(f"isolate {victim}")
            elif kind < 0.7:
                rng.shuffle(ids)
                k = rng.randrange(1, len(ids))
                c.partition(set(ids[:k]), set(ids[k:]))
                c.log(f"partition {ids[:k]} | {ids[k:]}")
            elif kind < 0.85 and len(ids) >= 3:
                a, b = rng.sample(ids, 2)  # partial connectivity: a and b cannot talk
                c.cut.update({(a, b), (b, a)})
                c.log(f"cut {a}<->{b}")
            else:
                a, b = rng.sample(ids, 2)  # asymmetric: a hears b, b does not hear a
                c.cut.add((a, b))
                c.log(f"cut {a}->{b}")
            c.schedule(rng.randrange(self.fault_every[0], 2 * self.fault_every[1]), self.heal)
        elif r < 0.62:
            n = rng.choice(live)
            n.disk_slow_ms = rng.choice((0, 20, 200))
            c.log(f"disk of {n.id} max {n.disk_slow_ms} ms")
        elif r < 0.68:
            self.forge()
        elif r < 0.71:
            self.shorten_learner_log()
        elif r < 0.74:
            self.wipe_voter()
        else:
            self.churn()

    # -- faults outside the paper: strangers, lost disk tails, wiped disks
    def forge(self) -> None:
        """A burst of forged frames: any message from a non-member (id 99), and
        responses nobody asked for from members, all with a term far ahead. None may
        move a term (checked at the end: no node reaches FORGED_TERM)."""
        c, rng = self.cluster, self.rng
        targets = [n for n in c.up_nodes() if not n.retired]
        for _ in range(rng.randrange(1, 6)):
            if not targets:
                return
            dst = rng.choice(targets)
            term = dst.core.term + FORGED_TERM
            # A member's response is forged only where that member was not asked, in
            # this term, the request it answers: an answer to a request we did send
            # cannot be told from a forgery without peer authentication.
            last = LogId(term, 10**6)
            members = sorted(dst.driver.member_ids() - {dst.id}) or [99]
            member = rng.choice(members)
            choices = [
                HeartbeatResponse(term, 99, dst.id, 0, 0),
                AppendResponse(term, 99, dst.id, False, 5),
                VoteRequest(term, 99, dst.id, last),
                AppendRequest(term, 99, dst.id, LogId(0, 0), (), 0),
                Heartbeat(term, 99, dst.id, 10**6),
                VoteResponse(term, 99, dst.id, True),
            ] + [
                m for m in (
                    HeartbeatResponse(term, member, dst.id, 0, 0),
                    VoteResponse(term, member, dst.id, False),
                    SnapshotResponse(term, member, dst.id, LogId(1, 1), 0),
                    AppendResponse(term, member, dst.id, False, 1),
                )
                if not dst.core.has_asked(member, type(m))
            ]
            msg = rng.choice(choices)
            self.stats.forged_frames += 1
            c.log(f"forged {msg}")
            dst.deliver(msg)

    def shorten_learner_log(self) -> None:
        """A learner restarts with the tail of its log gone (a disk that lost what it
        acknowledged). Only learners: a voter losing acknowledged entries may lose
        committed ones, which Raft cannot prevent; that case has a scripted scenario."""
        c, rng = self.cluster, self.rng
        leader = c.leader()
        if leader is None:
            return
        learners = [c.nodes[i] for i in leader.core.membership.learners if i in c.nodes]
        learners = [n for n in learners if n.up and len(n.disk.entries) > 1 and not n.retired]
        if not learners:
            return
        n = rng.choice(learners)
        cut = rng.randrange(1, min(10, len(n.disk.entries)))
        n.crash()
        del n.disk.entries[-cut:]
        self.stats.shortened_logs += 1
        c.log(f"shorten the log of learner {n.id} by {cut}")
        c.schedule(rng.randrange(100, 2000), self.restart, n)

    def wipe_voter(self) -> None:
        """A follower voter loses its disk and comes back with its old id: the
        leader's join decision must refuse it; the operator then removes it (the
        documented fix) and it may join again later under a new id."""
        c, rng = self.cluster, self.rng
        leader = c.leader()
        if leader is None or not leader.driver.change_possible():
            return
        voters = set(leader.core.membership.final_voters)
        victims = [c.nodes[i] for i in sorted(voters - {leader.id}) if i in c.nodes and not c.nodes[i].retired]
        # Never more lost disks than a quorum survives: a voter wiped earlier whose
        # removal did not commit (the leader changed) still counts as lost.
        lost = [i for i in voters if i in c.nodes and c.nodes[i].retired]
        if len(voters) < 3 or not victims or len(lost) + 1 > (len(voters) - 1) // 2:
            return
        victim = rng.choice(victims)
        victim.crash()
        victim.disk = Disk()
        victim.retired = True  # its process exits: the join was refused
        c.log(f"wipe voter {victim.id}")
        try:
            leader.driver.plan_join(victim.id, _record(victim.id), fresh=True, learner=False, promote=False)
        except BadRequest as e:
            assert "--leave-id" in str(e), e
            self.stats.wiped_voters_refused += 1
        else:
            raise InvariantViolation(f"t={c.now} the wiped voter {victim.id} was let back in")
        try:
            if leader.driver.plan_leave(victim.id) is None:
                m = leader.core.membership
                leader.core.change_membership(set(m.final_voters) - {victim.id}, set(m.learners))
                c.log(f"operator removes wiped voter {victim.id}")
        except ClientError as e:
            c.log(f"leave of {victim.id} refused: {e}")
        leader.pump()

    def new_leader(self, node: SimNode) -> None:
        """Adversary: the moments right after an election are where membership and
        commit rules matter most (§3.6.2 Figure 3.7, the single-server change bug), so
        sometimes crash a fresh leader or change membership before its no-op commits."""
        c, rng = self.cluster, self.rng
        if c.now >= self.calm_ms:
            return
        r = rng.random()
        if r < 0.15:
            c.schedule(rng.randrange(1, 150), self.crash_leader, node, node.core.term)
        elif r < 0.4:
            c.schedule(rng.randrange(0, 40), self.churn)

    def crash_leader(self, node: SimNode, term: int) -> None:
        c = self.cluster
        if node.up and node.core.is_leader and node.core.term == term and c.now < self.calm_ms:
            node.crash()
            self.stats.crashes += 1
            c.log(f"crash fresh leader {node.id}")
            c.schedule(self.rng.randrange(100, 3000), self.restart, node)

    def heal(self) -> None:
        self.cluster.heal()
        self.cluster.log("heal")

    def restart(self, node: SimNode) -> None:
        if not node.up and not node.retired:
            node.start()
            self.cluster.log(f"restart {node.id}")

    # -- membership churn (an operator talking to the leader)
    def churn(self) -> None:
        c, rng = self.cluster, self.rng
        leader = c.leader()
        if leader is None:
            return
        core = leader.core
        m = core.membership
        voters = set(m.final_voters)
        learners = set(m.learners)
        r = rng.random()
        try:
            if r < 0.25 and len(voters) + len(learners) < 7:
                # A node with an empty data dir joins: the leader's own join decision.
                # Sometimes under the id of a node that was removed (the documented
                # repair): it replays the old node's membership and removal.
                gone = sorted(i for i, n in c.nodes.items() if n.retired and i not in m.node_ids)
                if gone and rng.random() < 0.4:
                    new = rng.choice(gone)
                else:
                    new = self.next_id
                    self.next_id += 1
                plan = leader.driver.plan_join(new, _record(new), fresh=True, learner=False, promote=False)
                assert plan.add_learner and not plan.promote, plan
                added = core.change_membership(voters, learners | {new})
                c.add_node(new, joined_at=added.index).clock_rate = rng.uniform(0.9, 1.1)
                self.stats.rejoins += new in gone
                c.log(f"add learner {new}")
            elif r < 0.45 and learners:
                lid = rng.choice(sorted(learners))
                plan = leader.driver.plan_join(lid, _record(lid), fresh=False, learner=False, promote=True)
                if plan.promote and leader.driver.caught_up(lid):
                    core.change_membership(voters | {lid}, learners - {lid})
                    c.log(f"promote {lid}")
            elif r < 0.6 and learners and len(voters) > 2:
                # Two voters change at once (promote one, remove another): only joint
                # consensus makes this safe (§4.3).
                lid = rng.choice(sorted(learners))
                victim = rng.choice(sorted(voters))
                core.change_membership((voters | {lid}) - {victim}, learners - {lid})
                c.log(f"swap voter {victim} for {lid}")
            elif r < 0.7 and len(voters) > 3:
                victim = rng.choice(sorted(voters - {leader.id}))
                core.change_membership(voters - {victim}, learners)
                c.log(f"remove follower {victim}")
            elif r < 0.8 and len(voters) > 3:
                core.change_membership(voters - {leader.id}, learners)
                c.log(f"remove leader {leader.id}")
            elif r < 0.9 and learners:
                victim = rng.choice(sorted(learners))
                core.change_membership(voters, learners - {victim})
                c.log(f"remove learner {victim}")
            else:
                target = rng.choice(sorted(voters))
                core.transfer_leadership(target)
                c.log(f"transfer leadership {leader.id} -> {target}")
            self.stats.membership_changes += 1
        except ClientError as e:
            c.log(f"churn refused: {e}")
        leader.pump()

    def calm_down(self) -> None:
        c = self.cluster
        c.heal()
        c.drop = 0.0
        c.dup = 0.0
        for n in c.nodes.values():
            n.disk_slow_ms = 0
            if not n.up and not n.retired:
                n.start()
        c.log("calm: faults stop")

    def run(self) -> RunStats:
        c = self.cluster
        c.on_new_leader = self.new_leader
        for client in self.clients:
            client.start()
        c.schedule(self.rng.randrange(1000, 3000), self.fault)
        c.schedule(self.calm_ms, self.calm_down)
        c.run_until(self.duration_ms)
        self.finish()
        return self.stats

    def finish(self) -> None:
        c = self.cluster
        leader = c.leader()
        if leader is None:
            raise InvariantViolation(f"no leader {15_000} ms after the faults stopped")
        # Liveness: a write after the calm period commits and every member converges.
        done: list[Any] = []
        leader.client_write(encode_command("put", "final", b"x", None, c.now), done.append)
        c.run_for(5_000, stop=lambda: bool(done))
        if not done or not isinstance(done[0], Change):
            raise InvariantViolation(f"the final write did not commit: {done}")
        target = leader.applied

        def converged() -> bool:
            members = c.members()
            return bool(members) and all(n.applied >= target and n.applied == members[0].applied for n in members)

        c.run_for(10_000, stop=converged)
        c.check_converged()
        # Liveness of membership changes: none is stuck half-way (§4.3), so the
        # operator could change the membership again.
        leader = c.leader()
        assert leader is not None
        m = leader.core.membership
        if m.is_joint or leader.core.committed_membership != m:
            raise InvariantViolation(
                f"membership change stuck at the end: latest {m}, committed {leader.core.committed_membership}"
            )
        # A node exits as removed only when it was: a member that takes an old removal
        # for its own leaves the cluster a voter short.
        wrongly = [n.id for n in c.nodes.values() if n.removed_self and n.id in m.node_ids]
        if wrongly:
            raise InvariantViolation(f"nodes {wrongly} exited as removed but are members: {m}")
        runaway = [n.id for n in c.nodes.values() if n.core.term >= FORGED_TERM]
        if runaway:
            raise InvariantViolation(f"forged frames moved the term of nodes {runaway}")
        self.stats.sim_ms = c.now
        self.stats.messages = c.messages_sent
        self.stats.snapshots_installed = c.snapshots_installed
        self.stats.removed_nodes_exited = sum(n.retired for n in c.nodes.values())
        self.stats.elections = len(c.leaders)
        assert_linearizable(self.history)
        if any(isinstance(op.out, ApplyError) for op in self.history):
            raise InvariantViolation("a client write hit an ApplyError")


def _record(node_id: int) -> NodeRecord:
    return NodeRecord(str(node_id), Endpoint("sim", node_id), None)


def run_seed(seed: int, duration_ms: int = 60_000, trace: bool = False) -> RunStats:
    return Run(seed, duration_ms, trace).run()
