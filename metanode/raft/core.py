"""The pure Raft consensus core: elections, replication, membership, snapshots, reads.

`RaftCore` never awaits, reads a clock or uses global randomness. Time is `tick()`;
randomness comes from the injected `rng`. The runtime drives it like etcd's `Ready`
contract (design §3):

    core.step(msg) / core.tick() / core.propose(data) / core.read_index(ctx) ...
    while core.has_ready():
        ready = core.take_ready()
        persist ready.snapshot, ready.entries, ready.hard_state   (fsync)
        send ready.messages
        apply ready.snapshot (restore) then ready.committed, answer ready.read_states
        core.advance(ready)

Reference: Diego Ongaro, "Consensus: Bridging Theory and Practice" (2014), cited as §.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterable
from typing import assert_never

import attrs

from metanode.errors import BadRequest, NotLeader, RaftInvariantError, Unavailable
from metanode.raft.log import RaftLog
from metanode.raft.messages import (
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    Message,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from metanode.raft.progress import Progress, ProgressState
from metanode.raft.types import (
    EMPTY_MEMBERSHIP,
    Entry,
    EntryKind,
    HardState,
    LogId,
    Membership,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)

log = logging.getLogger("metanode.raft")

_REQUESTS = (VoteRequest, AppendRequest, Heartbeat, SnapshotRequest, TimeoutNow)
_RESPONSES = (VoteResponse, AppendResponse, HeartbeatResponse, SnapshotResponse)
# The request a response answers (a VoteResponse answers a VoteRequest, ...).
_ASKED_BY = {VoteResponse: VoteRequest, AppendResponse: AppendRequest, HeartbeatResponse: Heartbeat,
             SnapshotResponse: SnapshotRequest}

# How long a leader keeps informing a removed peer that has not confirmed it knows.
RETIRE_TIMEOUT_ELECTIONS = 100


class Role(enum.Enum):
    FOLLOWER = "Follower"
    PRE_CANDIDATE = "PreCandidate"
    CANDIDATE = "Candidate"
    LEADER = "Leader"


@attrs.frozen
class RaftConfig:
    """Tunables of one core. Times are in ticks of the runtime's ticker."""

    id: int
    heartbeat_ticks: int = 1
    election_ticks: int = 10  # minimum election timeout (§3.4)
    election_ticks_max: int = 0  # timeouts are random in [election_ticks, this); 0: twice the minimum
    max_entries_per_msg: int = 256
    max_bytes_per_msg: int = 1 << 20
    max_inflight: int = 64
    max_apply_batch: int = 1024
    snapshot_chunk_size: int = 4 << 20
    snapshot_timeout_ticks: int = 40  # resend an unacknowledged snapshot chunk
    pre_vote: bool = True
    check_quorum: bool = True

    def __attrs_post_init__(self) -> None:
        if self.id < 0:
            raise ValueError(f"raft node id must not be negative, got {self.id}")
        if not 0 < self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need 0 < heartbeat_ticks < election_ticks")
        if self.election_ticks_max and self.election_ticks_max <= self.election_ticks:
            raise ValueError("need election_ticks < election_ticks_max")


@attrs.frozen
class ReadState:
    """A linearizable read may be served once the state machine applied `index` (§6.4)."""

    ctx: object
    index: int


@attrs.frozen
class Ready:
    """Work for the runtime, in order: persist, send, apply; then `advance(ready)`.

    - `snapshot`: a snapshot received from the leader: persist it, then restore the
      state machine from it before applying `committed`.
    - `entries`: append to the log, replacing stored entries from `entries[0].index` on.
    - `hard_state`: term, vote and commit to persist (None when unchanged).
    - `messages`: send only after the above is durable (§3.8).
    - `committed`: entries to apply in order.
    - `read_states`: confirmed reads; `dropped_reads`: contexts of reads that failed
      because this node lost leadership.
    """

    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    dropped_reads: tuple[object, ...] = ()


@attrs.frozen
class Status:
    id: int
    role: Role
    term: int
    leader: int | None
    vote: int | None
    last_log_id: LogId
    commit: int
    applied: int
    purged: LogId
    snapshot_last_log_id: LogId | None
    membership: Membership
    committed_membership: Membership
    matched: dict[int, int]  # leader only: follower id -> matched index


class RaftCore:
    def __init__(self, config: RaftConfig, state: PersistedState, rng: random.Random) -> None:
        self.config = config
        self.id = config.id
        self.rng = rng
        hs = state.hard_state
        self.term = hs.term
        self.vote = hs.vote
        snap = state.snapshot
        purged, entries = state.purged, list(state.entries)
        self.log_reset_to_snapshot = False
        if snap is not None:
            last = snap.meta.last_log_id
            # The log may keep entries behind the snapshot (max_applied_log_to_keep).
            # If it does not reach the snapshot's last entry, or disagrees there (a
            # crash during an install from the leader), the snapshot wins (§5.1).
            # The runtime must then make the stored log agree (drop its entries)
            # before it appends after the snapshot: `log_reset_to_snapshot`.
            pos = last.index - purged.index - 1
            if pos >= 0 and not (pos < len(entries) and entries[pos].term == last.term):
                purged, entries = last, []
                self.log_reset_to_snapshot = True
        applied = snap.meta.last_log_id.index if snap else 0
        self.log = RaftLog(purged, entries, max(hs.commit, applied), applied)
        if hs.commit > self.log.last_index:
            log.warning(
                "%d lost acknowledged entries: committed %d but the log ends at %d"
                " (the disk did not keep what it acknowledged; Raft assumes it does)",
                self.id, hs.commit, self.log.last_index,
            )
        self.log.snapshot = snap
        # Membership configs in the log (§4.1: the latest one is in effect once
        # appended). The first element is the base: the membership as of the
        # snapshot (or none); configs in the log after it follow in index order.
        base = (snap.meta.last_log_id.index, snap.meta.membership) if snap else (0, EMPTY_MEMBERSHIP)
        self._configs: list[tuple[int, Membership]] = [base]
        for e in entries:
            if e.kind == EntryKind.MEMBERSHIP and e.index > base[0]:
                assert e.membership is not None
                self._configs.append((e.index, e.membership))
        self._member_ids = self._configs_ids()
        # Besides the members of its log, a node accepts the ids a member named for it
        # (`trust`): a join reply, or a member's answer about senders it dropped.
        self._trusted: frozenset[int] = frozenset()
        # Peers we sent a request to in the current term: only their answers may raise
        # our term (a response nobody asked for is somebody's forgery or garbage).
        self._asked: set[tuple[int, type]] = set()  # (peer, request type)
        self.dropped_messages = 0  # from non-members, or unasked responses (a counter)
        self.strangers: set[int] = set()  # senders dropped as non-members, to ask about
        self._loss_warned_at = -1  # the leader's count past our log we warned about
        self.role = Role.FOLLOWER
        self.leader: int | None = None
        self.progress: dict[int, Progress] = {}
        # Peers removed by a committed membership, kept informed until they confirm
        # they committed their removal (or a long timeout): index, ticks left.
        self._retiring: dict[int, tuple[int, int]] = {}
        self._votes: dict[int, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = 0
        self._reset_randomized_timeout()
        self._transferee: int | None = None
        self._transfer_elapsed = 0
        # ReadIndex (§6.4): reads wait for a heartbeat round acknowledged by a quorum.
        self._read_round = 0
        self._round_unsent = False
        self._pending_reads: list[tuple[int, int, object]] = []  # (round, index, ctx)
        self._reads_waiting_commit: list[object] = []
        self._read_states: list[ReadState] = []
        self._dropped_reads: list[object] = []
        # Snapshot being received from the leader (§5.1, Figure 5.3, chunked).
        self._snap_rx: tuple[SnapshotMeta, bytearray] | None = None
        self._snapshot_to_install: Snapshot | None = None
        self._msgs: list[Message] = []
        self._need_broadcast = False
        self._prev_hard_state = HardState(self.term, self.vote, self.log.commit)
        self._ready_out = False

    # ------------------------------------------------------------------ views
    @property
    def membership(self) -> Membership:
        """The latest membership in the log, committed or not."""
        return self._configs[-1][1]

    @property
    def membership_index(self) -> int:
        """The log index of `membership` (0 for the base of a log without one)."""
        return self._configs[-1][0]

    @property
    def committed_membership(self) -> Membership:
        return self.membership_at(self.log.commit)

    def membership_at(self, index: int) -> Membership:
        for idx, m in reversed(self._configs):
            if idx <= index:
                return m
        return self._configs[0][1]

    def _configs_ids(self) -> frozenset[int]:
        return frozenset(i for _, m in self._configs for i in m.node_ids)

    def is_known_peer(self, node_id: int) -> bool:
        """A member of any configuration in our log (the snapshot's included), a peer
        the leader still tracks (a removed node being told), or one a member vouched
        for (`trust`)."""
        return node_id in self._member_ids or node_id in self.progress or node_id in self._trusted

    def trust(self, node_ids: Iterable[int]) -> None:
        """Members named by a member of the cluster: a join reply (a node being added
        holds no membership until the leader's first append), or the answer of a member
        we asked about the senders we dropped (`strangers`: our log may be too old to
        know a newer leader). Adds to what was trusted before."""
        self._trusted = (self._trusted | frozenset(node_ids)) - {self.id}
        self.strangers.difference_update(self._trusted)

    def has_asked(self, peer: int, response: type) -> bool:
        """Did we send `peer`, in the current term, the request a `response` answers
        (may such an answer raise our term)?"""
        return (peer, _ASKED_BY[response]) in self._asked

    def peer_reconnected(self, peer: int) -> None:
        """The peer's raft stream to us started again: it may have restarted with a
        log shorter than it acknowledged (or lost its disk). Count nothing of it until
        it acknowledges again, and probe it from its old match: a shortened log rejects
        that probe and tells where it ends (§3.5)."""
        pr = self.progress.get(peer)
        if self.role is not Role.LEADER or pr is None or pr.state is ProgressState.SNAPSHOT:
            return
        old = pr.match
        pr.match = 0
        pr.acked_before = max(pr.acked_before, old)
        pr.become_probe(old + 1)
        self._send_append(peer, pr)

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def commit_index(self) -> int:
        return self.log.commit

    @property
    def transferring(self) -> bool:
        """A leadership transfer is in progress (proposals and changes wait)."""
        return self._transferee is not None

    def status(self) -> Status:
        matched = {p: pr.match for p, pr in self.progress.items()} if self.is_leader else {}
        return Status(
            id=self.id,
            role=self.role,
            term=self.term,
            leader=self.leader,
            vote=self.vote,
            last_log_id=self.log.last_log_id,
            commit=self.log.commit,
            applied=self.log.applied,
            purged=self.log.purged,
            snapshot_last_log_id=self.log.snapshot.meta.last_log_id if self.log.snapshot else None,
            membership=self.membership,
            committed_membership=self.committed_membership,
            matched=matched,
        )

    def _promotable(self) -> bool:
        """A voter of its latest configuration campaigns; so does a server removed by a
        configuration not yet committed, as it may be needed until C_new commits
        (§4.2.2). Learners and servers whose removal committed stay quiet."""
        if self.membership.is_voter(self.id):
            return True
        return self._configs[-1][0] > self.log.commit and self.committed_membership.is_voter(self.id)

    def _in_lease(self) -> bool:
        """§4.2.3: within a minimum election timeout of hearing from a live leader.
        Only with CheckQuorum, which makes a cut-off leader step down in that time."""
        if not self.config.check_quorum:
            return False
        if self.role is Role.LEADER:
            return True
        return self.leader is not None and self._election_elapsed < self.config.election_ticks

    # ------------------------------------------------------------------ transitions
    def _reset_randomized_timeout(self) -> None:
        n = self.config.election_ticks
        self._randomized_timeout = self.rng.randrange(n, self.config.election_ticks_max or 2 * n)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
            self._asked.clear()
        self.leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._transferee = None
        self._fail_reads()

    def _fail_reads(self) -> None:
        self._dropped_reads.extend(ctx for _, _, ctx in self._pending_reads)
        self._dropped_reads.extend(self._reads_waiting_commit)
        self._pending_reads.clear()
        self._reads_waiting_commit.clear()
        self._round_unsent = False

    def _become_follower(self, term: int, leader: int | None) -> None:
        was = self.role
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader
        self.progress.clear()
        self._retiring.clear()
        if was is not Role.FOLLOWER:
            log.info("%d became follower at term %d", self.id, self.term)

    def _become_pre_candidate(self) -> None:
        # §9.6: PreVote does not change the term or the vote.
        self.role = Role.PRE_CANDIDATE
        self.leader = None
        self._votes = {}
        self._election_elapsed = 0
        self._reset_randomized_timeout()
        log.info("%d became pre-candidate at term %d", self.id, self.term)

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        log.info("%d became candidate at term %d", self.id, self.term)

    def _become_leader(self) -> None:
        self._reset(self.term)
        # The election is over: no vote answer can be for us any more.
        self._asked = {(p, kind) for p, kind in self._asked if kind is not VoteRequest}
        self.role = Role.LEADER
        self.leader = self.id
        log.info("%d became leader at term %d", self.id, self.term)
        self.progress = {}
        self._sync_progress()
        # §6.4 / §4.2.1 fix: a new leader commits a no-op of its own term first.
        self._append([Entry(self.term, self.log.last_index + 1, EntryKind.NOOP)])

    def _campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        if not self._promotable():
            return
        if pre_vote:
            self._become_pre_candidate()
            term, pre = self.term + 1, True
        else:
            self._become_candidate()
            term, pre = self.term, False
        self._votes = {self.id: True}
        if self._poll() is not None:
            return
        last = self.log.last_log_id
        for peer in sorted(self.membership.voter_ids - {self.id}):
            self._send(VoteRequest(term, self.id, peer, last, pre_vote=pre, transfer=transfer))

    def _poll(self) -> bool | None:
        """Tally votes: True when won (and acted on), False when lost, None if open."""
        granted = [n for n, ok in self._votes.items() if ok]
        rejected = [n for n, ok in self._votes.items() if not ok]
        if self.membership.is_quorum(granted):
            if self.role is Role.PRE_CANDIDATE:
                self._campaign(pre_vote=False)  # PreVote won: the real election
            else:
                self._become_leader()
            return True
        # Lost when the rejections alone leave no way to a quorum in some config.
        remaining = set(self.membership.voter_ids) - set(rejected)
        if not self.membership.is_quorum(remaining):
            log.info("%d lost the election at term %d", self.id, self.term)
            self._become_follower(self.term, None)
            return False
        return None

    # ------------------------------------------------------------------ time
    def tick(self) -> None:
        if self.role is Role.LEADER:
            self._tick_leader()
            return
        self._election_elapsed += 1
        if self._election_elapsed >= self._randomized_timeout and self._promotable():
            self._election_elapsed = 0
            self._campaign(pre_vote=self.config.pre_vote)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_ticks:
            self._election_elapsed = 0
            if self.config.check_quorum and not self._quorum_active():
                log.warning("%d stepped down: no quorum heard from at term %d", self.id, self.term)
                self._become_follower(self.term, None)
                return
        if self._transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.config.election_ticks:
                log.info("%d aborted leadership transfer to %d", self.id, self._transferee)
                self._transferee = None
        for peer, pr in self.progress.items():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snap_idle_ticks += 1
                if pr.snap_idle_ticks >= self.config.snapshot_timeout_ticks:
                    pr.snap_idle_ticks = 0
                    self._send_snapshot_chunk(peer, pr)
        for peer, (index, left) in list(self._retiring.items()):
            if left <= 1:
                self._forget_peer(peer)
            else:
                self._retiring[peer] = (index, left - 1)
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        """CheckQuorum (§6.2): did a quorum contact us during the last period?"""
        active = {self.id} | {p for p, pr in self.progress.items() if pr.recent_active}
        for pr in self.progress.values():
            pr.recent_active = False
        return self.membership.is_quorum(active)

    # ------------------------------------------------------------------ client requests
    def propose(self, data: bytes) -> LogId:
        """Append a command; returns its log id. It is applied (or lost) later."""
        self._check_can_propose()
        entry = Entry(self.term, self.log.last_index + 1, EntryKind.NORMAL, data)
        self._append([entry])
        return entry.log_id

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(f"node {self.id} is not the leader", leader=self.leader)
        if self._transferee is not None:
            raise Unavailable(f"leadership is being transferred to node {self._transferee}")

    def change_membership(self, voters: Iterable[int], learners: Iterable[int] = ()) -> LogId:
        """Move to the configuration (voters, learners); returns the first entry's id.

        A change of voters goes through joint consensus (§4.3): C_old,new is appended
        now, C_new by the leader once C_old,new commits. One change at a time, and
        only after this leader committed an entry of its own term (the fix to the
        single-server change bug, Ongaro's raft-dev post of 2015).
        """
        self._check_can_propose()
        try:
            target = Membership.of(voters, learners)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not target.final_voters:
            raise BadRequest("cannot remove the last voter")
        if self.log.term_at(self.log.commit) != self.term:
            raise Unavailable("the leader has not yet committed an entry of its term")
        current = self.membership
        if self._configs[-1][0] > self.log.commit or current.is_joint:
            raise Unavailable("another membership change is in progress")
        if target == current:
            index = self._configs[-1][0]
            return LogId(self.log.term_at(index) or 0, index)
        demoted = set(current.voter_ids) & set(target.learners)
        if demoted:
            raise BadRequest(
                f"nodes {sorted(demoted)} are voters: remove them first, then add them as learners"
            )
        if target.final_voters == current.final_voters:
            new = target  # learners only: no voter set changes, no joint phase
        else:
            new = Membership((current.final_voters, target.final_voters), target.learners)
        entry = Entry(self.term, self.log.last_index + 1, EntryKind.MEMBERSHIP, b"", new)
        self._append([entry])
        log.info("%d proposed membership %s at %s", self.id, new, entry.log_id)
        return entry.log_id

    def transfer_leadership(self, target: int) -> None:
        """§3.10: catch `target` up, then tell it to campaign; proposals wait meanwhile."""
        if self.role is not Role.LEADER:
            raise NotLeader(f"node {self.id} is not the leader", leader=self.leader)
        if target == self.id:
            return
        if not self.membership.is_voter(target):
            raise BadRequest(f"node {target} is not a voter")
        self._transferee = target
        self._transfer_elapsed = 0
        pr = self.progress[target]
        log.info("%d transfers leadership to %d at term %d", self.id, target, self.term)
        if pr.match == self.log.last_index:
            self._send(TimeoutNow(self.term, self.id, target))
        else:
            self._send_append(target, pr)

    def read_index(self, ctx: object) -> None:
        """Start a linearizable read (§6.4); `ctx` comes back in a `ReadState`."""
        if self.role is not Role.LEADER:
            raise NotLeader(f"node {self.id} is not the leader", leader=self.leader)
        if self.log.term_at(self.log.commit) != self.term:
            self._reads_waiting_commit.append(ctx)
            return
        self._start_read(ctx)

    def _start_read(self, ctx: object) -> None:
        if not self._round_unsent:
            self._read_round += 1
            self._round_unsent = True
        self._pending_reads.append((self._read_round, self.log.commit, ctx))
        self._release_reads()

    def _release_reads(self) -> None:
        while self._pending_reads:
            rnd, index, ctx = self._pending_reads[0]
            acked = {self.id} | {p for p, pr in self.progress.items() if pr.read_acked >= rnd}
            if not self.membership.is_quorum(acked):
                return
            self._pending_reads.pop(0)
            self._read_states.append(ReadState(ctx, index))

    def compact(self, snapshot: Snapshot, purge_upto: int) -> None:
        """The runtime built `snapshot` from the applied state: keep it for followers
        and drop log entries up to `purge_upto` (§5.1)."""
        idx = snapshot.meta.last_log_id.index
        if idx > self.log.applied:
            raise RaftInvariantError(f"snapshot at {idx} is beyond applied {self.log.applied}")
        if self.log.snapshot is None or idx > self.log.snapshot.meta.last_log_id.index:
            self.log.snapshot = snapshot
        upto = min(purge_upto, idx)
        if upto > self.log.purged.index:
            self.log.purge(upto)
            keep = [c for c in self._configs if c[0] > upto]
            self._configs = [(upto, self.membership_at(upto))] + keep
            self._member_ids = self._configs_ids()

    # ------------------------------------------------------------------ messages
    def step(self, msg: Message) -> None:
        """Handle a message from a peer. Nonsense from peers is logged and dropped."""
        problem = self._malformed(msg)
        if problem is None and not self.is_known_peer(msg.src):
            problem = f"{msg.src} is not a member"
            self.strangers.add(msg.src)
        if problem is None and msg.term > self.term and isinstance(msg, _RESPONSES) and (
            (msg.src, _ASKED_BY[type(msg)]) not in self._asked
        ):
            problem = f"a response from a newer term to nothing we asked {msg.src} in term {self.term}"
        if problem is not None:
            self.dropped_messages += 1
            log.warning("%d dropped %s: %s", self.id, msg, problem)
            return
        if msg.term > self.term:
            if isinstance(msg, VoteRequest):
                if not msg.transfer and self._in_lease():
                    log.info("%d ignored %s: leader %s is alive", self.id, msg, self.leader)
                    return
                if msg.pre_vote:
                    self._handle_vote(msg)
                    return
                self._become_follower(msg.term, None)
            elif isinstance(msg, VoteResponse) and msg.pre_vote and msg.granted:
                pass  # a granted pre-vote carries the term we asked about
            elif isinstance(msg, (AppendRequest, Heartbeat, SnapshotRequest, TimeoutNow)):
                self._become_follower(msg.term, msg.src)
            else:
                self._become_follower(msg.term, None)
        elif msg.term < self.term:
            self._step_stale(msg)
            return
        match msg:
            case VoteRequest():
                self._handle_vote(msg)
            case VoteResponse():
                self._handle_vote_response(msg)
            case AppendRequest():
                if self._heard_from_leader(msg.src):
                    self._handle_append(msg)
            case Heartbeat():
                if self._heard_from_leader(msg.src):
                    self._handle_heartbeat(msg)
            case SnapshotRequest():
                if self._heard_from_leader(msg.src):
                    self._handle_snapshot(msg)
            case TimeoutNow():
                if self._heard_from_leader(msg.src) and self._promotable():
                    log.info("%d got timeout-now from %d", self.id, msg.src)
                    self._campaign(pre_vote=False, transfer=True)
            case AppendResponse() | HeartbeatResponse() | SnapshotResponse():
                if self.role is Role.LEADER:
                    self._handle_leader_response(msg)
            case _:
                assert_never(msg)

    def _step_stale(self, msg: Message) -> None:
        """A message from an older term: tell a stale leader or candidate the news."""
        if isinstance(msg, (AppendRequest, Heartbeat, SnapshotRequest)):
            self._send(AppendResponse(self.term, self.id, msg.src, False, 0))
        elif isinstance(msg, VoteRequest) and msg.pre_vote:
            self._send(VoteResponse(self.term, self.id, msg.src, False, pre_vote=True))

    def _malformed(self, msg: Message) -> str | None:
        """What makes a message impossible from a correct peer, if anything."""
        if msg.dst != self.id:
            return f"addressed to {msg.dst}"
        if msg.src == self.id or msg.src < 0:
            return f"bad sender {msg.src}"
        if isinstance(msg, AppendRequest):
            expect, term = msg.prev_log_id.index + 1, msg.prev_log_id.term
            for e in msg.entries:
                if e.index != expect or not term <= e.term <= msg.term:
                    return f"entry {e.log_id} does not follow {LogId(term, expect - 1)} in term {msg.term}"
                expect, term = expect + 1, e.term
            if msg.prev_log_id.term > msg.term:
                return "prev entry newer than the leader's term"
        elif isinstance(msg, VoteRequest) and msg.last_log_id.term > msg.term:
            return "last entry newer than the candidate's term"
        return None

    def _heard_from_leader(self, leader: int) -> bool:
        """Note a live leader of our term; False (and dropped) if we lead this term."""
        if self.role is Role.LEADER:
            log.error("%d is leader of term %d but %d claims it too: dropped", self.id, self.term, leader)
            return False
        if self.role is not Role.FOLLOWER:
            self._become_follower(self.term, leader)
        self.leader = leader
        self._election_elapsed = 0
        return True

    def _handle_vote(self, msg: VoteRequest) -> None:
        """§3.6.1 voting rule; a learner votes too (it may be a voter in a config it has
        not seen yet, §4.1)."""
        up_to_date = self.log.is_up_to_date(msg.last_log_id)
        if not self._holds_membership_with_self():
            # A node that does not know it is a member (a wiped disk, a node being
            # added before its first append) must not vote: its empty log would make
            # any candidate look up to date and lose committed entries.
            log.info("%d rejected %s: not a member of any configuration it holds", self.id, msg)
            self._send(VoteResponse(self.term, self.id, msg.src, False, pre_vote=msg.pre_vote))
            return
        if msg.pre_vote:
            can_vote = msg.term > self.term or (
                self.vote in (None, msg.src) and self.leader is None
            )
        else:
            can_vote = self.vote in (None, msg.src) and self.leader is None
        granted = can_vote and up_to_date
        term = msg.term if (granted and msg.pre_vote) else self.term
        if granted and not msg.pre_vote:
            self.vote = msg.src
            self._election_elapsed = 0
        log.info("%d %s %s", self.id, "granted" if granted else "rejected", msg)
        self._send(VoteResponse(term, self.id, msg.src, granted, pre_vote=msg.pre_vote))

    def _holds_membership_with_self(self) -> bool:
        return self.id in self.membership.node_ids or self.id in self.committed_membership.node_ids

    def _handle_vote_response(self, msg: VoteResponse) -> None:
        if msg.pre_vote != (self.role is Role.PRE_CANDIDATE):
            return
        if self.role not in (Role.PRE_CANDIDATE, Role.CANDIDATE):
            return
        if msg.pre_vote and msg.term != self.term + 1 and msg.granted:
            return
        self._votes[msg.src] = msg.granted
        self._poll()

    def _handle_append(self, msg: AppendRequest) -> None:
        prev, entries = msg.prev_log_id, list(msg.entries)
        lg = self.log
        if msg.acked > lg.last_index:
            log.warning(
                "%d lost acknowledged entries: leader %d says we acknowledged up to %d but our log ends at %d"
                " (the disk did not keep what it acknowledged); catching up from the leader",
                self.id, msg.src, msg.acked, lg.last_index,
            )
        if prev.index < lg.commit:
            # Entries up to our commit are known to match (§3.5 log matching); skip them.
            entries = [e for e in entries if e.index > lg.commit]
            if not entries:
                self._send(AppendResponse(self.term, self.id, msg.src, True, lg.commit))
                return
            prev = LogId(lg.term_at(lg.commit) or 0, lg.commit)
        if prev.index < lg.purged.index or not lg.matches(prev):
            self._send(self._reject(msg.src, prev.index))
            return
        # Find the first entry that is new or conflicts (§3.5: delete a conflicting
        # entry and all that follow it).
        for pos, e in enumerate(entries):
            if lg.term_at(e.index) != e.term:
                self._append(entries[pos:])
                break
        last_new = prev.index + len(entries)
        if msg.commit > lg.commit:
            self._commit_to(min(msg.commit, last_new))
        self._send(AppendResponse(self.term, self.id, msg.src, True, last_new))

    def _reject(self, to: int, index: int) -> AppendResponse:
        lg = self.log
        if index > lg.last_index:
            return AppendResponse(self.term, self.id, to, False, index, 0, lg.last_index + 1)
        term = lg.term_at(index)
        if term is None:  # behind our purge point: cannot happen for a sane leader
            return AppendResponse(self.term, self.id, to, False, index, 0, lg.commit + 1)
        return AppendResponse(
            self.term, self.id, to, False, index, term, max(lg.first_index_of_term(index), lg.commit + 1)
        )

    def _handle_heartbeat(self, msg: Heartbeat) -> None:
        if msg.commit > self.log.last_index:
            # A heartbeat's commit is capped at what the leader believes we matched:
            # we lost entries we acknowledged. Say so, and reject that index as an
            # append would, so that the leader stops counting them and sends them again.
            if msg.commit != self._loss_warned_at:
                self._loss_warned_at = msg.commit
                log.warning(
                    "%d lost acknowledged entries: leader %d counts us up to %d but our log ends at %d"
                    " (the disk did not keep what it acknowledged); catching up from the leader",
                    self.id, msg.src, msg.commit, self.log.last_index,
                )
            self._send(self._reject(msg.src, msg.commit))
        commit = min(msg.commit, self.log.last_index)
        if commit > self.log.commit:
            self._commit_to(commit)
        self._send(HeartbeatResponse(self.term, self.id, msg.src, msg.ctx, self.log.commit))

    def _handle_snapshot(self, msg: SnapshotRequest) -> None:
        meta = msg.meta
        last = meta.last_log_id
        if last.index <= self.log.commit:
            # Already have everything it covers (§5.1, Figure 5.3: ignore).
            self._snap_rx = None
            self._send(SnapshotResponse(self.term, self.id, msg.src, last, 0, done=True))
            return
        if msg.offset == 0:
            self._snap_rx = (meta, bytearray())
        rx = self._snap_rx
        if rx is None or rx[0] != meta or msg.offset != len(rx[1]):
            expect = len(rx[1]) if rx is not None and rx[0] == meta else 0
            self._send(SnapshotResponse(self.term, self.id, msg.src, last, expect))
            return
        rx[1].extend(msg.data)
        if not msg.done:
            self._send(SnapshotResponse(self.term, self.id, msg.src, last, len(rx[1])))
            return
        self._snap_rx = None
        snapshot = Snapshot(meta, bytes(rx[1]))
        log.info("%d installs snapshot %s from %d", self.id, last, msg.src)
        self.log.restore(snapshot)
        self._configs = [(last.index, meta.membership)]
        self._member_ids = self._configs_ids()
        self._snapshot_to_install = snapshot
        self._send(SnapshotResponse(self.term, self.id, msg.src, last, len(snapshot.data), done=True))

    # ------------------------------------------------------------------ leader side
    def _handle_leader_response(
        self, msg: AppendResponse | HeartbeatResponse | SnapshotResponse
    ) -> None:
        pr = self.progress.get(msg.src)
        if pr is None:
            return
        pr.recent_active = True
        match msg:
            case AppendResponse():
                self._handle_append_response(msg.src, pr, msg)
            case HeartbeatResponse():
                if msg.ctx > pr.read_acked:
                    pr.read_acked = msg.ctx
                    self._release_reads()
                retiring = self._retiring.get(msg.src)
                if retiring is not None and msg.commit >= retiring[0]:
                    self._forget_peer(msg.src)  # it knows it was removed
                    return
                if pr.match < self.log.last_index:
                    self._unstick(msg.src, pr)
            case SnapshotResponse():
                self._handle_snapshot_response(msg.src, pr, msg)
            case _:
                assert_never(msg)

    def _handle_append_response(self, peer: int, pr: Progress, msg: AppendResponse) -> None:
        if msg.success:
            if msg.index > self.log.last_index:
                log.warning("%d dropped %s: beyond our last index", self.id, msg)
                return
            progressed = pr.acked(msg.index)
            if pr.state is ProgressState.PROBE:
                pr.become_replicate()  # the match is found (or already known)
            if progressed:
                self._maybe_commit()
                if self.role is not Role.LEADER:
                    return
                if peer == self._transferee and pr.match == self.log.last_index:
                    self._send(TimeoutNow(self.term, self.id, peer))
            self._send_append(peer, pr)
            return
        # Rejected: ignore answers to appends sent before the match was known, else
        # back off (§3.5, by term). A plain short-log hint at or below the match is
        # never ignored: the follower's log ends before what it acknowledged.
        if pr.state is ProgressState.SNAPSHOT:
            return
        lost = msg.hint_term == 0 and 0 < msg.hint_index <= max(pr.match, pr.acked_before)
        if msg.index < pr.match and not lost:
            return
        if pr.state is ProgressState.PROBE and msg.index != pr.next - 1 and not lost:
            return
        if msg.hint_term > 0:
            j = self.log.last_index_of_term(msg.hint_term, msg.index)
            nxt = j + 1 if j is not None else msg.hint_index
        else:
            nxt = msg.hint_index
        nxt = max(1, min(nxt, msg.index))
        if nxt <= pr.match:
            # It no longer holds entries it acknowledged (a disk that lost its tail; or
            # an old answer, which costs one probe): never count them again. Its log
            # is a prefix of what it acknowledged, so a plain short-log hint is still
            # matched up to its end; a term conflict below the match trusts nothing.
            log.warning(
                "%d: follower %d no longer holds entries it acknowledged (match %d, it rejects %d,"
                " hint %d-%d): probing it again", self.id, peer, pr.match, msg.index, msg.hint_term, msg.hint_index,
            )
            pr.match = nxt - 1 if msg.hint_term == 0 else 0
        if lost and msg.hint_index <= pr.acked_before:
            log.warning(
                "%d: follower %d came back without entries it acknowledged (up to %d; its log ends at %d)",
                self.id, peer, pr.acked_before, msg.hint_index - 1,
            )
            pr.tell_lost = pr.acked_before  # the next append tells it so
            pr.acked_before = 0
        pr.become_probe(nxt)
        self._send_append(peer, pr)

    def _handle_snapshot_response(self, peer: int, pr: Progress, msg: SnapshotResponse) -> None:
        if msg.done:
            pr.acked(msg.last_log_id.index)
            if pr.state is ProgressState.SNAPSHOT:
                pr.become_probe(pr.match + 1)
            self._maybe_commit()
            if self.role is Role.LEADER:
                self._send_append(peer, pr)
            return
        snap = pr.snapshot
        if pr.state is not ProgressState.SNAPSHOT or snap is None:
            return
        if msg.last_log_id != snap.meta.last_log_id:
            return
        pr.snap_offset = msg.next_offset
        pr.snap_idle_ticks = 0
        pr.snap_resent = False
        self._send_snapshot_chunk(peer, pr)

    def _unstick(self, peer: int, pr: Progress) -> None:
        """On a heartbeat answer from a lagging follower, restart lost replication."""
        if pr.state is ProgressState.SNAPSHOT:
            # A heartbeat sent after the chunk came back on the same ordered stream, and
            # the chunk's answer did not: the chunk was lost (the link was down when it
            # went out). Resend it now rather than after snapshot_timeout_ticks (§5.1);
            # once per chunk (a follower may be dropping it: no room for the install).
            if pr.snap_idle_ticks >= 2 * self.config.heartbeat_ticks and not pr.snap_resent:
                pr.snap_idle_ticks = 0
                pr.snap_resent = True
                self._send_snapshot_chunk(peer, pr)
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = False
            self._send_append(peer, pr)
        elif pr.state is ProgressState.REPLICATE:
            pr.stalled_heartbeats += 1
            if pr.stalled_heartbeats >= 2:  # appends got lost: find the match again
                pr.stalled_heartbeats = 0
                pr.become_probe(pr.match + 1)
                self._send_append(peer, pr)

    def _send_append(self, peer: int, pr: Progress) -> None:
        lg = self.log
        if pr.state is ProgressState.SNAPSHOT:
            return
        if pr.state is ProgressState.PROBE and pr.probe_sent:
            return
        if pr.state is ProgressState.REPLICATE and (
            len(pr.inflight) >= self.config.max_inflight or pr.next > lg.last_index
        ):
            return
        prev_index = pr.next - 1
        prev_term = lg.term_at(prev_index)
        if prev_term is None:
            snap = lg.snapshot
            if snap is None:
                raise RaftInvariantError(f"{self.id}: {peer} needs entries purged without a snapshot")
            log.info("%d sends snapshot %s to %d", self.id, snap.meta.last_log_id, peer)
            pr.become_snapshot(snap)
            self._send_snapshot_chunk(peer, pr)
            return
        entries = lg.slice(
            pr.next, lg.last_index + 1, self.config.max_entries_per_msg, self.config.max_bytes_per_msg
        )
        self._send(
            AppendRequest(
                self.term, self.id, peer, LogId(prev_term, prev_index), tuple(entries), lg.commit, pr.tell_lost
            )
        )
        pr.tell_lost = 0
        if pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        elif entries:
            pr.next = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)

    def _send_snapshot_chunk(self, peer: int, pr: Progress) -> None:
        snap = pr.snapshot
        assert snap is not None
        size = self.config.snapshot_chunk_size
        data = snap.data[pr.snap_offset : pr.snap_offset + size]
        done = pr.snap_offset + len(data) >= len(snap.data)
        self._send(SnapshotRequest(self.term, self.id, peer, snap.meta, pr.snap_offset, data, done))

    def _broadcast_heartbeat(self) -> None:
        ctx = self._read_round
        self._round_unsent = False
        for peer, pr in self.progress.items():
            commit = min(pr.match, self.log.commit)
            self._send(Heartbeat(self.term, self.id, peer, commit, ctx))

    def _maybe_commit(self) -> None:
        """§3.6.2: commit the highest index stored on a quorum, if of the current term."""
        matched = {p: pr.match for p, pr in self.progress.items()}
        matched[self.id] = self.log.stable
        index = self.membership.committed_index(matched)
        if index > self.log.commit and self.log.term_at(index) == self.term:
            self._commit_to(index)

    def _commit_to(self, index: int) -> None:
        before = self.committed_membership
        was_own_term = self.log.term_at(self.log.commit) == self.term
        self.log.commit = index
        if self.role is not Role.LEADER:
            return
        if not was_own_term and self.log.term_at(index) == self.term:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for ctx in waiting:
                self._start_read(ctx)
        committed = self.committed_membership
        if committed is self.membership and committed.is_joint:
            # §4.3: C_old,new committed (now, or known committed when this leader was
            # elected: its no-op just committed), so append C_new.
            final = committed.finalized()
            self._append([Entry(self.term, self.log.last_index + 1, EntryKind.MEMBERSHIP, b"", final)])
            log.info("%d proposed membership %s", self.id, final)
        if committed is before:
            return
        self._sync_progress()
        if not committed.is_joint and not committed.is_voter(self.id):
            # §4.2.2: a leader that is not in C_new steps down once C_new commits;
            # hand over to the most up-to-date voter so nobody waits for a timeout.
            best = max(
                (p for p in committed.voter_ids if p in self.progress),
                key=lambda p: self.progress[p].match,
                default=None,
            )
            if best is not None and self.progress[best].match == self.log.last_index:
                self._send(TimeoutNow(self.term, self.id, best))
            log.info("%d stepped down: removed from the cluster at term %d", self.id, self.term)
            self._become_follower(self.term, None)

    def _sync_progress(self) -> None:
        """Track every node of the latest and the committed membership; peers dropped
        from both keep getting heartbeats for a while so they learn they are out."""
        wanted = (self.membership.node_ids | self.committed_membership.node_ids) - {self.id}
        for peer in wanted:
            if peer not in self.progress or peer in self._retiring:
                # New, or added again after its removal: whatever answers under that id
                # now may be another node (an empty disk), so nothing of the old
                # progress counts (found by the robustness suite).
                self.progress[peer] = Progress(self.log.last_index + 1)
            self._retiring.pop(peer, None)
        for peer in list(self.progress):
            if peer not in wanted and peer not in self._retiring:
                self._retiring[peer] = (self.log.commit, RETIRE_TIMEOUT_ELECTIONS * self.config.election_ticks)

    def _forget_peer(self, peer: int) -> None:
        self._retiring.pop(peer, None)
        self.progress.pop(peer, None)

    def _append(self, entries: list[Entry]) -> None:
        self.log.append(entries)
        # Configs of a truncated suffix go with it (§4.1: a server uses the latest
        # configuration in its log, committed or not).
        first = entries[0].index
        changed = False
        while len(self._configs) > 1 and self._configs[-1][0] >= first:
            self._configs.pop()
            changed = True
        for e in entries:
            if e.kind == EntryKind.MEMBERSHIP:
                assert e.membership is not None
                self._configs.append((e.index, e.membership))
                changed = True
        if changed:
            self._member_ids = self._configs_ids()
        if self.role is Role.LEADER:
            if changed:
                self._sync_progress()
            self._need_broadcast = True

    def _send(self, msg: Message) -> None:
        if isinstance(msg, _REQUESTS):
            self._asked.add((msg.dst, type(msg)))
        self._msgs.append(msg)

    # ------------------------------------------------------------------ Ready
    def has_ready(self) -> bool:
        lg = self.log
        return bool(
            self._msgs
            or self._need_broadcast
            or self._round_unsent
            or self._snapshot_to_install is not None
            or lg.stable < lg.last_index
            or min(lg.commit, lg.stable) > lg.applied
            or self._read_states
            or self._dropped_reads
            or self._hard_state_moved()
        )

    def _hard_state_moved(self) -> bool:
        """`_hard_state() != _prev_hard_state`, without making one (a few times a Ready)."""
        prev = self._prev_hard_state
        return self.term != prev.term or self.vote != prev.vote or self.log.commit != prev.commit

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.commit)

    def take_ready(self) -> Ready:
        if self._ready_out:
            raise RaftInvariantError("take_ready() again before advance()")
        if self.role is Role.LEADER:
            if self._need_broadcast:
                self._need_broadcast = False
                for peer, pr in self.progress.items():
                    self._send_append(peer, pr)
            if self._round_unsent:
                self._broadcast_heartbeat()
        self._need_broadcast = False
        self._round_unsent = False
        ready = Ready(
            hard_state=self._hard_state() if self._hard_state_moved() else None,
            snapshot=self._snapshot_to_install,
            entries=tuple(self.log.unstable()),
            messages=tuple(self._msgs),
            committed=tuple(self.log.to_apply(self.config.max_apply_batch)),
            read_states=tuple(self._read_states),
            dropped_reads=tuple(self._dropped_reads),
        )
        self._msgs = []
        self._read_states = []
        self._dropped_reads = []
        self._snapshot_to_install = None
        self._ready_out = True
        return ready

    def advance(self, ready: Ready) -> None:
        """The runtime persisted, sent and applied what `ready` held."""
        self._ready_out = False
        if ready.hard_state is not None:
            self._prev_hard_state = ready.hard_state
        if ready.entries:
            self.log.stable_to(ready.entries[-1].log_id)
        if ready.committed:
            self.log.applied = max(self.log.applied, ready.committed[-1].index)
        if self.role is Role.LEADER and ready.entries:
            self._maybe_commit()
