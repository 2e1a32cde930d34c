"""The raft loop of a node (docs/architecture/node.md): the only task that touches the
`RaftCore` (through the `NodeDriver`). It waits for one event, drains the rest of its
inbox without waiting, then for each `Ready`: persist (one WAL append, one fsync, in a
thread), send, hand committed entries to the apply loop, advance. Requests from other
tasks are typed events answered by `Reply`s with their `req_id`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from metanode.transport import PeerLink

log = logging.getLogger("metanode.node")

if TYPE_CHECKING:
    from metanode.node.node import Node  # noqa: F401


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



class RaftLoop:
    """A part of `Node` (metanode/node/node.py), by concern."""

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
