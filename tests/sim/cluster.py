"""A deterministic simulated cluster of pure raft cores (design §7.2).

Everything runs on one seeded `random.Random` and a discrete-event queue of
simulated milliseconds: ticks, message deliveries, disk writes, client requests,
faults. The network drops, delays, reorders, duplicates and partitions messages;
a crash loses everything a node has not persisted; a slow disk delays a node's
`Ready` (and the messages that depend on it). The runtime here follows the core's
contract exactly as the daemon does: persist, then send, then apply, then advance.

Invariants are checked as events happen (each check is incremental and O(1) per
entry): election safety, log matching, leader completeness, state machine safety,
applied prefixes equal across nodes, and the state machine's seq never decreasing.
A violation raises `InvariantViolation` naming the rule, the node and the time.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any

import attrs

from metanode.errors import ClientError, Unavailable
from metanode.node.driver import NodeDriver, SnapshotBuild
from metanode.node.events import Compact, PeerConnected, Propose, ReadIndex, Receive, Tick, Trust
from metanode.raft import (
    ZERO_LOG_ID,
    Entry,
    HardState,
    LogId,
    Message,
    PersistedState,
    RaftConfig,
    RaftCore,
    Ready,
    Role,
    Snapshot,
    bootstrap_state,
)
from metanode.sm import KVStateMachine, MatchSeq, Upsert
from metanode.sm import codec as sm_codec

TICK_MS = 50


class InvariantViolation(AssertionError):
    pass


# --------------------------------------------------------------------- commands
def encode_command(kind: str, key: str, value: bytes | None, expect_seq: int | None, time_ms: int) -> bytes:
    """A client's put / cas / delete as the daemon encodes it into a log entry."""
    match_seq = MatchSeq(exact=expect_seq) if kind == "cas" else None
    return sm_codec.encode_command(Upsert(key, value if kind != "delete" else None, match_seq), time_ms)


def apply_command(sm: KVStateMachine, data: bytes) -> Any:
    entry = sm_codec.decode_command(data)
    return sm.apply(entry.cmd, entry.time_ms)


# --------------------------------------------------------------------- disk
@attrs.define
class Disk:
    """What survives a crash: hard state, snapshot, and the log after `purged`."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = attrs.Factory(list)
    purged: LogId = ZERO_LOG_ID
    joined_at: int | None = None  # the daemon's NodeMeta.joined_at (0: a founding node)

    def persisted(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, tuple(self.entries), self.purged)

    def write(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            self.snapshot = ready.snapshot
            self.entries = []
            self.purged = ready.snapshot.meta.last_log_id
        if ready.entries:
            first = ready.entries[0].index
            del self.entries[first - self.purged.index - 1 :]
            self.entries.extend(ready.entries)
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state

    def purge(self, upto: int) -> None:
        if upto <= self.purged.index:
            return
        pos = upto - self.purged.index - 1
        self.purged = self.entries[pos].log_id
        del self.entries[: pos + 1]


# --------------------------------------------------------------------- node
class SimNode:
    """One simulated node: the daemon's own `NodeDriver` (every decision: waiters,
    apply step, reads, snapshot and purge rule, removal) with the simulator standing in
    for the Trio loops, the disk and the network. Only the waiting is simulated here."""

    def __init__(self, cluster: Cluster, node_id: int, disk: Disk) -> None:
        self.cluster = cluster
        self.id = node_id
        self.disk = disk
        self.life = 0
        self.ticks = 0
        self.up = False
        self.retired = False
        self.removed_self = False  # it exited because it applied its own removal
        self.disk_slow_ms = 0  # upper bound of a random per-Ready disk latency
        self.clock_rate = 1.0
        self.trusted: frozenset[int] = frozenset()  # the members its join reply named
        self.driver: NodeDriver
        self.pending_ready: Ready | None = None
        self.mailbox: list[Message] = []
        self.last_seq = 0
        self.commit_seen = 0
        self.callbacks: dict[int, tuple[str, Callable[[Any], None]]] = {}  # req_id -> (kind, reply)
        self.building: SnapshotBuild | None = None  # a snapshot being built

    # the driver's state, as the daemon's views read it
    @property
    def core(self) -> RaftCore:
        return self.driver.core

    @property
    def sm(self) -> KVStateMachine:
        return self.driver.sm

    @property
    def applied(self) -> int:
        return self.driver.applied.index

    def start(self) -> None:
        c = self.cluster
        self.life += 1
        self.ticks = 0
        self.up = True
        self.pending_ready = None
        self.driver = NodeDriver(
            c.raft_config(self.id), self.disk.persisted(), random.Random(c.rng.random()),
            snapshot_logs_since_last=c.snapshot_every, max_applied_log_to_keep=c.keep_after_snapshot,
            joined_at=self.disk.joined_at,
        )
        if not self.core.membership.node_ids:
            # A node that holds no membership yet joins again on restart (the daemon
            # refuses to start otherwise): the reply names the current members.
            leader = c.leader()
            if leader is not None:
                self.trusted = leader.driver.member_ids() | {leader.id}
        self.driver.handle(Trust(self.trusted))
        if self.life > 1:
            # Its raft streams to the others start again: they count nothing of it
            # until it acknowledges again (the daemon's `on_stream`).
            for other in c.nodes.values():
                if other.id != self.id:
                    c.schedule(c.rng.randint(*c.delay), other._stream_started, self.id)
        if self.core.log_reset_to_snapshot:  # as the daemon does: the snapshot wins
            self.disk.write(Ready(snapshot=self.disk.snapshot))
        self.last_seq = self.sm.last_seq
        self.commit_seen = self.core.commit_index
        if not c.manual:
            c.schedule(c.rng.randrange(1, TICK_MS), self._tick, self.life)

    def crash(self) -> None:
        self.up = False
        self.pending_ready = None
        self.mailbox = []
        if self.building is not None:
            self.building.close()
            self.building = None
        callbacks, self.callbacks = self.callbacks, {}
        for kind, reply in callbacks.values():
            reply(None if kind == "write" else -1)  # a write's outcome is unknown

    def _tick(self, life: int) -> None:
        if not self.up or life != self.life:
            return
        c = self.cluster
        c.schedule(max(1, int(TICK_MS * self.clock_rate)), self._tick, life)
        if self.pending_ready is not None:
            return  # busy in fsync: this tick is late, like a real ticker's
        self.driver.handle(Tick())
        self.ticks += 1
        if self.core.strangers and self.ticks % 10 == 0:
            self._ask_about_strangers()
        self.pump()

    def _ask_about_strangers(self) -> None:
        """Ask a member of our log which ids are members now (the daemon's `members`
        call): our log may predate a newer leader whose messages we drop."""
        c = self.cluster
        known = [n for n in c.nodes.values() if n.up and n.id != self.id and self.core.is_known_peer(n.id)
                 and (n.id, self.id) not in c.cut and (self.id, n.id) not in c.cut]
        if not known:
            return
        for voucher in known:  # the daemon asks the members of its log in turn
            if voucher.id in self.driver.vouchers():
                c.schedule(c.rng.randint(*c.delay), self._trust, self.life, voucher.driver.member_ids())

    def _stream_started(self, peer: int) -> None:
        if self.up and self.pending_ready is None and not self.cluster.manual:
            self.driver.handle(PeerConnected(peer))
            self.pump()

    def _trust(self, life: int, ids: frozenset[int]) -> None:
        if self.up and life == self.life:
            self.driver.handle(Trust(ids))

    def deliver(self, msg: Message) -> None:
        if not self.up:
            return
        if self.pending_ready is not None:
            self.mailbox.append(msg)  # the raft loop is busy in fsync: queue it
            return
        self.driver.handle(Receive(msg))
        self.pump()

    def pump(self) -> None:
        c = self.cluster
        while self.up and self.pending_ready is None and self.core.has_ready():
            ready = self.core.take_ready()
            c.check_role(self)
            # The daemon's rule: a leader's appends go out while its disk writes (§10.2.1).
            early, late = self.driver.split_messages(ready)
            for msg in early:
                c.send(msg)
            latency = c.rng.randrange(self.disk_slow_ms) if self.disk_slow_ms else 0
            if latency and (ready.entries or ready.hard_state or ready.snapshot):
                self.pending_ready = ready
                c.schedule(latency, self._complete, self.life, ready, late)
                return
            self._complete(self.life, ready, late)
        self._dispatch()

    def _complete(self, life: int, ready: Ready, late: tuple[Message, ...]) -> None:
        if not self.up or life != self.life:
            return
        c = self.cluster
        self.pending_ready = None
        if ready.entries:
            c.check_appended(self, ready.entries)
        self.disk.write(ready)
        self.driver.persisted(ready)
        for msg in late:
            c.send(msg)
        if ready.snapshot is not None:
            c.snapshots_installed += 1
        applied = ready.snapshot.meta.last_log_id.index if ready.snapshot is not None else self.applied
        for entry in ready.committed:
            if entry.index != applied + 1:
                raise InvariantViolation(f"t={c.now} node {self.id} applied {entry.index} after {applied} (gap)")
            c.check_applied(self, entry)
            applied = entry.index
        self.driver.apply(ready.snapshot, ready.committed, ready.read_states, ready.dropped_reads)
        self._check_seq()
        self.core.advance(ready)
        mailbox, self.mailbox = self.mailbox, []
        for msg in mailbox:
            self.driver.handle(Receive(msg))
        c.check_commit(self)
        c.check_role(self)
        self._maybe_snapshot()
        self._dispatch()
        if self.driver.removed:
            # The daemon exits once it applied a membership without itself.
            self.retired = self.removed_self = True
            self.crash()
            c.log(f"node {self.id} removed from the cluster: exits")
            return
        self.pump()

    def _dispatch(self, refused: int | None = None) -> None:
        """Hand the driver's replies to whoever waits on them. The request `refused`
        (just made) raises its error instead, as the daemon's API call would."""
        error: BaseException | None = None
        for r in self.driver.take_replies():
            waiting = self.callbacks.pop(r.req_id, None)
            if waiting is None:
                continue
            kind, reply = waiting
            if r.req_id == refused and r.error is not None:
                error = r.error
            elif kind == "write":
                if isinstance(r.error, Unavailable):
                    reply(False)  # another entry took its index: it can never apply
                elif r.error is not None:
                    reply(None)  # unknown outcome (a snapshot replaced the log)
                else:
                    reply(r.value)
            elif kind == "compact":
                assert r.error is None, r.error
                reply(r.value)
            else:
                reply(-1 if r.error is not None else r.value)
        if error is not None:
            raise error

    def _check_seq(self) -> None:
        if self.sm.last_seq < self.last_seq:
            raise InvariantViolation(
                f"t={self.cluster.now} node {self.id} seq went back {self.last_seq} -> {self.sm.last_seq}"
            )
        self.last_seq = self.sm.last_seq

    def _maybe_snapshot(self) -> None:
        """The daemon's rule (the driver's). Built a few keys per Ready while entries
        keep being applied (the daemon yields between slices), so the state machine's
        write overlay is exercised; then saved and compacted (the daemon's order)."""
        driver = self.driver
        if self.building is None:
            if not driver.snapshot_due():
                return
            self.building = driver.begin_snapshot()
        build = self.building
        build.step(self.cluster.rng.randint(1, 4))
        if not build.done:
            return
        self.building = None
        snapshot, purge_to = build.finish(), build.purge_to
        current = -1 if self.disk.snapshot is None else self.disk.snapshot.meta.last_log_id.index
        built = snapshot.meta.last_log_id.index
        if current < built:  # the daemon's store ignores a snapshot not newer than its own
            self.disk.snapshot = snapshot  # written to a temp file and renamed: atomic
        driver.snapshot_saved(snapshot)
        if current > built:  # a newer one from the leader was installed meanwhile: the
            return  # daemon finds its file gone and does not compact
        req_id = next(self.cluster.ctx_ids)
        self.callbacks[req_id] = ("compact", self.disk.purge)
        driver.handle(Compact(req_id, snapshot, purge_to))

    # client entry points (the node's API layer)
    def client_write(self, data: bytes, reply: Callable[[Any], None]) -> None:
        """Propose on this node; raises the ClientError (NotLeader, ...) it refused with."""
        req_id = next(self.cluster.ctx_ids)
        known = None
        if req_id % 2:  # as the daemon's leader: the command at hand (`encode_known`), applied without a decode
            time_ms, cmd = sm_codec.decode_entry_command(data)
            known = sm_codec.encode_known(cmd, time_ms)[1]
        self._request("write", Propose(((req_id, data),), (known,)), reply)

    def client_read(self, reply: Callable[[int], None]) -> None:
        self._request("read", ReadIndex((next(self.cluster.ctx_ids),)), reply)

    def _request(self, kind: str, event: Propose | ReadIndex, reply: Callable[[Any], None]) -> None:
        req_id = event.items[0][0] if isinstance(event, Propose) else event.req_ids[0]
        self.callbacks[req_id] = (kind, reply)
        self.driver.handle(event)
        self._dispatch(refused=req_id)
        self.pump()


# --------------------------------------------------------------------- cluster
class Cluster:
    def __init__(
        self,
        seed: int,
        voters: int = 3,
        *,
        drop: float = 0.0,
        dup: float = 0.0,
        delay: tuple[int, int] = (1, 10),
        snapshot_every: int = 64,
        keep_after_snapshot: int = 16,
        trace: bool = False,
        check_quorum: bool = True,
        pre_vote: bool = True,
        manual: bool = False,
    ) -> None:
        # manual: no automatic ticks or deliveries; a scripted test calls `tick()` and
        # `deliver()` and reads `transcript` (the scenario tests).
        self.manual = manual
        self.inflight: list[Message] = []
        self.check_quorum = check_quorum
        self.pre_vote = pre_vote
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0
        self._queue: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.ctx_ids = itertools.count(1)
        self.drop = drop
        self.dup = dup
        self.delay = delay
        self.snapshot_every = snapshot_every
        self.keep_after_snapshot = keep_after_snapshot
        self.cut: set[tuple[int, int]] = set()  # directed links that drop everything
        self.trace = trace
        self.transcript: list[str] = []
        self.nodes: dict[int, SimNode] = {}
        self.on_new_leader: Callable[[SimNode], None] | None = None
        # invariant bookkeeping
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.entry_prev: dict[LogId, int] = {}  # entry id -> term of the entry before it
        self.committed: dict[int, int] = {}  # index -> term
        self.applied_at: dict[int, tuple[int, int]] = {}  # index -> (term, seq after)
        self.messages_sent = 0
        self.snapshots_installed = 0
        initial = bootstrap_state(range(1, voters + 1))
        for i in range(1, voters + 1):
            self.add_node(i, Disk(initial.hard_state, None, list(initial.entries), joined_at=0))

    def raft_config(self, node_id: int) -> RaftConfig:
        return RaftConfig(node_id, heartbeat_ticks=2, election_ticks=10, snapshot_timeout_ticks=20,
                          max_entries_per_msg=32, snapshot_chunk_size=512, max_inflight=8,
                          check_quorum=self.check_quorum, pre_vote=self.pre_vote)

    def add_node(self, node_id: int, disk: Disk | None = None, joined_at: int | None = None) -> SimNode:
        """Start a node; a joining one (no `disk`) was answered with the membership at
        `joined_at`. An id that was removed earlier may join again with a new disk."""
        node = SimNode(self, node_id, disk or Disk(joined_at=joined_at))
        node.trusted = frozenset(self.nodes)  # a join reply names the members
        self.nodes[node_id] = node
        node.start()
        return node

    def log(self, line: str) -> None:
        if self.trace:
            self.transcript.append(f"{self.now:>7} {line}")

    # -- event queue
    def schedule(self, after_ms: int, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (self.now + after_ms, next(self._seq), fn, args))

    def run_until(self, t_ms: int, stop: Callable[[], bool] | None = None) -> None:
        q = self._queue
        while q and q[0][0] <= t_ms:
            when, _, fn, args = heapq.heappop(q)
            self.now = when
            fn(*args)
            if stop is not None and stop():
                return
        self.now = max(self.now, t_ms)

    def run_for(self, ms: int, stop: Callable[[], bool] | None = None) -> None:
        self.run_until(self.now + ms, stop)

    # -- network
    def send(self, msg: Message) -> None:
        self.messages_sent += 1
        if self.manual:
            self.inflight.append(msg)
            return
        if self.drop and self.rng.random() < self.drop:
            return
        lo, hi = self.delay
        self.schedule(self.rng.randint(lo, hi), self._deliver, msg)
        if self.dup and self.rng.random() < self.dup:
            self.schedule(self.rng.randint(lo, hi * 3), self._deliver, msg)

    def _deliver(self, msg: Message) -> None:
        if (msg.src, msg.dst) in self.cut:
            if self.trace:
                self.log(f"{msg}  (cut)")
            return
        node = self.nodes.get(msg.dst)
        if node is not None and node.up:
            if self.trace:
                self.log(str(msg))
            node.deliver(msg)

    # -- scripted control (manual mode)
    def tick(self, node_id: int, n: int = 1) -> None:
        node = self.nodes[node_id]
        for _ in range(n):
            if node.up:
                node.driver.handle(Tick())
                node.pump()

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for node_id in list(self.nodes):
                self.tick(node_id)

    def deliver(self, only: Callable[[Message], bool] | None = None, rounds: int = 100) -> list[str]:
        """Deliver in-flight messages (those `only` accepts; the rest stay in flight)
        round after round until none is left; returns what was delivered."""
        seen: list[str] = []
        for _ in range(rounds):
            batch = [m for m in self.inflight if only is None or only(m)]
            if not batch:
                return seen
            self.inflight = [m for m in self.inflight if not (only is None or only(m))]
            for msg in batch:
                seen.append(str(msg))
                self._deliver(msg)
        raise AssertionError(f"messages still flowing after {rounds} rounds")

    def drop_inflight(self, only: Callable[[Message], bool] | None = None) -> None:
        self.inflight = [m for m in self.inflight if only is not None and not only(m)]

    def elect(self, node_id: int) -> SimNode:
        """Make `node_id` time out and deliver until it is leader and its no-op commits."""
        node = self.nodes[node_id]
        for _ in range(3 * self.raft_config(node_id).election_ticks):
            if node.core.role is not Role.FOLLOWER:
                break
            self.tick(node_id)
        self.deliver()
        assert node.core.is_leader, f"node {node_id} did not win: {node.core.status()}"
        self.settle()
        return node

    def settle(self) -> None:
        """Heartbeat rounds until nothing moves: commits propagate to followers."""
        leader = self.leader()
        assert leader is not None
        for _ in range(3):
            self.tick(leader.id, leader.core.config.heartbeat_ticks)
            self.deliver()

    def isolate(self, node_id: int) -> None:
        for other in self.nodes:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def partition(self, *groups: set[int]) -> None:
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in g and b in g for g in groups):
                    self.cut.add((a, b))

    def heal(self) -> None:
        self.cut.clear()

    # -- views
    def leader(self) -> SimNode | None:
        """The live leader of the highest term, if any."""
        best = None
        for n in self.nodes.values():
            if n.up and n.core.role is Role.LEADER and (best is None or n.core.term > best.core.term):
                best = n
        return best

    def members(self) -> list[SimNode]:
        """Live nodes of the leader's committed membership."""
        leader = self.leader()
        if leader is None:
            return []
        ids = leader.core.committed_membership.node_ids
        return [n for n in self.up_nodes() if n.id in ids]

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up]

    # -- invariants
    def check_role(self, node: SimNode) -> None:
        """Election safety (§3.6.3): at most one leader per term."""
        core = node.core
        if core.role is Role.LEADER:
            prev = self.leaders.setdefault(core.term, node.id)
            if prev != node.id:
                raise InvariantViolation(f"t={self.now} two leaders in term {core.term}: {prev} and {node.id}")
            if getattr(node, "_checked_term", None) != core.term:
                node._checked_term = core.term  # type: ignore[attr-defined]
                self._check_leader_completeness(node)
                if self.on_new_leader is not None:
                    self.on_new_leader(node)

    def _check_leader_completeness(self, node: SimNode) -> None:
        """§3.6.3: a leader holds every entry committed before its term."""
        lg = node.core.log
        self.log(f"node {node.id} became leader at term {node.core.term}")
        for index, term in self.committed.items():
            if index <= lg.purged.index:
                continue
            if lg.term_at(index) != term:
                raise InvariantViolation(
                    f"t={self.now} leader {node.id} (term {node.core.term}) lacks committed entry"
                    f" {term}-{index} (has term {lg.term_at(index)})"
                )

    def check_appended(self, node: SimNode, entries: tuple[Entry, ...]) -> None:
        """Log matching (§3.5): same id means the same entry and the same prefix. By
        induction it is enough that equal ids always follow equal predecessor terms."""
        lg = node.core.log
        prev_term = lg.term_at(entries[0].index - 1)
        for e in entries:
            known = self.entry_prev.setdefault(e.log_id, prev_term if prev_term is not None else -1)
            if prev_term is not None and known not in (-1, prev_term):
                raise InvariantViolation(
                    f"t={self.now} log matching: node {node.id} has {e.log_id} after term {prev_term},"
                    f" another node after term {known}"
                )
            prev_term = e.term

    def check_commit(self, node: SimNode) -> None:
        """Committed entries never change (state machine safety, §3.6.3)."""
        lg = node.core.log
        for index in range(max(node.commit_seen, lg.purged.index) + 1, lg.commit + 1):
            term = lg.term_at(index)
            assert term is not None
            known = self.committed.setdefault(index, term)
            if known != term:
                raise InvariantViolation(
                    f"t={self.now} node {node.id} committed {term}-{index} but {known}-{index} was committed"
                )
        node.commit_seen = max(node.commit_seen, lg.commit)

    def check_applied(self, node: SimNode, entry: Entry) -> None:
        known = self.applied_at.get(entry.index)
        if known is None:
            self.applied_at[entry.index] = (entry.term, -1)
        elif known[0] != entry.term:
            raise InvariantViolation(
                f"t={self.now} node {node.id} applied {entry.log_id}, another node applied"
                f" {known[0]}-{entry.index}"
            )

    def check_converged(self) -> None:
        """At the end: every live member applied the same prefix to equal state."""
        members = self.members()
        snaps = {}
        for n in members:
            snaps.setdefault((n.applied, n.sm.snapshot()), []).append(n.id)
        if len(snaps) != 1:
            detail = "; ".join(f"nodes {ids} applied {k[0]}" for k, ids in snaps.items())
            raise InvariantViolation(f"t={self.now} nodes did not converge: {detail}")


def call_or_error(fn: Callable[[], Any]) -> ClientError | None:
    try:
        fn()
    except ClientError as e:
        return e
    return None
