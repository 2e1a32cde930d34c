"""Everything a node decides, without waiting (docs/architecture/node.md).

`NodeDriver` owns one `RaftCore` and the state machine around it. The daemon's Trio
loops (`metanode/node/node.py`) and the simulator's `SimNode` both call it, so the
simulator runs the daemon's own decisions, never a copy of them:

- `handle(event)`: the raft loop's typed events (`metanode/node/events.py`); requests
  are remembered by `req_id` and answered with `Reply`s (`take_replies`);
- `apply(...)`: the apply step of one Ready: restore a snapshot, apply the committed
  entries in order, answer the writes they carry (or fail those another term
  overwrote, or that a snapshot covered), release the reads whose index is applied,
  and judge whether this node was removed;
- the snapshot and purge rule (`snapshot_due`, `build_snapshot`);
- the leader's join and leave decisions (`plan_join`, `plan_leave`, `change_possible`).

Pure: no trio, no clock, no global randomness (the guard test checks it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, assert_never

import attrs

from metanode.errors import BadRequest, ClientError, FatalError, NotLeader, Timeout, Unavailable
from metanode.node.events import (
    ChangeMembership,
    Compact,
    Event,
    PeerConnected,
    Propose,
    ReadIndex,
    Receive,
    Reply,
    Tick,
    TransferLeader,
    Trust,
)
from metanode.raft.messages import AppendRequest, Heartbeat, SnapshotRequest
from metanode.raft import (
    Entry,
    Message,
    Ready,
    EntryKind,
    LogId,
    Membership,
    PersistedState,
    RaftConfig,
    RaftCore,
    ReadState,
    Snapshot,
    SnapshotMeta,
)
from metanode.sm import ApplyError, KeyChange, KVStateMachine, NodeRecord
from metanode.sm.kv import SnapshotBuilder
from metanode.sm.codec import DecodeError, decode_entry_command
from metanode.sm.commands import Command

log = logging.getLogger("metanode.node")

_LEADER_REQUESTS = (AppendRequest, Heartbeat, SnapshotRequest)
# A snapshot is due once the entries since the last one reach 1/8 of the keys (or more).
SNAPSHOT_AMORTIZE = 8


class NodeDriver:
    def __init__(
        self,
        raft_config: RaftConfig,
        state: PersistedState,
        rng: random.Random,
        *,
        learner: bool = False,
        snapshot_logs_since_last: int = 1024,
        max_applied_log_to_keep: int = 1000,
        joined_at: int | None = None,
    ) -> None:
        self.id = raft_config.id
        # The log index of the membership this node's join was answered with (0: it
        # started the cluster): memberships at or before it belong to an earlier life of
        # this id (a removed node joining again under it) and never mean "removed".
        # None: not known (a data dir of an older version): `_was_member` judges.
        self.joined_at = joined_at
        self.learner = learner
        self.snapshot_logs_since_last = snapshot_logs_since_last
        self.max_applied_log_to_keep = max_applied_log_to_keep
        self.core = RaftCore(raft_config, state, rng)
        self.synced_term_vote = (state.hard_state.term, state.hard_state.vote)  # on disk, fsynced
        self.sm = KVStateMachine()
        self.applied = LogId(0, 0)
        self.applied_membership = Membership(())
        # The index of applied_membership's entry, or for a snapshot's membership its
        # last index (the entry is at or before it, and after any older one).
        self.applied_membership_index = 0
        self.last_snapshot_index = 0
        if state.snapshot is not None:
            try:
                self.sm = KVStateMachine.restore(state.snapshot.data)
            except ValueError as e:
                raise FatalError(
                    f"snapshot {state.snapshot.meta.last_log_id} (snapshot/snap-"
                    f"{state.snapshot.meta.last_log_id.term}-{state.snapshot.meta.last_log_id.index}.bin)"
                    f" is unreadable: {e}"
                ) from None
            self.applied = state.snapshot.meta.last_log_id
            self.applied_membership = state.snapshot.meta.membership
            self.applied_membership_index = self.applied.index
            self.last_snapshot_index = self.applied.index
        # Replaying the log passes through memberships from before this node joined:
        # removal is only judged once the replay reached the commit index at start.
        self.replayed_at = self.core.commit_index
        self._was_member = self.id in self.applied_membership.node_ids
        self.removed = False
        self._check_removed()  # a snapshot of its own removal (it exited after building it)
        # log index -> (term, req_id, (time_ms, command) it holds or None): this leader's
        # proposals, answered as they apply; an entry of that term at that index is the
        # one proposed (Log Matching, §3.5), so it applies from the command at hand.
        self._writes: dict[int, tuple[int, int, tuple[int, Command] | None]] = {}
        self._reads: set[int] = set()  # req_ids of reads waiting for their read index
        self._reads_ready: list[tuple[int, int]] = []  # (read index, req_id)
        self._replies: list[Reply] = []
        # Plain counters for the metrics (metanode/metrics.py reads them at a scrape).
        self.stats_leader_changes = 0  # a new leader became known
        self.stats_proposals_failed = 0  # writes proposed here that were not applied
        self.stats_snapshot_entries = 0  # keys written to snapshots built here
        self._stats_leader: int | None = None
        # Hooks of the runtime (the watch hub): changes of each applied entry, and a
        # state machine replaced by a snapshot (its revision).
        self.on_changes: Callable[[tuple[KeyChange, ...]], None] = lambda changes: None
        self.on_restore: Callable[[int], None] = lambda rev: None

    # ------------------------------------------------------------------ raft loop
    def handle(self, event: Event) -> None:
        """Apply one event of the raft loop's inbox to the core."""
        core = self.core
        match event:
            case Tick():
                core.tick()
            case Receive(msg):
                core.step(msg)
            case Propose(items, known):
                for pos, (req_id, data) in enumerate(items):
                    try:
                        log_id = core.propose(data)
                    except ClientError as e:
                        self.stats_proposals_failed += 1
                        self._replies.append(Reply(req_id, error=e))
                    else:
                        old = self._writes.get(log_id.index)
                        if old is not None:  # a snapshot dropped the entry it waited for
                            self.stats_proposals_failed += 1
                            self._replies.append(
                                Reply(old[1], error=Unavailable("leadership changed: the write was not applied"))
                            )
                        self._writes[log_id.index] = (log_id.term, req_id, known[pos] if known else None)
            case ReadIndex(req_ids):
                for req_id in req_ids:
                    try:
                        core.read_index(req_id)
                    except ClientError as e:
                        self._replies.append(Reply(req_id, error=e))
                    else:
                        self._reads.add(req_id)
            case ChangeMembership(req_id, voters, learners):
                self._answer(req_id, lambda: core.change_membership(voters, learners))
            case Compact(req_id, snapshot, purge_to):
                self._answer(req_id, lambda: self._compact(snapshot, purge_to))
            case TransferLeader(req_id, target):
                self._answer(req_id, lambda: core.transfer_leadership(target))
            case PeerConnected(peer, req_id):
                core.peer_reconnected(peer)
                if req_id:
                    self._replies.append(Reply(req_id))
            case Trust(node_ids):
                core.trust(node_ids)
            case _:
                assert_never(event)
        if core.leader != self._stats_leader:
            self._stats_leader = core.leader
            self.stats_leader_changes += core.leader is not None

    def _answer(self, req_id: int, fn: Callable[[], Any]) -> None:
        try:
            self._replies.append(Reply(req_id, value=fn()))
        except ClientError as e:
            self._replies.append(Reply(req_id, error=e))

    def _compact(self, snapshot: Snapshot, purge_to: int) -> int:
        self.core.compact(snapshot, purge_to)
        # The core may have purged further for a snapshot just installed from the
        # leader (persisted by its own Ready): storage purges only behind ours.
        return min(self.core.log.purged.index, snapshot.meta.last_log_id.index)

    # ------------------------------------------------------------------ persisting
    def must_sync(self, ready: Ready) -> bool:
        """§3.8: entries, snapshots, term and vote must be on disk (fsynced) before the
        messages that depend on them; a commit index alone need not be (etcd's
        MustSync): it is written without an fsync, and without a thread hop."""
        hs = ready.hard_state
        return bool(ready.entries) or ready.snapshot is not None or (
            hs is not None and (hs.term, hs.vote) != self.synced_term_vote
        )

    def split_messages(self, ready: Ready) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        """(sent before persisting, sent after). A leader sends its AppendEntries,
        heartbeats and snapshot chunks while its own append is being fsynced (§10.2.1):
        it counts itself toward a commit only once its disk has the entries (the core
        counts its `stable` index). Everything else (answers, votes) waits for the disk,
        and so does everything when the term or vote is not yet durable."""
        hs = ready.hard_state
        if not self.core.is_leader or (hs is not None and (hs.term, hs.vote) != self.synced_term_vote):
            return (), ready.messages
        early = tuple(m for m in ready.messages if isinstance(m, _LEADER_REQUESTS))
        if len(early) == len(ready.messages):
            return early, ()
        return early, tuple(m for m in ready.messages if not isinstance(m, _LEADER_REQUESTS))

    def persisted(self, ready: Ready) -> None:
        if ready.hard_state is not None:
            self.synced_term_vote = (ready.hard_state.term, ready.hard_state.vote)

    def install_bytes(self, msg: SnapshotRequest) -> int:
        """The size of the snapshot file that stepping `msg` would make this node write
        (the last chunk of a snapshot it does not cover yet); 0 for any other message."""
        if msg.done and msg.meta.last_log_id.index > self.core.commit_index:
            return msg.offset + len(msg.data)
        return 0

    def take_replies(self) -> list[Reply]:
        replies, self._replies = self._replies, []
        return replies

    # ------------------------------------------------------------------ apply
    def apply(
        self,
        snapshot: Snapshot | None,
        committed: tuple[Entry, ...],
        read_states: tuple[ReadState, ...] = (),
        dropped_reads: tuple[object, ...] = (),
        restored: KVStateMachine | None = None,
    ) -> None:
        """The apply step of one Ready, in order: snapshot, entries, reads. `restored`:
        the snapshot's state machine, if the runtime built it already
        (`restore_snapshot`, in a thread)."""
        if snapshot is not None:
            self._restore(snapshot, restored)
        last = None
        try:
            for entry in committed:
                self._apply_entry(entry)
                last = entry
        finally:  # one LogId a batch: one an entry was ~5% of a leader's CPU at 64 writes a batch
            if last is not None:
                self.applied = last.log_id
        self._check_removed()
        for rs in read_states:
            req_id = rs.ctx
            if isinstance(req_id, int) and req_id in self._reads:
                self._reads.discard(req_id)
                self._reads_ready.append((rs.index, req_id))
        for req_id in dropped_reads:
            if isinstance(req_id, int) and req_id in self._reads:
                self._reads.discard(req_id)
                self._replies.append(Reply(req_id, error=NotLeader("leadership changed during the read", leader=None)))
        if self._reads_ready:
            applied = self.applied.index
            keep = []
            for index, req_id in self._reads_ready:
                if index <= applied:
                    self._replies.append(Reply(req_id, value=applied))
                else:
                    keep.append((index, req_id))
            self._reads_ready = keep

    def _restore(self, snapshot: Snapshot, restored: KVStateMachine | None) -> None:
        self.sm = restored if restored is not None else restore_snapshot(snapshot)
        self.on_restore(self.sm.rev)
        last = snapshot.meta.last_log_id.index
        for index in [i for i in self._writes if i <= last]:
            _, req_id, _ = self._writes.pop(index)
            self.stats_proposals_failed += 1
            self._replies.append(
                Reply(req_id, error=Timeout("the write's outcome is unknown: a snapshot replaced the log"))
            )
        self.applied = snapshot.meta.last_log_id
        self.applied_membership = snapshot.meta.membership
        self.applied_membership_index = self.applied.index
        self.last_snapshot_index = self.applied.index

    def _apply_entry(self, entry: Entry) -> None:
        result: Any = None
        waiting = self._writes.pop(entry.index, None)
        if entry.kind == EntryKind.NORMAL:
            known = waiting[2] if waiting is not None and waiting[0] == entry.term else None
            if known is None:
                try:
                    known = decode_entry_command(entry.data)
                except DecodeError as e:
                    result = ApplyError(f"undecodable entry {entry.log_id}: {e}")
                    log.error("%d %s", self.id, result.message)
            if known is not None:
                result = self.sm.apply(known[1], known[0])
                if self.sm.last_changes:
                    self.on_changes(self.sm.last_changes)
        elif entry.kind == EntryKind.MEMBERSHIP:
            assert entry.membership is not None
            self.applied_membership = entry.membership
            self.applied_membership_index = entry.index
            if self.id in entry.membership.node_ids:
                self._was_member = True
        if waiting is not None:
            term, req_id, _ = waiting
            if term == entry.term:
                self._replies.append(Reply(req_id, value=result))
            else:
                self.stats_proposals_failed += 1
                self._replies.append(Reply(req_id, error=Unavailable("leadership changed: the write was not applied")))

    def _check_removed(self) -> None:
        """A node that applied a committed membership without itself, later than the
        one its join was answered with, was removed (docs/operations/cluster.md): it
        stops, and does not rejoin. Without `joined_at`, only after it applied one with
        itself, and once the log held at start is replayed."""
        m = self.applied_membership
        if m.is_joint or self.removed:
            return
        if self.id in m.node_ids:
            self._was_member = True
            return
        if self.joined_at is not None:
            removed = self.applied_membership_index > self.joined_at
        else:
            removed = self._was_member and self.applied.index >= self.replayed_at
        if removed:
            log.warning("%d was removed from the cluster (membership %s): exiting", self.id, m)
            self.removed = True

    @property
    def replayed(self) -> bool:
        """The log held at start is applied (the committed membership is known)."""
        return self.applied.index >= self.replayed_at

    # ------------------------------------------------------------------ snapshots
    def snapshot_due(self, force: bool = False) -> bool:
        """Every `snapshot_logs_since_last` applied entries (or on demand), if there is
        anything new to snapshot; but a snapshot packs every key, so with a large state
        machine no more often than once per `len(sm) / SNAPSHOT_AMORTIZE` entries: its
        cost then stays a bounded share of each write's (about 0.2 us a key, so ~1.6
        us per write), where a 1M-key machine snapshotted every 1024 writes would spend
        more time snapshotting than writing."""
        if self.applied.index == 0:
            return False
        if force:
            return self.applied.index > self.last_snapshot_index or self.core.log.snapshot is None
        since = self.applied.index - self.last_snapshot_index
        return since >= self.snapshot_logs_since_last and since * SNAPSHOT_AMORTIZE >= len(self.sm)

    def begin_snapshot(self) -> SnapshotBuild:
        """A snapshot of the applied state as of now, built a slice at a time
        (`step`) while entries keep being applied: a large state machine is never
        serialized in one go (the runtime yields between slices). Its `purge_to` is
        the index to purge the log to once it is saved (keeping
        `max_applied_log_to_keep` entries behind it for slow followers)."""
        self.stats_snapshot_entries += len(self.sm)
        return SnapshotBuild(
            SnapshotMeta(self.applied, self.applied_membership),
            self.sm.snapshot_builder(),
            self.applied.index - self.max_applied_log_to_keep,
        )

    def keep_snapshot_data(self, snapshot: Snapshot) -> None:
        """The runtime stored the core's latest snapshot and hands it back with its data
        memory-mapped from the file: the core keeps that one (same snapshot, no heap)."""
        current = self.core.log.snapshot
        if current is not None and current.meta == snapshot.meta:
            self.core.log.snapshot = snapshot

    def snapshot_saved(self, snapshot: Snapshot) -> None:
        self.last_snapshot_index = max(self.last_snapshot_index, snapshot.meta.last_log_id.index)

    # ------------------------------------------------------------------ membership
    def is_member(self, m: Membership) -> bool:
        """Does `m` hold this node as it wants to be (a voter, or a learner)?"""
        return self.id in m.node_ids if self.learner else m.is_voter(self.id)

    def change_possible(self) -> bool:
        """May this leader propose a membership change now? (One at a time, after an
        entry of its own term committed, not during a leadership transfer.)"""
        core = self.core
        m = core.membership
        return (
            core.is_leader
            and not m.is_joint
            and core.committed_membership == m
            and core.log.term_at(core.commit_index) == core.term
            and not core.transferring
        )

    def plan_join(self, node_id: int, record: NodeRecord, *, fresh: bool, learner: bool, promote: bool) -> JoinPlan:
        """What this leader does for a join (docs/operations/cluster.md, "Joining").

        `fresh`: the joiner holds no cluster id (an empty data dir). Such a node whose
        id is already a voter lost its disk: letting it back would count an empty log
        in quorums and could lose committed writes, so it is refused and told to
        remove the old member first. A fresh node first joins as a learner (it gets
        the cluster id and the members); it asks to be promoted in a second call, once
        it accepts the leader's appends.
        """
        self.refuse_join(node_id, record, fresh=fresh, promote=promote)
        core = self.core
        known = self.sm.node(node_id)
        return JoinPlan(
            set_record=known != record,
            add_learner=node_id not in core.membership.node_ids,
            promote=promote and not learner and not core.membership.is_voter(node_id),
        )

    def refuse_join(self, node_id: int, record: NodeRecord, *, fresh: bool, promote: bool) -> None:
        """The refusals of `plan_join` (BadRequest), which any member can judge from
        its own log: a follower refuses at once, without waiting for a leader."""
        core = self.core
        if node_id < 0:
            raise BadRequest(f"node id must not be negative, got {node_id}")
        voter = core.membership.is_voter(node_id) or core.committed_membership.is_voter(node_id)
        if fresh and voter:
            raise BadRequest(
                f"node {node_id} is a voter of this cluster but its data dir is empty (a wiped or"
                f" lost disk): remove it first with `metanode --leave-id {node_id} --leave-via"
                " <a member's raft address>`, then start it again with an empty raft_dir and join"
            )
        known = self.sm.node(node_id)
        if fresh and node_id in core.membership.node_ids and known is not None and known != record:
            raise BadRequest(
                f"node id {node_id} is already a member at {known.endpoint}: a node with an"
                " empty data dir cannot take over its id"
            )
        if fresh and promote:
            raise BadRequest(f"node {node_id} must join as a learner before it is promoted")

    def join_steps(self, has_cluster_id: bool) -> tuple[bool, ...]:
        """The joiner's calls, as `promote` flags: a node without a cluster id, or
        without a membership yet, first joins as a learner (the reply brings the cluster
        id and whom to accept raft messages from); a voter-to-be then asks to be
        promoted."""
        steps = []
        if not has_cluster_id or not self.core.membership.node_ids:
            steps.append(False)
        if not self.learner:
            steps.append(True)
        return tuple(steps)

    def vouchers(self) -> list[int]:
        """Whom to ask about senders we dropped: the members of our log."""
        return sorted(self.member_ids() - {self.id})

    def transfer_target(self, to: int | None) -> int:
        """The voter to hand leadership to: `to`, or the most up-to-date other voter."""
        core = self.core
        if not core.is_leader:
            raise NotLeader(f"node {self.id} is not the leader", leader=core.leader)
        if to is not None:
            return to
        candidates = [p for p in sorted(core.membership.voter_ids) if p != self.id]
        if not candidates:
            raise BadRequest("no other voter to transfer leadership to")
        return max(candidates, key=lambda p: core.progress[p].match if p in core.progress else 0)

    def caught_up(self, node_id: int) -> bool:
        """A learner may become a voter once it matched our commit index."""
        pr = self.core.progress.get(node_id)
        return pr is not None and pr.match >= self.core.commit_index

    def plan_leave(self, node_id: int) -> str | None:
        """None when `node_id` is to be removed, else why there is nothing to do
        (not a member). Removing the last voter is refused (BadRequest)."""
        m = self.core.membership
        if node_id not in m.node_ids:
            return f"node {node_id} is not a member of the cluster"
        if set(m.final_voters) <= {node_id}:
            raise BadRequest(f"node {node_id} is the last voter: removing it would stop the cluster")
        return None

    def member_ids(self) -> frozenset[int]:
        """Every id in our latest and committed memberships (what we vouch for)."""
        return self.core.membership.node_ids | self.core.committed_membership.node_ids


def restore_snapshot(snapshot: Snapshot) -> KVStateMachine:
    """The state machine of a snapshot from the leader; FatalError if unreadable."""
    try:
        return KVStateMachine.restore(snapshot.data)
    except ValueError as e:
        raise FatalError(f"snapshot {snapshot.meta.last_log_id} from the leader is unreadable: {e}") from None


class SnapshotBuild:
    """A snapshot being built: `step(n)` packs `n` more keys; `finish()` gives it."""

    def __init__(self, meta: SnapshotMeta, builder: SnapshotBuilder, purge_to: int) -> None:
        self.meta = meta
        self.builder = builder
        self.purge_to = purge_to

    @property
    def done(self) -> bool:
        return self.builder.done

    def step(self, n: int) -> None:
        self.builder.step(n)

    def finish(self) -> Snapshot:
        return Snapshot(self.meta, self.builder.result())

    def parts(self) -> list[bytes]:
        """The snapshot's bytes as packed, not joined (the runtime writes them in turn)."""
        return self.builder.result_parts()

    def close(self) -> None:
        self.builder.close()


@attrs.frozen
class JoinPlan:
    set_record: bool  # replicate the joiner's node record first
    add_learner: bool  # add it as a learner
    promote: bool  # catch it up, then make it a voter


__all__ = ["JoinPlan", "NodeDriver"]
