"""One metanode node: the Trio runtime around the pure raft core (DESIGN §4).

`open_node(config)` opens the data dir and owns one nursery with:
- `serve_raft` (the raft port), one `PeerLink` per peer it talks to;
- `_run_raft_loop`, the only task that touches the `RaftCore`: it drains its inbox
  (messages, ticks, requests) before each `Ready`, so many proposals share one WAL
  write and one fsync (group commit) and one AppendEntries per peer (batching);
  it persists, then sends, then hands committed entries to the apply loop, then
  advances (the core's contract);
- `_run_ticker`, `_run_apply_loop` (the state machine, waiters, snapshots);
- `serve_admin` (Quart-Trio on Hypercorn);
- at start: bootstrap (`single`), join (`join`), and (re)publishing this node's record.

Reference: the Raft thesis (Ongaro 2014) for the core's rules; SPEC §3 for join/leave.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from metanode.config import Config
from metanode.errors import (
    BadRequest,
    ClientError,
    ConfigError,
    FatalError,
    NotLeader,
    Timeout,
    TransportError,
    Unavailable,
)
from metanode.trio_util import InFlight, single_errors
from metanode.node import rpc, status
from metanode.node.driver import NodeDriver
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
from metanode.node.watch import WatchHub
from metanode.raft import (
    LogId,
    Membership,
    Message,
    RaftConfig,
    RaftCore,
    Ready,
    Role,
    Snapshot,
    bootstrap_state,
)
from metanode.sm import ApplyError, Change, Command, Endpoint, KVStateMachine, NodeRecord, RemoveNode, SetNode, TxnReply
from metanode.sm import Tick as ExpiryTick
from metanode.sm.codec import DecodeError, encode_command
from metanode.storage import NodeMeta, RaftStorage
from metanode.transport import CallPool, ConnectFailed, Identity, PeerLink, call, serve_raft

log = logging.getLogger("metanode.node")

HEARTBEAT_TICKS = 5  # ticks per heartbeat interval: a tick is heartbeat_interval / 5
JOIN_TRIES = 3
JOIN_RETRY_S = 1.0
INBOX_SIZE = 10_000
APPLY_QUEUE = 64  # Readys handed to the apply loop; the raft loop waits beyond that


SHUTDOWN_GRACE_S = 2.0
# A forwarded write's reply can be far larger than the request (a txn of gets, an
# upsert's prev and result): accept big answers rather than report "unknown".
FORWARDED_REPLY_LIMIT = 1 << 30
# A client message must fit, with its entry's overhead, in one raft frame (64 MiB).
MAX_CLIENT_MESSAGE = 48 << 20


@attrs.define
class _Waiter:
    """One request waiting for the raft or apply loop."""

    event: trio.Event = attrs.Factory(trio.Event)
    value: Any = None
    error: BaseException | None = None

    def set(self, value: Any) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self, timeout: float, what: str) -> Any:
        with trio.move_on_after(timeout):
            await self.event.wait()
        if not self.event.is_set():
            raise Timeout(f"{what}: no answer within {timeout:.1f} s")
        if self.error is not None:
            raise self.error
        return self.value


@attrs.frozen
class _Applied:
    """What the raft loop hands to the apply loop for one Ready."""

    snapshot: Snapshot | None
    committed: tuple[Any, ...]
    read_states: tuple[Any, ...]
    dropped_reads: tuple[Any, ...]


class Node:
    """A running node. Create it with `open_node`."""

    def __init__(self, config: Config, storage: RaftStorage, meta: NodeMeta | None) -> None:
        rc = config.raft_config
        self.config = config
        self.storage = storage
        assert rc.id is not None
        self.id: int = rc.id
        self.meta = meta
        self.advertise_address = f"{rc.raft_advertise_host}:{rc.raft_api_port}"
        self.record = NodeRecord(
            str(self.id),
            Endpoint(rc.raft_advertise_host, rc.raft_api_port),
            config.grpc_api_advertise_address,
        )
        self.tick_s = rc.heartbeat_interval / 1000 / HEARTBEAT_TICKS
        self.raft_config = RaftConfig(
            self.id,
            heartbeat_ticks=HEARTBEAT_TICKS,
            election_ticks=2 * HEARTBEAT_TICKS,  # SPEC §2: random in [2x, 3x) heartbeats
            election_ticks_max=3 * HEARTBEAT_TICKS,
            snapshot_chunk_size=rc.snapshot_chunk_size,
            snapshot_timeout_ticks=max(1, math.ceil(rc.install_snapshot_timeout / 1000 / self.tick_s)),
        )
        self.driver: NodeDriver  # set in _start_core
        self.watch_hub = WatchHub(0)
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Event](INBOX_SIZE)
        self._apply_send, self._apply_recv = trio.open_memory_channel[_Applied](APPLY_QUEUE)
        self._links: dict[int, PeerLink] = {}
        self._addresses: dict[int, str] = {}  # raft addresses of peers we learned of
        self._nursery: trio.Nursery | None = None
        self._req_ids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}  # req_id -> the task waiting for its Reply
        self._watchers: list[tuple[Callable[[], bool], trio.Event]] = []
        self.removed = trio.Event()
        self.stopping = trio.Event()
        self._snapshot_lock = trio.Lock()
        self._membership_lock = trio.Lock()
        self.calls = InFlight()
        # Forwarded requests reuse connections to the leader (one per request would
        # leave thousands in TIME_WAIT under load).
        self.calls_to_leader = CallPool(self.identity, max_frame_size=FORWARDED_REPLY_LIMIT)
        self._tick_done: trio.Event | None = None
        # The leader's clock stamps every entry (SPEC §5: TTL by log time); a test
        # hook may replace it to skew one node's clock.
        self.clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)

    # ------------------------------------------------------------------ driver views
    @property
    def core(self) -> RaftCore:
        return self.driver.core

    @property
    def sm(self) -> KVStateMachine:
        return self.driver.sm

    @property
    def applied(self) -> LogId:
        return self.driver.applied

    @property
    def applied_membership(self) -> Membership:
        return self.driver.applied_membership

    # ------------------------------------------------------------------ identity
    def identity(self) -> Identity:
        cluster_id = self.meta.cluster_id if self.meta else None
        return Identity(self.id, self.config.raft_config.cluster_name, cluster_id, self.advertise_address)

    def _adopt_cluster_id(self, cluster_id: str) -> None:
        if self.meta is None:
            self.meta = NodeMeta(self.id, cluster_id, self.config.raft_config.cluster_name)
            self.storage.save_meta(self.meta)
            log.info("%d joined cluster %s", self.id, cluster_id)

    def _on_peer_hello(self, node_id: int, address: str) -> None:
        """A member dialed us: it may have restarted (with a shorter log), and its
        address is the freshest we know."""
        self._learn_address(node_id, address)
        self._event_nowait(PeerConnected(node_id))

    def _learn_address(self, node_id: int, address: str | None) -> None:
        """A peer told us its address (its hello, a join reply): the freshest source,
        e.g. after it restarted on a new port and before its new record is applied."""
        if address and node_id != self.id and self._addresses.get(node_id) != address:
            self._addresses[node_id] = address
            link = self._links.get(node_id)
            if link is not None:
                link.reconnect_nowait()

    def address_of(self, node_id: int) -> str | None:
        learned = self._addresses.get(node_id)
        if learned is not None:
            return learned
        rec = self.sm.node(node_id)
        return f"{rec.endpoint.addr}:{rec.endpoint.port}" if rec is not None else None

    # ------------------------------------------------------------------ start
    def _start_core(self) -> None:
        rc = self.config.raft_config
        state = self.storage.load()
        self.driver = NodeDriver(
            self.raft_config, state, random.Random(), learner=rc.learner,
            snapshot_logs_since_last=rc.snapshot_logs_since_last,
            max_applied_log_to_keep=rc.max_applied_log_to_keep,
        )
        if self.driver.core.log_reset_to_snapshot:
            # The log does not reach the snapshot (a lost WAL tail, a crash during an
            # install): the snapshot wins, and the stored entries go too.
            assert state.snapshot is not None
            log.warning("%d: the log does not reach snapshot %s: reset the log to it",
                        self.id, state.snapshot.meta.last_log_id)
            self.storage.append(snapshot=state.snapshot)
        self._synced_term_vote = (state.hard_state.term, state.hard_state.vote)
        self.watch_hub = WatchHub(self.sm.rev)
        self.driver.on_changes = self.watch_hub.on_changes
        self.driver.on_restore = self.watch_hub.reset

    def bootstrap(self) -> None:
        """`single = true` on an empty dir: a one-voter cluster with a new cluster id."""
        state = bootstrap_state([self.id])
        # The log first, the meta last: a crash in between leaves an empty-looking dir
        # that bootstraps again, never a dir with a meta and no log.
        self.storage.append(entries=state.entries, hard_state=state.hard_state)
        self.meta = NodeMeta(self.id, uuid.uuid4().hex, self.config.raft_config.cluster_name)
        self.storage.save_meta(self.meta)
        log.info("%d initialized a new cluster %s", self.id, self.meta.cluster_id)

    # ------------------------------------------------------------------ raft loop
    async def _run_ticker(self) -> None:
        tick = Tick()
        while True:
            await trio.sleep(self.tick_s)
            await self._inbox_send.send(tick)

    def on_message(self, msg: Message) -> None:
        self._event_nowait(Receive(msg))

    def _event_nowait(self, event: Event) -> None:
        try:
            self._inbox_send.send_nowait(event)
        except trio.WouldBlock:
            log.warning("%d inbox full: dropped %s", self.id, event)

    async def request(self, make: Callable[[int], Event], timeout: float | None = None, what: str = "request") -> Any:
        """Send the event `make(req_id)` to the raft loop and wait for its Reply."""
        req_id = next(self._req_ids)
        waiter = self._pending[req_id] = _Waiter()
        try:
            await self._inbox_send.send(make(req_id))
            return await waiter.wait(timeout if timeout is not None else self.wait_s(), what)
        finally:
            self._pending.pop(req_id, None)

    def _dispatch(self, replies: list[Reply]) -> None:
        for reply in replies:
            waiter = self._pending.pop(reply.req_id, None)
            if waiter is None:
                continue  # its caller gave up (timeout, cancel)
            if reply.error is not None:
                waiter.fail(reply.error)
            else:
                waiter.set(reply.value)

    async def _run_raft_loop(self) -> None:
        recv = self._inbox_recv
        while True:
            self._handle(await recv.receive())
            while True:
                try:
                    event = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                self._handle(event)
            await self._process_ready()

    def _handle(self, event: Event) -> None:
        self.driver.handle(event)

    async def _process_ready(self) -> None:
        core = self.core
        while core.has_ready():
            ready = core.take_ready()
            if ready.snapshot is not None or ready.entries or ready.hard_state is not None:
                await trio.to_thread.run_sync(self._persist, ready)
            for msg in ready.messages:
                self._send(msg)
            if ready.snapshot is not None or ready.committed or ready.read_states or ready.dropped_reads:
                await self._apply_send.send(
                    _Applied(ready.snapshot, ready.committed, ready.read_states, ready.dropped_reads)
                )
            core.advance(ready)
        self._dispatch(self.driver.take_replies())
        self._check_watchers()

    def _persist(self, ready: Ready) -> None:
        hs = ready.hard_state
        # §3.8: entries, snapshots, term and vote must be on disk before the messages
        # that depend on them; a commit index alone need not be (etcd's MustSync).
        sync = bool(ready.entries) or ready.snapshot is not None or (
            hs is not None and (hs.term, hs.vote) != (self._synced_term_vote)
        )
        self.storage.append(entries=ready.entries, hard_state=hs, snapshot=ready.snapshot, sync=sync)
        if hs is not None:
            self._synced_term_vote = (hs.term, hs.vote)

    def _send(self, msg: Message) -> None:
        link = self._links.get(msg.dst)
        if link is None:
            if self._nursery is None:
                return
            link = PeerLink(msg.dst, lambda peer=msg.dst: self.address_of(peer), self.identity)
            self._links[msg.dst] = link
            self._nursery.start_soon(link.run)
        link.send_nowait(msg)

    # ------------------------------------------------------------------ watchers
    def _check_watchers(self) -> None:
        if not self._watchers:
            return
        keep = []
        for pred, event in self._watchers:
            if pred():
                event.set()
            else:
                keep.append((pred, event))
        self._watchers = keep

    async def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until `pred()` holds; it is checked after each Ready and each apply."""
        if pred():
            return
        event = trio.Event()
        self._watchers.append((pred, event))
        with trio.move_on_after(timeout):
            await event.wait()
        if not event.is_set():
            self._watchers = [w for w in self._watchers if w[1] is not event]
            raise Timeout(f"{what}: not done within {timeout:.1f} s")

    # ------------------------------------------------------------------ apply loop
    async def _run_apply_loop(self) -> None:
        driver = self.driver
        async for batch in self._apply_recv:
            driver.apply(batch.snapshot, batch.committed, batch.read_states, batch.dropped_reads)
            self._dispatch(driver.take_replies())
            if driver.removed and not self.removed.is_set():
                self.removed.set()
            self._check_watchers()
            if driver.snapshot_due() and not self._snapshot_lock.locked():
                assert self._nursery is not None
                self._nursery.start_soon(self._build_snapshot)

    async def _build_snapshot(self, force: bool = False) -> None:
        """Snapshot the applied state, save it, then compact the core and purge the
        log behind it. Its own task: the apply loop never waits for the raft loop."""
        async with self._snapshot_lock:
            if not self.driver.snapshot_due(force):
                return
            snapshot, purge_to = self.driver.build_snapshot()
            await trio.to_thread.run_sync(self.storage.save_snapshot, snapshot)
            self.driver.snapshot_saved(snapshot)
            purged = await self.request(lambda req_id: Compact(req_id, snapshot, purge_to), what="compaction")
            await trio.to_thread.run_sync(self.storage.purge, purged)
            log.info(
                "%d built snapshot %s (%d bytes), log purged to %d",
                self.id, snapshot.meta.last_log_id, len(snapshot.data), purged,
            )

    async def trigger_snapshot(self) -> None:
        await self._build_snapshot(force=True)

    # ------------------------------------------------------------------ requests
    async def propose(self, cmd: Command, timeout: float | None = None) -> Any:
        """Propose on this node (the leader); wait until applied; the apply result."""
        data = encode_command(cmd, self.clock_ms())
        return await self.request(lambda req_id: Propose(((req_id, data),)), timeout, "write")

    async def read_barrier(self, timeout: float | None = None) -> int:
        """ReadIndex (§6.4) on this node (the leader): returns once it is safe to read."""
        return await self.request(lambda req_id: ReadIndex((req_id,)), timeout, "read")

    def wait_s(self) -> float:
        """`wait_leader_timeout` in seconds: how long requests wait for the cluster."""
        return self.config.raft_config.wait_leader_timeout / 1000

    def leader_address(self) -> str | None:
        leader = self.core.leader
        if leader is None:
            return None
        return self.advertise_address if leader == self.id else self.address_of(leader)

    async def call_leader(self, method: str, payload: bytes, local: Callable[[], Any]) -> bytes:
        """Run a request on the leader: `local()` if we lead, else forward `payload`;
        follow NotLeader hints and wait for an election, up to `wait_leader_timeout`."""
        deadline = trio.current_time() + self.wait_s()
        last: Exception | None = None
        while trio.current_time() < deadline:
            if self.core.is_leader:
                try:
                    return await local()
                except (NotLeader, Unavailable) as e:
                    last = e  # not proposed (e.g. a leadership transfer) or overwritten
            else:
                address = self.leader_address()
                if address is not None:
                    try:
                        return await self.calls_to_leader.call(
                            address, method, payload, timeout=max(0.1, deadline - trio.current_time())
                        )
                    except (NotLeader, Unavailable, ConnectFailed) as e:
                        last = e  # not applied there: safe to try again
                    except TransportError as e:
                        if method == rpc.WRITE:  # it may have been applied: never resend
                            raise Timeout(f"write forwarded to {address}: outcome unknown ({e})") from None
                        last = e
            await trio.sleep(self.tick_s * 2)
        raise Unavailable(f"no leader answered {method} within {self.wait_s():.0f} s: {last}")

    # ------------------------------------------------------------------ join / leave (leader side)
    async def on_call(self, method: str, payload: bytes, hello: Any) -> bytes:
        handlers: dict[str, tuple[type, Callable[[Any], Any] | None]] = {
            rpc.JOIN: (rpc.JoinRequest, self._join_local),
            rpc.LEAVE: (rpc.LeaveRequest, self._leave_local),
            rpc.WRITE: (rpc.WriteRequest, self._write_local),
            rpc.READ: (rpc.ReadRequest, self._read_local),
            rpc.MEMBERS: (rpc.MembersRequest, None),
        }
        if method not in handlers:
            raise BadRequest(f"unknown method {method!r}")
        cls, handler = handlers[method]
        try:
            req = rpc.decode(payload, cls)
        except DecodeError as e:
            raise BadRequest(f"bad {method} request: {e}") from None
        if isinstance(req, rpc.MembersRequest):
            return rpc.encode(rpc.MembersReply(tuple(sorted(self.driver.member_ids()))))
        assert handler is not None
        with self.calls:
            return await self.call_leader(method, payload, lambda: handler(req))

    async def _write_local(self, req: rpc.WriteRequest) -> bytes:
        result = await self.propose(req.cmd)
        if isinstance(result, ApplyError):
            return rpc.encode(rpc.WriteReply(False, result.message))
        return rpc.encode(
            rpc.WriteReply(
                True,
                change=result if isinstance(result, Change) else None,
                txn=result if isinstance(result, TxnReply) else None,
            )
        )

    async def _read_local(self, req: rpc.ReadRequest) -> bytes:
        await self._expire_due()  # a read after a key's expiry must not see it
        return rpc.encode(rpc.ReadReply(await self.read_barrier()))

    def _expiry_due(self) -> bool:
        due = self.sm.next_expiry_ms()
        return due is not None and due <= self.clock_ms()

    async def _expire_due(self) -> None:
        """On the leader: when keys are due by our clock, log a Tick so every replica
        expires them at the same log position (SPEC §5). One Tick at a time: readers
        arriving meanwhile wait for it (it is stamped after their keys were due)."""
        if self._tick_done is not None:
            await self._tick_done.wait()
            return
        if not self._expiry_due():
            return
        self._tick_done = done = trio.Event()
        try:
            await self.propose(ExpiryTick())
        finally:
            self._tick_done = None
            done.set()

    async def _run_ask_about_strangers(self) -> None:
        """Our log may predate the current leader (we were down while members
        changed): its messages are dropped as coming from a stranger. Once an election
        timeout, ask a member of our log which ids are members now, and trust those."""
        while True:
            await trio.sleep(self.tick_s * self.raft_config.election_ticks)
            strangers = set(self.core.strangers)
            if not strangers or self.meta is None:
                continue
            for peer in sorted(self.driver.member_ids() - {self.id}):
                address = self.address_of(peer)
                if address is None:
                    continue
                try:
                    body = await self.calls_to_leader.call(
                        address, rpc.MEMBERS, rpc.encode(rpc.MembersRequest()), timeout=self.tick_s * 5
                    )
                    ids = frozenset(rpc.decode(body, rpc.MembersReply).member_ids)
                except (ClientError, TransportError, DecodeError) as e:
                    log.debug("%d could not ask %d about %s: %s", self.id, peer, sorted(strangers), e)
                    continue
                log.info("%d asked %d about senders %s: members are %s", self.id, peer, sorted(strangers), sorted(ids))
                await self._inbox_send.send(Trust(ids))
                break

    async def _run_expiry(self) -> None:
        """Expire due keys even when nobody writes or reads: one check a heartbeat."""
        while True:
            await trio.sleep(self.config.raft_config.heartbeat_interval / 1000)
            if self.core.is_leader and self._expiry_due():
                try:
                    await self._expire_due()
                except ClientError as e:
                    log.debug("%d expiry tick not applied: %s", self.id, e)

    # ------------------------------------------------------------------ client requests
    async def client_write(self, cmd: Command) -> Any:
        """A client's write: proposed here when leading, else forwarded to the leader.
        Returns the apply result; a command the state machine refuses is BadRequest."""
        request = rpc.WriteRequest(cmd)
        with self.calls:
            body = await self.call_leader(rpc.WRITE, rpc.encode(request), lambda: self._write_local(request))
        reply = rpc.decode(body, rpc.WriteReply)
        if not reply.ok:
            raise BadRequest(reply.message)
        return reply.txn if reply.txn is not None else reply.change

    async def client_read_barrier(self) -> None:
        """Make a following local read linearizable (§6.4): get a read index from the
        leader (ourselves, or over the raft port) and wait until we applied it."""
        request = rpc.ReadRequest()
        with self.calls:
            body = await self.call_leader(rpc.READ, rpc.encode(request), lambda: self._read_local(request))
        index = rpc.decode(body, rpc.ReadReply).index
        await self.wait_for(lambda: self.applied.index >= index, self.wait_s(), "catching up for a read")

    def client_addresses(self) -> list[str]:
        """The client API addresses the members publish (SPEC §5 `member_list`)."""
        members = self.applied_membership.node_ids
        return [
            r.grpc_api_advertise_address
            for i, r in self.sm.nodes()
            if i in members and r.grpc_api_advertise_address
        ]

    async def _change_membership(
        self, update: Callable[[set[int], set[int]], tuple[set[int], set[int]]]
    ) -> None:
        """On this leader, wait until no change is in flight, apply `update(voters,
        learners)` to the current membership, propose it, and wait until it is
        committed and applied here (C_new, not joint). Callers hold the membership
        lock, so the update always starts from the latest membership."""
        if not self._membership_lock.locked():
            raise RuntimeError("_change_membership needs the membership lock")
        while True:
            await self.wait_for(
                lambda: not self.core.is_leader or self.driver.change_possible(), self.wait_s(), "membership change"
            )
            if not self.core.is_leader:
                raise NotLeader("lost leadership", leader=self.core.leader)
            m = self.core.membership
            voters, learners = update(set(m.final_voters), set(m.learners))
            target = Membership.of(voters, learners)
            try:
                await self.request(
                    lambda req_id: ChangeMembership(req_id, frozenset(voters), frozenset(learners)),
                    what="membership change",
                )
                break
            except Unavailable:
                continue  # a change of the previous leader is still finishing
        def done_or_lost() -> bool:
            # Done when applied here; lost when we no longer lead and the log no longer
            # heads to the target (a removed leader steps down once C_new commits: it
            # then waits for its own apply).
            m = self.core.membership
            heading = m.final_voters == target.final_voters and m.learners == target.learners
            return self.applied_membership == target or (not self.core.is_leader and not heading)

        await self.wait_for(done_or_lost, self.wait_s(), "membership change")
        if self.applied_membership != target:
            raise NotLeader("lost leadership during the membership change", leader=self.core.leader)

    async def _join_local(self, req: rpc.JoinRequest) -> bytes:
        """The leader's side of a join (docs/operations/cluster.md, "Joining"): the
        driver decides (a wiped voter is refused); this waits for each step."""
        nid = req.node_id
        assert self.meta is not None
        if req.cluster_id is not None and req.cluster_id != self.meta.cluster_id:
            raise BadRequest(f"node {nid} belongs to cluster {req.cluster_id}, not {self.meta.cluster_id}")
        plan = self.driver.plan_join(
            nid, req.record, fresh=req.cluster_id is None, learner=req.learner, promote=req.promote
        )
        log.info("%d handles join of node %d at %s: %s", self.id, nid, req.record.endpoint, plan)
        if plan.set_record:
            await self._expect_applied(await self.propose(SetNode(nid, req.record)))
        async with self._membership_lock:  # one join or leave at a time
            if nid not in self.core.membership.node_ids:
                await self._change_membership(lambda v, learners: (v, learners | {nid}))
            if plan.promote and not self.core.membership.is_voter(nid):
                # Catch the learner up (log or snapshot) before it counts for a quorum.
                await self.wait_for(
                    lambda: not self.core.is_leader or self.driver.caught_up(nid),
                    self.wait_s(), f"catching up node {nid}",
                )
                await self._change_membership(lambda v, learners: (v | {nid}, learners - {nid}))
        members = tuple(
            rpc.NodeAddress(i, f"{r.endpoint.addr}:{r.endpoint.port}") for i, r in self.sm.nodes()
        )
        log.info("%d added node %d (membership %s)", self.id, nid, self.core.membership)
        return rpc.encode(rpc.JoinReply(self.meta.cluster_id, members, tuple(sorted(self.driver.member_ids()))))

    async def _expect_applied(self, result: Any) -> None:
        if isinstance(result, ApplyError):
            raise BadRequest(result.message)

    async def _leave_local(self, req: rpc.LeaveRequest) -> bytes:
        nid = req.node_id
        async with self._membership_lock:
            nothing = self.driver.plan_leave(nid)
            if nothing is not None:
                return rpc.encode(rpc.LeaveReply(False, nothing))
            log.info("%d handles leave of node %d", self.id, nid)
            # Removing the leader works too: the core keeps leading without counting
            # itself, and hands leadership to an up-to-date voter once C_new commits.
            await self._change_membership(lambda v, learners: (v - {nid}, learners - {nid}))
            if self.core.is_leader and self.sm.node(nid) is not None:
                try:
                    await self.propose(RemoveNode(nid), timeout=5)
                except ClientError as e:
                    log.warning("%d could not remove the record of node %d: %s", self.id, nid, e)
        return rpc.encode(rpc.LeaveReply(True, f"node {nid} removed; membership is now {self.applied_membership}"))

    # ------------------------------------------------------------------ join (joiner side)
    async def join(self) -> None:
        """Join the cluster (docs/operations/cluster.md, "Joining"): skip when the
        committed membership already has us; otherwise ask each `join` address in
        order, 3 tries each 1 s apart. A node with an empty data dir first joins as
        a learner: the reply brings the cluster id (the only way a node adopts one)
        and the members it may accept raft messages from; then it asks again to be
        promoted, which the leader answers once it caught up."""
        rc = self.config.raft_config
        if self.driver.is_member(self.core.committed_membership):
            log.info("%d is already a member: join skipped", self.id)
            return
        errors: list[str] = []
        for address in rc.join:
            for attempt in range(JOIN_TRIES):
                try:
                    if self.meta is None or not self.core.membership.node_ids:
                        # First as a learner: the cluster id and whom to accept from.
                        await self._join_call(address, promote=False)
                    if not rc.learner:
                        await self._join_call(address, promote=True)
                except (ClientError, TransportError, DecodeError) as e:
                    errors.append(f"{address} (try {attempt + 1}): {e}")
                    log.warning("%d join via %s failed: %s", self.id, address, e)
                    if isinstance(e, BadRequest):
                        raise JoinFailed(errors) from None  # refused: trying again changes nothing
                    await trio.sleep(JOIN_RETRY_S)
                    continue
                log.info("%d joined the cluster via %s", self.id, address)
                return
        raise JoinFailed(errors)

    async def _join_call(self, address: str, *, promote: bool) -> None:
        rc = self.config.raft_config
        cluster_id = self.meta.cluster_id if self.meta is not None else None
        payload = rpc.encode(rpc.JoinRequest(self.id, self.record, rc.learner, cluster_id, promote))
        reply = rpc.decode(
            await call(address, self.identity(), rpc.JOIN, payload, timeout=self.wait_s()), rpc.JoinReply
        )
        self._adopt_cluster_id(reply.cluster_id)
        for member in reply.members:
            self._learn_address(member.node_id, member.address)
        await self._inbox_send.send(Trust(frozenset(reply.member_ids)))

    async def publish_record(self) -> None:
        """(Re)publish this node's record when it is missing or stale (SPEC §3)."""
        while True:
            # Wait for a leader and for our state machine to have caught up with it.
            await self.wait_for(
                lambda: self.core.leader is not None and self.applied.index >= self.core.commit_index,
                math.inf,
                "leader",
            )
            if self.sm.node(self.id) == self.record or not self.driver.is_member(self.core.committed_membership):
                return
            request = rpc.WriteRequest(SetNode(self.id, self.record))
            try:
                reply = rpc.decode(
                    await self.call_leader(rpc.WRITE, rpc.encode(request), lambda: self._write_local(request)),
                    rpc.WriteReply,
                )
                if not reply.ok:
                    raise BadRequest(reply.message)
                log.info("%d published its record %s", self.id, self.record.endpoint)
                return
            except (ClientError, DecodeError) as e:
                log.warning("%d could not publish its record yet: %s", self.id, e)
                await trio.sleep(1)

    # ------------------------------------------------------------------ views (admin API)
    def config_json(self) -> dict:
        return self.config.redacted()

    def cluster_nodes(self) -> list[dict]:
        members = self.applied_membership.node_ids
        return [
            {
                "name": r.name,
                "endpoint": {"addr": r.endpoint.addr, "port": r.endpoint.port},
                "grpc_api_advertise_address": r.grpc_api_advertise_address,
            }
            for i, r in self.sm.nodes()
            if i in members
        ]

    def cluster_status(self) -> dict:
        return status.cluster_status(self)

    def _leader_json(self, leader: int | None) -> dict | None:
        if leader is None:
            return None
        rec = self.sm.node(leader)
        endpoint = {"addr": rec.endpoint.addr, "port": rec.endpoint.port} if rec else None
        return {"id": leader, "endpoint": endpoint}

    def metrics(self) -> dict[str, float]:
        st = self.core.status()
        return {
            "metanode_raft_term": st.term,
            "metanode_raft_is_leader": float(st.role is Role.LEADER),
            "metanode_raft_leader_id": float(st.leader or 0),
            "metanode_raft_last_log_index": st.last_log_id.index,
            "metanode_raft_commit_index": st.commit,
            "metanode_raft_applied_index": self.applied.index,
            "metanode_raft_voters": len(st.committed_membership.voter_ids),
            "metanode_sm_keys": len(self.sm),
            "metanode_sm_last_seq": self.sm.last_seq,
        }

    async def transfer_leader(self, to: int | None) -> dict:
        core = self.core
        if not core.is_leader:
            raise NotLeader(f"node {self.id} is not the leader", leader=core.leader)
        voters = sorted(core.membership.voter_ids)
        if to is None:
            candidates = [p for p in voters if p != self.id]
            if not candidates:
                raise BadRequest("no other voter to transfer leadership to")
            to = max(candidates, key=lambda p: core.progress[p].match if p in core.progress else 0)
        target = to
        await self.request(lambda req_id: TransferLeader(req_id, target), what="leadership transfer")
        return {"from": self.id, "to": target, "voter_ids": voters}


class JoinFailed(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("could not join the cluster: " + "; ".join(errors) if errors else "no join address")
        self.errors = errors


def _check_data_dir(config: Config, meta: NodeMeta | None) -> None:
    """SPEC §2: the stored id wins (a different config id is an error); an empty dir
    needs `single` or `join`; an initialized one needs neither."""
    rc = config.raft_config
    for key in ("raft_secret", "raft_tls_server_cert", "raft_tls_server_key"):
        if getattr(rc, key):
            raise ConfigError(f"raft_config.{key}: not supported by this version (peer authentication and TLS on the raft port are not built yet)")
    for key in ("grpc_tls_server_cert", "grpc_tls_server_key"):
        if getattr(config, key):
            raise ConfigError(f"{key}: not supported by this version (TLS on the client API is not built yet)")
    if config.grpc_api_max_message_size > MAX_CLIENT_MESSAGE:
        raise ConfigError(
            f"grpc_api_max_message_size: {config.grpc_api_max_message_size} is over {MAX_CLIENT_MESSAGE}:"
            " a write that large could not be replicated in one raft frame"
        )
    if meta is not None:
        if rc.id is not None and meta.node_id != rc.id:
            raise ConfigError(
                f"raft_config.id: {rc.id} differs from node id {meta.node_id} stored in {rc.raft_dir}"
            )
        if meta.cluster_name != rc.cluster_name:
            raise ConfigError(
                f"raft_config.cluster_name: {rc.cluster_name!r} differs from {meta.cluster_name!r}"
                f" stored in {rc.raft_dir}"
            )
    elif not rc.single and not rc.join:
        raise ConfigError(
            f"raft_config: {rc.raft_dir} holds no cluster yet: set single = true to start a new"
            " cluster or join = [...] to join one"
        )


@asynccontextmanager
async def open_node(config: Config, *, admin: bool = True, client_api: bool = True) -> AsyncIterator[Node]:
    """Open the data dir, start every task, bootstrap or join; yield the running node.

    Raises ConfigError for a bad data dir or a port in use, JoinFailed when joining
    fails. Leaving the block cancels everything and closes storage.
    """
    rc = config.raft_config
    storage = await trio.to_thread.run_sync(RaftStorage.open, rc.raft_dir)
    node: Node | None = None
    try:
        meta = storage.meta
        _check_data_dir(config, meta)
        if meta is not None and rc.id is None:
            config = attrs.evolve(config, raft_config=attrs.evolve(rc, id=meta.node_id))
        node = Node(config, storage, meta)
        fresh = meta is None
        if fresh and rc.single:
            node.bootstrap()
        node._start_core()
        drains: list[trio.Event] = []  # set by servers once they answered what was in flight
        async with single_errors(), trio.open_nursery() as nursery:
            node._nursery = nursery
            try:
                await nursery.start(
                    _serve_raft_port, node, rc.raft_listen_host, rc.raft_api_port
                )
                nursery.start_soon(node._run_raft_loop)
                nursery.start_soon(node._run_apply_loop)
                nursery.start_soon(node._run_ticker)
                nursery.start_soon(node._run_expiry)
                nursery.start_soon(node._run_ask_about_strangers)
                if admin:
                    from metanode.api.admin import serve_admin

                    try:
                        await nursery.start(
                            lambda task_status: serve_admin(
                                node, config.admin_api_address, token=config.admin_api_token,
                                shutdown=node.stopping, certfile=config.admin_tls_server_cert,
                                keyfile=config.admin_tls_server_key, task_status=task_status,
                            )
                        )
                    except OSError as e:
                        raise ConfigError(f"admin_api_address: cannot listen on {config.admin_api_address}: {e}") from None
                if client_api:
                    from metanode.api.client_api import serve_client_api

                    client_api_closed = trio.Event()
                    drains.append(client_api_closed)
                    try:
                        await nursery.start(
                            partial(
                                serve_client_api, node, config.grpc_api_address,
                                max_message_size=config.grpc_api_max_message_size, shutdown=node.stopping,
                                closed=client_api_closed, token=config.grpc_api_token,
                            )
                        )
                    except OSError as e:
                        raise ConfigError(f"grpc_api_address: cannot listen on {config.grpc_api_address}: {e}") from None
                # Replay the local log first: the committed membership decides whether
                # to join, and a node removed earlier must not join again (SPEC §3).
                await node.wait_for(
                    lambda: node.driver.replayed, node.wait_s(), "replaying the log"
                )
                if node.removed.is_set():
                    log.warning("%d was removed from the cluster earlier: not joining again", node.id)
                elif rc.join:
                    await node.join()
                nursery.start_soon(node.publish_record)
                yield node
            finally:
                # Graceful stop (SPEC §1): stop the admin server, let in-flight calls
                # answer for a bounded time, then cancel everything.
                node.stopping.set()
                with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_GRACE_S + 1):
                    await node.calls.wait_idle()
                    for drained in drains:
                        await drained.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if node is not None:
                await node.calls_to_leader.aclose()
            await trio.to_thread.run_sync(storage.close)


async def _serve_raft_port(node: Node, host: str, port: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await serve_raft(
            host, port,
            identity=node.identity,
            on_message=node.on_message,
            on_call=node.on_call,
            on_peer=node._on_peer_hello,
            leader_address=node.address_of,
            task_status=task_status,
        )
    except OSError as e:
        raise ConfigError(f"raft_config.raft_api_port: cannot listen on {host}:{port}: {e}") from None


__all__ = ["FatalError", "JoinFailed", "Node", "open_node"]
