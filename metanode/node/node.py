"""One metanode node: the Trio runtime around the pure raft core (design §4).

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

Reference: the Raft thesis (Ongaro 2014) for the core's rules; contract §3 for join/leave.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from metanode.config import Config
from metanode.errors import (
    ConfigError,
    FatalError,
)
from metanode.trio_util import InFlight, single_errors, waiting_receivers
from metanode.node import heap
from metanode.node.driver import NodeDriver
from metanode.node.events import (
    Event,
    PeerConnected,
)
from metanode.node.apply_loop import ApplyLoop
from metanode.node.forward import Forwarding
from metanode.node.membership import JoinFailed, MembershipOps
from metanode.node.raft_loop import RaftLoop, _Applied, _Batch
from metanode.node.views import Views
from metanode.node.watch import WatchHub
from metanode.raft import (
    LogId,
    Membership,
    RaftConfig,
    RaftCore,
    bootstrap_state,
)
from metanode.sm import Endpoint, KVStateMachine, NodeRecord
from metanode.storage import NodeMeta, RaftStorage
from metanode.transport import CallPool, Identity, PeerLink, RaftPortStats, serve_raft

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


class Node(RaftLoop, ApplyLoop, Forwarding, MembershipOps, Views):
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
            election_ticks=2 * HEARTBEAT_TICKS,  # contract §2: random in [2x, 3x) heartbeats
            election_ticks_max=3 * HEARTBEAT_TICKS,
            snapshot_chunk_size=rc.snapshot_chunk_size,
            snapshot_timeout_ticks=max(1, math.ceil(rc.install_snapshot_timeout / 1000 / self.tick_s)),
        )
        self.driver: NodeDriver  # set in _start_core
        self.watch_hub = WatchHub(0)
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Event](INBOX_SIZE)
        self._inbox_waiting = waiting_receivers(self._inbox_recv)  # the raft loop, when idle
        # Held by whoever steps the core: the raft loop, or a task stepping it itself
        # while the raft loop is idle (raft_loop.py).
        self._core_lock = trio.Lock()
        self._apply_send, self._apply_recv = trio.open_memory_channel[_Applied](APPLY_QUEUE)
        self._links: dict[int, PeerLink] = {}
        self.raft_port_stats = RaftPortStats()  # bytes received on the raft port (metrics)
        self._addresses: dict[int, str] = {}  # raft addresses of peers we learned of
        self._nursery: trio.Nursery | None = None
        self._req_ids = itertools.count(1)
        self._pending: dict[int, tuple[_Batch, int]] = {}  # req_id -> who waits for its Reply
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
        # The leader's clock stamps every entry (contract §5: TTL by log time); a test
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

    def _adopt_cluster_id(self, cluster_id: str, joined_at: int | None) -> None:
        """A join reply: the cluster id (the only way a node adopts one) and the index of
        a membership holding this node. A later one wins: a removal before it (say, the
        node was removed while down between its two join steps) is not its own."""
        if self.meta is None:
            self.meta = NodeMeta(self.id, cluster_id, self.config.raft_config.cluster_name, joined_at)
            log.info("%d joined cluster %s", self.id, cluster_id)
        elif joined_at is not None and (self.meta.joined_at is None or joined_at > self.meta.joined_at):
            self.meta = attrs.evolve(self.meta, joined_at=joined_at)
        else:
            return
        self.storage.save_meta(self.meta)
        self.driver.joined_at = self.meta.joined_at

    def _on_peer_stream(self, node_id: int) -> None:
        """A peer's raft stream to us started again: it may have restarted."""
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
            joined_at=self.meta.joined_at if self.meta is not None else None,
        )
        if self.driver.core.log_reset_to_snapshot:
            # The log does not reach the snapshot (a lost WAL tail, a crash during an
            # install): the snapshot wins, and the stored entries go too.
            assert state.snapshot is not None
            log.warning("%d: the log does not reach snapshot %s: reset the log to it",
                        self.id, state.snapshot.meta.last_log_id)
            self.storage.append(snapshot=state.snapshot)
        if state.snapshot is not None:
            # The core keeps the snapshot for followers: from the file, not the heap.
            self.driver.keep_snapshot_data(self.storage.mapped_snapshot(state.snapshot))
        self.watch_hub = WatchHub(self.sm.rev)
        self.driver.on_changes = self.watch_hub.on_changes
        self.driver.on_restore = self.watch_hub.reset
        heap.settle(len(self.sm))  # the state machine as loaded: out of full collections

    def bootstrap(self) -> None:
        """`single = true` on an empty dir: a one-voter cluster with a new cluster id."""
        state = bootstrap_state([self.id])
        # The log first, the meta last: a crash in between leaves an empty-looking dir
        # that bootstraps again, never a dir with a meta and no log.
        self.storage.append(entries=state.entries, hard_state=state.hard_state)
        self.meta = NodeMeta(self.id, uuid.uuid4().hex, self.config.raft_config.cluster_name, joined_at=0)
        self.storage.save_meta(self.meta)
        log.info("%d initialized a new cluster %s", self.id, self.meta.cluster_id)

    def wait_s(self) -> float:
        """`wait_leader_timeout` in seconds: how long requests wait for the cluster."""
        return self.config.raft_config.wait_leader_timeout / 1000


def _check_data_dir(config: Config, meta: NodeMeta | None) -> None:
    """contract §2: the stored id wins (a different config id is an error); an empty dir
    needs `single` or `join`; an initialized one needs neither."""
    rc = config.raft_config
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


Service = Callable[["Node", trio.Nursery], Awaitable["trio.Event | None"]]


@asynccontextmanager
async def open_node(config: Config, *, services: Sequence[Service] = ()) -> AsyncIterator[Node]:
    """Open the data dir, start every task, bootstrap or join; yield the running node.

    `services` start in the node's nursery once the raft port is bound and before the
    replay and join (the admin and client APIs: `metanode/server.py`); each may return
    an event it sets once it answered what was in flight at shutdown.

    Raises ConfigError for a bad data dir or a port in use, JoinFailed when joining
    fails. Leaving the block cancels everything and closes storage.
    """
    rc = config.raft_config
    storage = await trio.to_thread.run_sync(
        lambda: RaftStorage.open(rc.raft_dir, segment_bytes=rc.wal_segment_size)
    )
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
        if meta is not None and not node.core.membership.node_ids and not rc.join:
            raise ConfigError(
                f"raft_config.join: {rc.raft_dir} joined cluster {meta.cluster_id} but holds no log yet"
                " (its join did not finish): set join = [...] to finish it"
            )
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
                for service in services:
                    drained = await service(node, nursery)
                    if drained is not None:
                        drains.append(drained)
                # Replay the local log first: the committed membership decides whether
                # to join, and a node removed earlier must not join again (contract §3).
                await node.wait_for(
                    lambda: node.driver.replayed, node.wait_s(), "replaying the log"
                )
                if node.driver.removed:
                    node.removed.set()
                    log.warning("%d was removed from the cluster earlier: not joining again", node.id)
                elif rc.join:
                    await node.join()
                nursery.start_soon(node.publish_record)
                yield node
            finally:
                # Graceful stop (contract §1): stop the admin server, let in-flight calls
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
            on_peer=node._learn_address,
            on_stream=node._on_peer_stream,
            leader_address=node.address_of,
            stats=node.raft_port_stats,
            task_status=task_status,
        )
    except OSError as e:
        raise ConfigError(f"raft_config.raft_api_port: cannot listen on {host}:{port}: {e}") from None


__all__ = ["FatalError", "JoinFailed", "Node", "Service", "open_node"]
