"""The raft loop of a node (docs/architecture/node.md): the task that steps the
`RaftCore` (through the `NodeDriver`; see "Stepping in the caller"). It waits for one
event, drains the rest of its inbox without waiting, then for each `Ready`: persist
(one WAL append, one fsync), send, hand committed entries to the apply loop, advance
(a hard state that only moved the commit index is written after the apply).
When the apply loop has nothing queued and a Ready committed few entries (no
snapshot), the raft loop applies them itself: the same order, one task switch less per
write. Requests from other tasks are
typed events answered by `Reply`s with their `req_id`.

Stepping in the caller. While the raft loop waits on an empty inbox (and the apply
loop on its own), a task with an event for it (a raft port connection with a peer's
message; any `request`: a client session's writes or read barrier, the snapshot task's
compaction, a join or a transfer) does that step itself: the event, then the Readys,
exactly as the raft loop would, under `_core_lock` (which the raft loop takes for each
of its own steps) and shielded from cancellation (a Ready is always finished: each
await of `_process_ready` is shielded then, as a checkpoint is the only place a
cancellation lands; a scope around the whole step cost ~8 µs per step, three steps per
c1 write on the leader, while most steps never await). Nothing
is queued before it, so the order is the same; it saves one task switch per hop (a c1
write crosses three). A failure there is logged, and raised by the raft loop, woken
for it at once.

Where the fsync runs. In the event loop while the disk is fast (the recent fsyncs
took under INLINE_SYNC_MAX_S), in a thread otherwise, so a disk that turns slow holds
the node's other work (client reads, status, heartbeats' answers) for the one fsync
that shows it, not longer. The thread hop (a wake-up, a GIL hand-over and a wake-up
back) cost about as much as the fsync itself at one write in flight. A leader's
AppendEntries go out before its fsync (§10.2.1); when each was written straight to its
socket, the leader fsyncs in the loop too (its followers work meanwhile; in a thread,
the hop back came after their answers, which waited for it: the core is stepped by
one task at a time). When one waits for its link's task (TLS, a busy link), the
leader fsyncs in a thread, so that the task sends it meanwhile.
While a snapshot is packed in the event loop, every node fsyncs in the loop unless its
fsyncs take over BUILD_INLINE_SYNC_MAX_S: a thread back from its syscall waits for the
GIL behind the packing (writes waited tens of ms at 1M keys, up to the whole build).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from metanode.errors import Timeout
from metanode.node.events import (
    Event,
    Receive,
    Reply,
    Tick,
)
from metanode.raft import Message, Ready, Snapshot
from metanode.raft.messages import SnapshotRequest
from metanode.transport import PeerLink

log = logging.getLogger("metanode.node")

if TYPE_CHECKING:
    from metanode.node.node import Node  # noqa: F401


_MISSING = object()

INSTALL_HEADROOM = 1 << 20  # free bytes left after a snapshot from the leader is written
INSTALL_WARN_S = 10.0

#: A node fsyncs in its event loop while its recent fsyncs took less than this.
INLINE_SYNC_MAX_S = 0.002
#: While a snapshot is packed, any node does, unless its disk is this slow.
BUILD_INLINE_SYNC_MAX_S = 0.02
_SYNC_EWMA = 0.2  # weight of the newest fsync in the running estimate
#: The raft loop applies a Ready's committed entries itself, while the apply loop has
#: nothing queued, up to this many; more go to the apply loop, after the next sends.
INLINE_APPLY_MAX = 256


class _Batch:
    """The requests of one event, waited for together (one trio.Event for them all);
    `on_done(outcomes)`, if given, is called once the last outcome came, in the task
    that dispatched it, before the waiter wakes."""

    __slots__ = ("event", "outcomes", "left", "on_done", "ids")

    def __init__(self, ids: list[int], on_done: Callable[[list[Any]], None] | None = None) -> None:
        self.event = trio.Event()
        self.outcomes: list[Any] = [_MISSING] * len(ids)
        self.left = len(ids)
        self.on_done = on_done
        self.ids = ids


@attrs.frozen
class _Applied:
    """What the raft loop hands to the apply loop for one Ready."""

    snapshot: Snapshot | None
    committed: tuple[Any, ...]
    read_states: tuple[Any, ...]
    dropped_reads: tuple[Any, ...]



class RaftLoop:
    """A part of `Node` (metanode/node/node.py), by concern."""

    _install_warned_at: float = float("-inf")
    _sync_s: float = 0.0  # running estimate of one synced append's duration
    _core_failure: BaseException | None = None  # raised by the raft loop

    # ------------------------------------------------------------------ raft loop
    async def _run_ticker(self) -> None:
        tick = Tick()
        while True:
            await trio.sleep(self.tick_s)
            await self._inbox_send.send(tick)

    def on_message(self, msg: Message) -> Awaitable[None] | None:
        """A peer's message, from its connection's task: queued for the raft loop, or,
        when the raft loop is idle, an awaitable that steps it here (the module doc)."""
        if isinstance(msg, SnapshotRequest) and not self._room_for_install(msg):
            return None  # the leader sends it again (§5.1): nothing changed here
        if self._can_step_here():
            return self._step_here(Receive(msg))
        self._event_nowait(Receive(msg))
        return None

    def _can_step_here(self) -> bool:
        """The raft loop waits on its inbox (it is the only task that receives from
        it, and a send to a waiting receiver hands the event over: the inbox is
        empty), nobody steps the core, and the apply loop has nothing queued: a
        shielded step here then never waits on a full apply queue (a dying apply loop
        would leave it waiting forever)."""
        if not self.apply_idle or self._core_lock.locked():
            return False
        return bool(self._inbox_waiting)

    async def _deliver(self, event: Event) -> None:
        """Give `event` to the raft core: stepped here if the raft loop is idle, else
        queued (waiting for room)."""
        if self._can_step_here():
            await self._step_here(event)
        else:
            await self._inbox_send.send(event)

    async def _step_here(self, event: Event) -> None:
        """Step `event` in this task; only right after `_can_step_here()` held, with
        no checkpoint between (the lock is then free: taken at once)."""
        self._core_lock.acquire_nowait()
        try:
            self._handle(event)
            await self._process_ready(shield=True)
        except BaseException as exc:  # noqa: BLE001 - the raft loop raises it
            # Said here too: a stop under way may cancel the raft loop before it does.
            log.error("%d stepping %s outside the raft loop failed: %r", self.id, event, exc)
            self._core_failure = exc
            with contextlib.suppress(trio.WouldBlock):  # (full: the raft loop is awake)
                self._inbox_send.send_nowait(Tick())  # wake it: it raises `exc` at once
        finally:
            self._core_lock.release()

    def _room_for_install(self, msg: SnapshotRequest) -> bool:
        """A snapshot from the leader is installed with the Ready that steps its last
        chunk, and a write that fails there stops the node. So that a disk too full
        for it (but not for the WAL) refuses the install instead, the file must fit
        with INSTALL_HEADROOM to spare; else the chunk is dropped and the node keeps
        following. Said at most every INSTALL_WARN_S."""
        need = self.driver.install_bytes(msg)
        if not need:
            return True
        try:
            free = self.storage.free_bytes()
        except OSError as e:
            log.warning("%d cannot tell the free space of %s: %s", self.id, self.storage.root, e)
            return True  # the write itself will tell
        if free >= need + INSTALL_HEADROOM:
            return True
        now = trio.current_time()
        if now >= self._install_warned_at + INSTALL_WARN_S:
            self._install_warned_at = now
            log.warning(
                "%d has no room for snapshot %s from %d (%d bytes, %d free on %s): not installed;"
                " the leader sends it again", self.id, msg.meta.last_log_id, msg.src, need, free, self.storage.root,
            )
        return False

    def _event_nowait(self, event: Event) -> None:
        try:
            self._inbox_send.send_nowait(event)
        except trio.WouldBlock:
            log.warning("%d inbox full: dropped %s", self.id, event)

    async def request(self, make: Callable[[int], Event], timeout: float | None = None, what: str = "request") -> Any:
        """Send the event `make(req_id)` to the raft loop and wait for its Reply."""
        [outcome] = await self.request_many(1, lambda ids: make(ids[0]), timeout, what)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def request_many(
        self, n: int, make: Callable[[list[int]], Event], timeout: float | None = None, what: str = "request",
        on_done: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        """Send one event carrying `n` requests (`make(req_ids)`) and wait for their
        Replies: each outcome is a value or the error (a Timeout when none came).
        `on_done(outcomes)` is called with the outcomes this returns as soon as the
        last one is dispatched (in that task: not after a timeout or a cancel), for a
        reply that need not wait for this task to wake; it must not raise."""
        return await self.wait_many(await self.submit_many(n, make, on_done), timeout, what)

    async def submit_many(
        self, n: int, make: Callable[[list[int]], Event], on_done: Callable[[list[Any]], None] | None = None
    ) -> _Batch:
        """`request_many` up to its wait: the event is delivered (stepped here when the
        raft loop is idle) when this returns. `wait_many(batch)` must follow, in this
        task or one started at once (its end forgets the requests)."""
        batch = _Batch(list(itertools.islice(self._req_ids, n)), on_done)
        for pos, req_id in enumerate(batch.ids):
            self._pending[req_id] = (batch, pos)
        try:
            await self._deliver(make(batch.ids))
        except BaseException:
            self._forget(batch)
            raise
        return batch

    async def wait_many(self, batch: _Batch, timeout: float | None = None, what: str = "request") -> list[Any]:
        """The outcomes of a `submit_many` batch (a Timeout for each that none came
        for within `timeout`, by default `wait_s()`)."""
        try:
            with trio.move_on_after(timeout if timeout is not None else self.wait_s()):
                await batch.event.wait()
            if batch.left:
                late = Timeout(f"{what}: no answer within {timeout if timeout is not None else self.wait_s():.1f} s")
                batch.outcomes = [late if o is _MISSING else o for o in batch.outcomes]
            return batch.outcomes
        finally:
            self._forget(batch)

    def _forget(self, batch: _Batch) -> None:
        for req_id in batch.ids:
            self._pending.pop(req_id, None)

    def _dispatch(self, replies: list[Reply]) -> None:
        for reply in replies:
            waiting = self._pending.pop(reply.req_id, None)
            if waiting is None:
                continue  # its caller gave up (timeout, cancel)
            batch, pos = waiting
            batch.outcomes[pos] = reply.error if reply.error is not None else reply.value
            batch.left -= 1
            if not batch.left:
                batch.event.set()
                if batch.on_done is not None:
                    try:
                        batch.on_done(batch.outcomes)
                    except Exception:  # its waiter still answers, from the outcomes
                        log.exception("%d an early answer failed", self.id)

    async def _run_raft_loop(self) -> None:
        recv = self._inbox_recv
        lock = self._core_lock
        while True:
            try:
                event = recv.receive_nowait()
            except trio.WouldBlock:
                event = await recv.receive()  # meanwhile callers may step the core themselves
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:  # a caller is stepping the core: after it
                await lock.acquire()
            try:
                if self._core_failure is not None:
                    raise self._core_failure
                self._handle(event)
                while True:
                    try:
                        event = recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._handle(event)
                await self._process_ready()
            finally:
                lock.release()

    def _handle(self, event: Event) -> None:
        self.driver.handle(event)

    async def _process_ready(self, shield: bool = False) -> None:
        """Persist, send, apply and advance every Ready of the core. `shield`: no
        cancellation interrupts it (stepping in the caller: its every await is in a
        shielded scope)."""
        core = self.core
        while core.has_ready():
            ready = core.take_ready()
            commit_only = False
            early, late = self.driver.split_messages(ready)
            written = True  # every early message is on its socket already
            for msg in early:
                written = self._send(msg) and written
            if self.driver.must_sync(ready):
                if self._sync_inline(ready, written):
                    self._persist(ready, True)
                else:
                    with trio.CancelScope(shield=shield):
                        await trio.to_thread.run_sync(self._persist, ready, True)
            elif ready.hard_state is not None:
                if self._store_maybe_held():
                    # A snapshot's save or purge may hold the store in a thread: do not
                    # block the loop waiting for it.
                    with trio.CancelScope(shield=shield):
                        await trio.to_thread.run_sync(self._persist, ready, False)
                else:
                    # A commit index alone: a write, no fsync, no thread hop, after the
                    # apply (nothing waits for it: it is not fsynced, and what it
                    # commits is durable already), so the replies leave before it.
                    commit_only = True
            self.driver.persisted(ready)
            if ready.snapshot is not None:  # installed from the leader: keep it from the file
                self.driver.keep_snapshot_data(self.storage.mapped_snapshot(ready.snapshot))
            for msg in late:
                self._send(msg)
            if ready.snapshot is not None or ready.committed or ready.read_states or ready.dropped_reads:
                applied = _Applied(ready.snapshot, ready.committed, ready.read_states, ready.dropped_reads)
                if self.apply_idle and ready.snapshot is None and len(ready.committed) <= INLINE_APPLY_MAX:
                    self.apply_batch(applied)  # the apply loop has nothing before it: no task switch
                else:
                    if commit_only:  # before an await: a snapshot's save may hold the store after it
                        self._persist(ready, False)
                        commit_only = False
                    self.apply_idle = False
                    with trio.CancelScope(shield=shield):
                        await self._apply_send.send(applied)
            if commit_only:
                self._persist(ready, False)
            core.advance(ready)
        self._dispatch(self.driver.take_replies())
        self._check_watchers()

    def _sync_inline(self, ready: Ready, written: bool) -> bool:
        """Fsync this Ready in the event loop? (See the module doc.) Never for a
        snapshot install (a large file); while a snapshot is packed, yes, unless the
        disk is very slow (a thread would wait for the GIL behind the packing; an
        estimate taken in threads counts such waits, hence the higher bar); while one
        is saved or purged, never (the store may be held in a thread); else when the
        disk is fast and the messages sent before the fsync are `written` (on their
        sockets, not waiting for a link's task)."""
        if ready.snapshot is not None or self._store_maybe_held():
            return False
        if self.snapshot_building:
            return self._sync_s < BUILD_INLINE_SYNC_MAX_S
        return self._sync_s < INLINE_SYNC_MAX_S and written

    def _store_maybe_held(self) -> bool:
        """A snapshot is being saved or purged: a thread may hold the store's lock."""
        return self._snapshot_lock.locked() and not self.snapshot_building

    def _persist(self, ready: Ready, sync: bool) -> None:
        if not sync:
            self.storage.append(hard_state=ready.hard_state, sync=False)
            return
        start = time.perf_counter()
        self.storage.append(entries=ready.entries, hard_state=ready.hard_state, snapshot=ready.snapshot, sync=True)
        if ready.snapshot is None:  # an install writes a whole file: not the disk's fsync time
            self._sync_s += (time.perf_counter() - start - self._sync_s) * _SYNC_EWMA

    def _send(self, msg: Message) -> bool:
        """Send `msg`; True when its bytes are on the socket already (written by
        `send_nowait` itself), False when a link task will write it (or nobody)."""
        link = self._links.get(msg.dst)
        if link is None:
            if self._nursery is None:
                return False
            link = PeerLink(msg.dst, lambda peer=msg.dst: self.address_of(peer), self.identity)
            self._links[msg.dst] = link
            self._nursery.start_soon(link.run)
        return link.send_nowait(msg) and link.flushed

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
