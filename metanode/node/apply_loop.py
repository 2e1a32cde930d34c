"""The apply loop of a node (docs/architecture/node.md): applies what the raft loop
committed through the `NodeDriver`, answers waiting writes and reads, starts snapshots;
and the requests that end there: proposals, read barriers, TTL expiry ticks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from metanode.errors import ClientError, FatalError, SnapshotFailed, Unavailable
from metanode.node import heap
from metanode.node.driver import restore_snapshot
from metanode.node.events import (
    Compact,
    Propose,
    ReadIndex,
)
from metanode.sm import Command
from metanode.sm import Tick as ExpiryTick
from metanode.raft import Snapshot
from metanode.sm.codec import encode_known
from metanode.storage.snapshots import Parts

log = logging.getLogger("metanode.node")

# Keys are packed SNAPSHOT_STEP_KEYS at a time (one part of ~0.5 MB at 100-byte values,
# ~0.6 ms) until SNAPSHOT_SLICE_S passed, then the loop yields. A write crosses the
# event loop several times (client session, raft loop, fsync thread, apply, reply) and
# may wait behind one slice each time.
SNAPSHOT_STEP_KEYS = 4096
SNAPSHOT_SLICE_S = 0.002
SNAPSHOT_FREE_PARTS = 16  # parts freed between two yields once the snapshot is saved

SNAPSHOT_RETRY_S = 5.0  # after a snapshot whose file could not be written (ENOSPC)

if TYPE_CHECKING:
    from metanode.node.node import Node  # noqa: F401



class ApplyLoop:
    """A part of `Node` (metanode/node/node.py), by concern."""

    _snapshot_retry_at: float = 0.0  # after a snapshot that could not be written
    #: A snapshot is being packed (in slices, in the event loop): the store is not in use.
    snapshot_building: bool = False
    #: The apply loop waits with nothing queued (the raft loop clears it when it queues).
    apply_idle: bool = False

    # ------------------------------------------------------------------ apply loop
    async def _run_apply_loop(self) -> None:
        recv = self._apply_recv
        while True:
            try:
                batch = recv.receive_nowait()
            except trio.WouldBlock:
                self.apply_idle = True  # the raft loop may apply the next batch itself
                batch = await recv.receive()
            else:
                await trio.lowlevel.checkpoint()  # let others run between queued batches
            restored = None
            if batch.snapshot is not None:
                # In a thread (~1 s at 1M keys): the raft loop meanwhile answers the
                # leader, which is waiting to promote a joiner that caught up.
                restored = await trio.to_thread.run_sync(restore_snapshot, batch.snapshot)
            self.apply_batch(batch, restored)
            if restored is not None:
                heap.settle(len(restored))  # installed from the leader: long-lived

    def apply_batch(self, batch: Any, restored: Any = None) -> None:
        """Apply what one Ready committed, answer its writes and reads, start a
        snapshot when one is due: in the apply loop, or in the raft loop itself when
        the apply loop has nothing queued (raft_loop.py)."""
        driver = self.driver
        driver.apply(batch.snapshot, batch.committed, batch.read_states, batch.dropped_reads, restored)
        self._dispatch(driver.take_replies())
        if driver.removed and not self.removed.is_set():
            self.removed.set()
        self._check_watchers()
        if (driver.snapshot_due() and not self._snapshot_lock.locked()
                and trio.current_time() >= self._snapshot_retry_at):
            assert self._nursery is not None
            self._nursery.start_soon(self._build_snapshot)

    async def _build_snapshot(self, force: bool = False) -> None:
        """Snapshot the applied state, save it, then compact the core and purge the
        log behind it. Its own task: the apply loop never waits for the raft loop."""
        async with self._snapshot_lock:
            if not self.driver.snapshot_due(force):
                return
            build = self.driver.begin_snapshot()
            self.snapshot_building = True
            try:
                # A slice at a time, yielding between them: no request waits for the
                # whole state machine to be serialized.
                while not build.done:
                    until = time.perf_counter() + SNAPSHOT_SLICE_S
                    build.step(SNAPSHOT_STEP_KEYS)
                    while not build.done and time.perf_counter() < until:
                        build.step(SNAPSHOT_STEP_KEYS)
                    # Let go of the GIL too: a busy event loop never waits in epoll, and
                    # a thread (an fsync begun before the build) back from its syscall
                    # waited for the GIL for most of the build (writes stalled ~1 s at
                    # 1M keys). Writes during the build fsync in the loop (raft_loop.py).
                    time.sleep(0)
                    await trio.sleep(0)
                # Not joined: the pieces are written in turn (a join would hold the loop).
                packed = Parts(build.parts())
                snapshot, purge_to = Snapshot(build.meta, packed), build.purge_to  # type: ignore[arg-type]
            finally:
                self.snapshot_building = False
                build.close()
            try:
                await trio.to_thread.run_sync(self.storage.save_snapshot, snapshot)
            except SnapshotFailed as e:
                # Only the snapshot's file failed (a full disk): the WAL is fine, so keep
                # serving and try again later.
                self._snapshot_retry_at = trio.current_time() + SNAPSHOT_RETRY_S
                log.warning("%d snapshot %s not saved (next try in %g s): %s",
                            self.id, snapshot.meta.last_log_id, SNAPSHOT_RETRY_S, e)
                if force:
                    raise Unavailable(f"snapshot not saved: {e}") from None
                return
            self.driver.snapshot_saved(snapshot)
            # The core keeps it for followers memory-mapped from its file: the bytes
            # built here are dropped, a few parts at a time (each free is a munmap:
            # all at once held the loop ~10 ms at 1M keys).
            try:
                snapshot = self.storage.mapped_snapshot(snapshot)
            except FatalError as e:
                # A newer snapshot (installed from the leader while ours was built)
                # replaced ours, whose file is gone: nothing to compact to.
                log.info("%d snapshot %s superseded before it was kept: %s", self.id, snapshot.meta.last_log_id, e)
                return
            while packed.parts:
                del packed.parts[-SNAPSHOT_FREE_PARTS:]
                await trio.sleep(0)
            # The core drops its previous snapshot, whose file is gone: the last
            # reference to its mapping makes the kernel drop the file's cached pages,
            # in munmap (~20 ms for 100 MB), which runs without the GIL in a thread.
            dying: list[Any] = [self.core.log.snapshot]
            try:
                purged = await self.request(lambda req_id: Compact(req_id, snapshot, purge_to), what="compaction")
                await trio.to_thread.run_sync(dying.clear)
                await trio.to_thread.run_sync(self.storage.purge, purged)
            except (ClientError, ValueError) as e:
                # The snapshot is saved; the log is purged behind the next one.
                log.warning("%d snapshot %s saved, log not purged: %s", self.id, snapshot.meta.last_log_id, e)
                return
            log.info(
                "%d built snapshot %s (%d bytes), log purged to %d",
                self.id, snapshot.meta.last_log_id, len(snapshot.data), purged,
            )
            heap.settle(len(self.driver.sm))  # what the machine grew since: long-lived

    async def trigger_snapshot(self) -> None:
        await self._build_snapshot(force=True)

    # ------------------------------------------------------------------ requests
    async def propose(self, cmd: Command, timeout: float | None = None) -> Any:
        """Propose on this node (the leader); wait until applied; the apply result."""
        data, known = encode_known(cmd, self.clock_ms())
        return await self.request(lambda req_id: Propose(((req_id, data),), (known,)), timeout, "write")

    async def propose_many(
        self, cmds: list[Command], timeout: float | None = None,
        on_done: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        """Propose commands as one batch (one Ready: one WAL append and fsync, one
        AppendEntries per peer); each outcome is its apply result or its error.
        `on_done`: as for `request_many`."""
        return await self.wait_many(await self.submit_proposals(cmds, on_done), timeout, "write")

    async def submit_proposals(self, cmds: list[Command], on_done: Callable[[list[Any]], None] | None = None) -> Any:
        """`propose_many` up to its wait (`submit_many`): proposed when this returns."""
        now = self.clock_ms()
        datas, known = zip(*[encode_known(cmd, now) for cmd in cmds]) if cmds else ((), ())
        return await self.submit_many(len(cmds), lambda ids: Propose(tuple(zip(ids, datas)), known), on_done)

    async def read_barrier(self, timeout: float | None = None) -> int:
        """ReadIndex (§6.4) on this node (the leader): returns once it is safe to read."""
        return await self.request(lambda req_id: ReadIndex((req_id,)), timeout, "read")

    def _expiry_due(self) -> bool:
        due = self.sm.next_expiry_ms()
        return due is not None and due <= self.clock_ms()

    async def _expire_due(self) -> None:
        """On the leader: when keys are due by our clock, log a Tick so every replica
        expires them at the same log position (contract §5). One Tick at a time: readers
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

    async def _run_expiry(self) -> None:
        """Expire due keys even when nobody writes or reads: one check a heartbeat."""
        while True:
            await trio.sleep(self.config.raft_config.heartbeat_interval / 1000)
            if self.core.is_leader and self._expiry_due():
                try:
                    await self._expire_due()
                except ClientError as e:
                    log.debug("%d expiry tick not applied: %s", self.id, e)
