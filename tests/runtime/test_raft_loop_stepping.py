"""A task with an event for an idle raft loop steps the raft core itself
(metanode/node/raft_loop.py, "Stepping in the caller"): in its own task, in order,
and a failure there still stops the node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from metanode.node.events import Propose
from metanode.sm import Upsert
from tests.net import until
from tests.runtime.test_node import Ports, node

pytestmark = pytest.mark.runtime
LIMIT = 20


def record_handlers(n: Any) -> list[tuple[str, Any]]:
    """(event type, the task that handled it), for every event the core is given."""
    seen: list[tuple[str, Any]] = []
    handle = n.driver.handle

    def recording(event: Any) -> None:
        seen.append((type(event).__name__, trio.lowlevel.current_task()))
        handle(event)

    n.driver.handle = recording
    return seen


async def test_a_write_to_an_idle_raft_loop_is_stepped_by_its_caller(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            seen = record_handlers(n)
            await until(lambda: n._can_step_here(), "an idle raft loop")
            seen.clear()
            await n.propose(Upsert("k", b"v"))
            me = trio.lowlevel.current_task()
            assert ("Propose", me) in seen
            assert n.sm.get("k") is not None and n.sm.get("k").data == b"v"


async def test_while_the_core_is_stepped_elsewhere_events_wait_their_turn(tmp_path: Path) -> None:
    """Held by someone else, the lock sends the next write through the raft loop,
    after the holder: nothing overtakes, nothing is lost."""
    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            seen = record_handlers(n)
            await until(lambda: n._can_step_here(), "an idle raft loop")
            n._core_lock.acquire_nowait()
            done = trio.Event()
            results: list[Any] = []

            async def write(i: int) -> None:
                results.append(await n.propose(Upsert(f"k{i}", b"v")))
                if len(results) == 3:
                    done.set()

            seen.clear()
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(write, i)
                await trio.sleep(0.2)
                assert not results and not [s for s in seen if s[0] == "Propose"]  # all wait for the lock
                n._core_lock.release()
                await done.wait()
            proposers = {task for kind, task in seen if kind == "Propose"}
            assert len(proposers) == 1 and "raft_loop" in next(iter(proposers)).name
            assert [n.sm.get(f"k{i}") is not None for i in range(3)] == [True] * 3


async def test_a_failure_stepping_in_the_caller_stops_the_node(tmp_path: Path) -> None:
    """The caller's task fails to step; the node stops at once with that error (the
    raft loop, woken for it, raises it), not at its next tick or never."""
    handled_by: list[Any] = []
    me = trio.lowlevel.current_task()
    with trio.fail_after(LIMIT):
        with pytest.raises(BaseException) as caught:
            async with node(tmp_path, Ports(), 1, "--single") as n:
                await until(lambda: n.core.is_leader, "leader")
                n.tick_s = 3600.0  # after the tick under way, no tick wakes the raft loop
                await trio.sleep(0.1)
                handle = n.driver.handle

                def failing(event: Any) -> None:
                    if isinstance(event, Propose):
                        handled_by.append(trio.lowlevel.current_task())
                        raise RuntimeError("boom in the core")
                    handle(event)

                n.driver.handle = failing
                await until(lambda: n._can_step_here(), "an idle raft loop")
                await n.propose(Upsert("k", b"v"), timeout=LIMIT)  # cancelled as the node stops
                pytest.fail("the node kept running")
        assert handled_by == [me]
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    assert any(isinstance(e, RuntimeError) and "boom in the core" in str(e) for e in errors), caught.value


async def test_a_caller_cancelled_while_its_step_waits_on_the_disk_still_finishes_it(tmp_path: Path) -> None:
    """The step is shielded at its awaits: a write whose caller is cancelled while its
    Ready's fsync runs in a thread is still persisted, applied and advanced (a Ready
    left half-done would break the core), and the node goes on serving."""
    import threading

    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            tick, n.tick_s = n.tick_s, 3600.0
            await trio.sleep(2 * tick)  # after the tick under way, no tick wakes the raft loop
            seen = record_handlers(n)
            await until(lambda: n._can_step_here(), "an idle raft loop")
            n._sync_s = 1.0  # a slow disk: the fsync goes to a thread
            in_sync, release = threading.Event(), threading.Event()
            persist = n._persist

            def slow_persist(ready: Any, sync: bool) -> None:
                if sync and ready.entries:
                    in_sync.set()
                    release.wait(LIMIT)
                persist(ready, sync)

            n._persist = slow_persist
            seen.clear()
            writer: list[Any] = []
            scope = trio.CancelScope()

            async def write() -> None:
                writer.append(trio.lowlevel.current_task())
                assert n._can_step_here()  # (nothing else wakes the raft loop now)
                with scope:
                    await n.propose(Upsert("k", b"v"), timeout=LIMIT)
                    pytest.fail("the cancelled write returned")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await trio.to_thread.run_sync(in_sync.wait, LIMIT)
                scope.cancel()
                try:
                    await trio.sleep(0.2)  # the cancelled caller is still inside its step
                    assert n._core_lock.locked() and not scope.cancelled_caught
                finally:
                    release.set()
            assert scope.cancelled_caught
            assert [task for kind, task in seen if kind == "Propose"] == writer  # stepped by the caller
            await until(lambda: n.sm.get("k") is not None, "the cancelled write to be applied")
            assert not n._core_lock.locked() and not n.core.has_ready()
            n._persist = persist
            n._sync_s = 0.0
            await n.propose(Upsert("k2", b"w"))
            assert n.sm.get("k2") is not None and n.sm.get("k").data == b"v"


async def test_no_step_in_the_caller_while_the_apply_loop_has_work(tmp_path: Path) -> None:
    """A shielded step must never wait on a full apply queue: while the apply loop
    is busy, events go to the raft loop (cancellable) instead."""
    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            seen = record_handlers(n)
            await until(lambda: n._can_step_here(), "an idle raft loop")
            n.apply_idle = False  # as when a batch is queued or a restore runs
            assert not n._can_step_here()
            seen.clear()
            await n.propose(Upsert("k", b"v"))
            assert [task.name for kind, task in seen if kind == "Propose"][0].endswith("_run_raft_loop")


async def test_a_leader_fsyncs_in_its_loop_only_once_its_appends_are_on_their_sockets(tmp_path: Path) -> None:
    """An AppendEntries left to a link's task (TLS, a busy link) could only be sent
    after an fsync in the loop: then the fsync goes to a thread."""
    from metanode.raft import Ready
    from metanode.raft.types import Entry, EntryKind

    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            ready = Ready(entries=(Entry(1, 99, EntryKind.NORMAL, b"x"),))
            n._sync_s = 0.0  # a fast disk
            assert n._sync_inline(ready, True) and not n._sync_inline(ready, False)
            n.snapshot_building = True  # while a snapshot is packed: in the loop anyway
            try:
                assert n._sync_inline(ready, False)
            finally:
                n.snapshot_building = False


async def test_peer_messages_are_stepped_by_their_connection_task(tmp_path: Path) -> None:
    """A follower steps an AppendEntries in the raft port connection's task, the
    leader the answer in its own: in both, the write applies once, everywhere."""
    ports = Ports()
    with trio.fail_after(LIMIT):
        async with node(tmp_path, ports, 1, "--single") as n1, node(tmp_path, ports, 2, "--join", ports.address(1)) as n2:
            await until(lambda: len(n2.cluster_nodes()) == 2, "2 members")
            await n1.propose(Upsert("warm", b"up"))
            on_leader, on_follower = record_handlers(n1), record_handlers(n2)
            await until(lambda: n1._can_step_here() and n2._can_step_here(), "idle raft loops")
            on_leader.clear()
            on_follower.clear()
            await n1.propose(Upsert("k", b"v"))
            await until(lambda: n2.sm.get("k") is not None, "the follower applied it")

            follower_steps = [task.name for k, task in on_follower if k == "Receive"]
            leader_steps = [task.name for k, task in on_leader if k == "Receive"]
            # A raft port connection's task (trio's serve_listeners runs each in `_run_handler`).
            assert any(name.endswith("._run_handler") for name in follower_steps), follower_steps
            assert any(name.endswith("._run_handler") for name in leader_steps), leader_steps
            assert n1.sm.get("k") == n2.sm.get("k")


def record_appends(n: Any) -> list[str]:
    """Each storage append, as "synced append" or "commit index" (sync=False)."""
    order: list[str] = []
    append = n.storage.append

    def recording(**kw: Any) -> None:
        order.append("synced append" if kw.get("sync", True) else "commit index")
        append(**kw)

    n.storage.append = recording
    return order


async def test_a_commit_index_alone_is_written_after_the_apply(tmp_path: Path) -> None:
    """A Ready whose hard state only moved the commit index writes it (no fsync) after
    applying what it commits: the write's reply need not wait for that syscall."""
    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            order = record_appends(n)
            apply = n.driver.apply

            def recording_apply(snapshot: Any, committed: Any, *rest: Any) -> None:
                order.extend("apply" for _ in committed)
                apply(snapshot, committed, *rest)

            n.driver.apply = recording_apply
            await n.propose(Upsert("k", b"v"))
            assert order == ["synced append", "apply", "commit index"], order
            assert n.storage.hard_state.commit == n.core.commit_index


async def test_with_the_apply_loop_busy_the_commit_index_is_written_before_handing_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a Ready's entries go to the apply loop (an await: a snapshot's save may
    take the store meanwhile), its commit index alone is written before that."""
    with trio.fail_after(LIMIT):
        async with node(tmp_path, Ports(), 1, "--single") as n:
            await until(lambda: n.core.is_leader, "leader")
            order = record_appends(n)
            send = n._apply_send.send

            async def recording_send(applied: Any) -> None:
                order.extend("to the apply loop" for _ in applied.committed)
                await send(applied)

            monkeypatch.setattr(n._apply_send, "send", recording_send)
            n.apply_idle = False  # as if the apply loop had work queued
            await n.propose(Upsert("k", b"v"))
            assert order == ["synced append", "commit index", "to the apply loop"], order
