"""Storage faults: catch-up by snapshot, crashes while a snapshot is built and while one
is installed, torn WAL tails, bit flips in WAL segments and snapshot files, a full disk."""

from __future__ import annotations

import random
import subprocess

import pytest
import trio

from metanode.client import MetaClient
from tests.robustness.cluster import Cluster
from tests.robustness.disk import (
    append_torn_record,
    dir_bytes,
    entry_records,
    flip_bit,
    log_messages,
    poll_for,
    prefill,
    record_offsets,
    segments,
    snapshot_files,
    truncate_to,
)
from tests.robustness.proxy import Rule
from tests.robustness.scenario import replace_member, restart, run, wait_listening
from tests.robustness.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.robustness]

FREQUENT_SNAPSHOTS = {"snapshot_logs_since_last": 200, "max_applied_log_to_keep": 20}
NO_AUTO_SNAPSHOTS = {"snapshot_logs_since_last": 1_000_000, "max_applied_log_to_keep": 20}


async def follower(c: Cluster) -> tuple[int, int]:
    leader = await c.wait_leader()
    return leader, max(i for i in c.ids() if i != leader)


async def wait_purged_past(c: Cluster, index: int, timeout: float = 30) -> None:
    async def purged() -> bool:
        leader = await c.leader()
        st = await c.status(leader) if leader is not None else None
        return bool(st and st["purged"] and st["purged"]["index"] > index)

    await c.wait_for(purged, timeout, f"the leader to purge its log past {index}", interval=0.1)


async def kill_behind(c: Cluster, wl: Workload, f: int) -> None:
    """SIGKILL follower `f`, then wait until the leader purged its log past `f`'s end:
    `f` can only catch up by a snapshot."""
    st = await c.status(f)
    assert st is not None
    wl.expected_exits.add(f)
    c.kill(f)
    await wait_purged_past(c, st["last_log_index"])


async def wait_logged(c: Cluster, node_id: int, word: str, more_than: int, timeout: float = 30) -> None:
    async def seen() -> bool:
        return len(log_messages(c.log_file(node_id), word)) > more_than

    await c.wait_for(seen, timeout, f"node {node_id} to log {word!r}", interval=0.1)


@pytest.mark.cluster_options(raft_extra=FREQUENT_SNAPSHOTS)
async def test_catch_up_by_snapshot(cluster: Cluster) -> None:
    """A follower down while the leader compacts its log past the follower's end comes
    back through a snapshot install."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        _leader, f = await follower(c)
        await kill_behind(c, wl, f)
        installs = len(log_messages(c.log_file(f), "installed snapshot"))
        await restart(c, wl, f)
        await wait_logged(c, f, "installed snapshot", installs)
        await wl.healed_now()

    await run(cluster, fault)


@pytest.mark.cluster_options(raft_extra=NO_AUTO_SNAPSHOTS)
async def test_crash_while_building_a_snapshot(cluster: Cluster) -> None:
    """SIGKILL a node (a follower, then the leader, then a follower) while the snapshot
    it was asked for is being written (its temporary file exists): it restarts, drops
    the leftover and serves."""
    await cluster.start_cluster(3)
    await prefill(cluster.client_addresses(), 1200, 2048)  # a 2.5 MB snapshot
    caught: list[bool] = []

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        for k in range(3):
            leader, f = await follower(c)
            victim = leader if k == 1 else f
            snapdir = c.specs[victim].raft_dir / "snapshot"
            c.nursery.start_soon(c.trigger_snapshot, victim)
            seen = await poll_for(lambda: any(p.name.endswith(".tmp") for p in snapdir.iterdir()), 5)
            caught.append(seen)
            wl.expected_exits.add(victim)
            c.kill(victim)
            c.note(f"killed {victim} {'while writing its snapshot file' if seen else '(no temporary file seen)'}")
            await restart(c, wl, victim)
            await c.wait_healthy(victim)
            left = [p.name for p in snapdir.iterdir() if p.name.endswith(".tmp")]
            assert not left, f"node {victim} kept temporary snapshot files after its restart: {left}"
            await wl.healed_now()

    await run(cluster, fault, started=True)
    assert any(caught), "no kill landed while a snapshot file was being written"


@pytest.mark.cluster_options(raft_extra={**FREQUENT_SNAPSHOTS, "snapshot_chunk_size": 65536})
async def test_crash_while_installing_a_snapshot(cluster: Cluster) -> None:
    """A follower behind the leader's purge point gets a 2.5 MB snapshot in 64 KiB
    chunks over a slow link; it is SIGKILLed in the middle of the transfer, then again
    while it writes the received snapshot; the third time it catches up."""
    await cluster.start_cluster(3)
    await prefill(cluster.client_addresses(), 1200, 2048)

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader, f = await follower(c)
        await kill_behind(c, wl, f)
        for src in c.ids():
            if src != f:
                c.net.set(src, f, Rule(delay=0.015))
        c.note(f"links to {f} delayed 15 ms per frame")
        installs = len(log_messages(c.log_file(f), "installed snapshot"))
        # 1. In the middle of the transfer.
        await restart(c, wl, f)
        await trio.sleep(0.6)
        c.kill(f)
        # 2. While the received snapshot is written.
        snapdir = c.specs[f].raft_dir / "snapshot"
        await restart(c, wl, f)
        seen = await poll_for(lambda: any(p.name.endswith(".tmp") for p in snapdir.iterdir()), 20)
        c.kill(f)
        c.note(f"killed {f} {'while writing the installed snapshot' if seen else '(no temporary file seen)'}")
        c.net.heal()
        # 3. Unhindered.
        await restart(c, wl, f)
        await wait_logged(c, f, "installed snapshot", installs)
        await wl.healed_now()

    await run(cluster, fault, started=True)


@pytest.mark.cluster_options(raft_extra=FREQUENT_SNAPSHOTS)
async def test_torn_wal_tails(cluster: Cluster) -> None:
    """1. Power loss of every node with a torn write at the end of each WAL's records
    (a record cut short, one failing its checksum, a partial header: never synced,
    nothing acknowledged in it; preallocated zeros may follow): each cuts it off and
    the cluster goes on.
    2. A follower whose WAL lost its last synced records (a disk that lied about a
    sync): it comes back shorter than it acknowledged and must catch up; the others
    hold everything."""
    rng = random.Random()

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        ids = c.ids()
        wl.expected_exits.update(ids)
        c.kill(*ids)
        kinds = {}
        cut_before = {i: len(log_messages(c.log_file(i), "cutting a torn record")) for i in ids}
        for i in ids:
            kinds[i] = append_torn_record(segments(c.specs[i].raft_dir)[-1], rng)
        c.note(f"torn tails appended: {kinds}")
        await restart(c, wl, *ids)
        await wl.healed_now()
        for i in ids:  # each saw its torn tail and cut it
            await wait_logged(c, i, "cutting a torn record", cut_before[i], timeout=10)
        await trio.sleep(1.0)
        _leader, f = await follower(c)
        wl.expected_exits.add(f)
        c.kill(f)
        seg = segments(c.specs[f].raft_dir)[-1]
        recs = entry_records(seg)
        if len(recs) >= 2:
            off = recs[-2][0]
            truncate_to(seg, off + rng.randint(1, recs[-2][1] - 1))  # into the one before last
            c.note(f"node {f}: {seg.name} cut inside its last-but-one entries record (entries up to"
                   f" {recs[-1][2]} were acknowledged)")
        await restart(c, wl, f)
        await wl.healed_now()

    await run(cluster, fault)


@pytest.mark.cluster_options(raft_extra={"wal_segment_size": 65536, **FREQUENT_SNAPSHOTS})
async def test_a_bit_flip_in_a_wal_segment(cluster: Cluster) -> None:
    """A bit flipped inside a record that intact records follow is corruption, not a
    torn write: the node refuses to start, naming the file; it is repaired as the docs
    say (leave, wipe, join). A bit flipped in the last record of the log looks torn:
    the node cuts it off, starts shorter than it acknowledged and catches up."""
    rng = random.Random()

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        # The last record: cut off as torn.
        _leader, f = await follower(c)
        wl.expected_exits.add(f)
        c.kill(f)
        seg = segments(c.specs[f].raft_dir)[-1]
        off, length = record_offsets(seg)[-1]  # whatever its kind (entries, a hard state)
        flip_bit(seg, off + 8 + rng.randrange(length - 8), rng.randrange(8))
        cut = len(log_messages(c.log_file(f), "cutting a torn record"))
        await restart(c, wl, f)
        await wait_logged(c, f, "cutting a torn record", cut, timeout=20)
        await wl.healed_now()
        await trio.sleep(1.0)
        # A record in the middle: refused.
        _leader, f = await follower(c)
        wl.expected_exits.add(f)
        c.kill(f)
        segs = segments(c.specs[f].raft_dir)
        seg = segs[0] if len(segs) > 1 else segs[-1]
        recs = entry_records(seg)
        off, length, _ = recs[len(recs) // 2]
        flip_bit(seg, off + 8 + length // 2, rng.randrange(8))
        c.note(f"node {f}: bit flipped in {seg.name} at {off + 8 + length // 2} ({len(segs)} segments)")
        out_before = len(c.output(f))
        c.start(f)
        rc = await c.wait_exit(f, 40)
        out = c.output(f)[out_before:] + "\n".join(log_messages(c.log_file(f), seg.name)[-3:])
        assert rc not in (None, 0), f"node {f} started on a corrupt WAL (exit {rc}):\n{out[-2000:]}"
        assert seg.name in out, f"node {f} did not name the damaged file:\n{out[-2000:]}"
        await replace_member(c, wl, f)
        await wl.healed_now()

    await run(cluster, fault)


@pytest.mark.cluster_options(raft_extra=NO_AUTO_SNAPSHOTS)
async def test_a_bit_flip_in_a_snapshot_file(cluster: Cluster) -> None:
    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        _leader, f = await follower(c)
        assert await c.trigger_snapshot(f) == 200
        wl.expected_exits.add(f)
        c.kill(f)
        snaps = snapshot_files(c.specs[f].raft_dir)
        assert len(snaps) == 1, snaps
        size = snaps[0].stat().st_size
        flip_bit(snaps[0], size - 1 - random.randrange(min(size - 64, 4000)), random.randrange(8))
        c.note(f"node {f}: bit flipped in {snaps[0].name}")
        out_before = len(c.output(f))
        c.start(f)
        rc = await c.wait_exit(f, 40)
        out = c.output(f)[out_before:] + "\n".join(log_messages(c.log_file(f), snaps[0].name)[-3:])
        assert rc not in (None, 0), f"node {f} started on a corrupt snapshot (exit {rc}):\n{out[-2000:]}"
        assert snaps[0].name in out, f"node {f} did not name the damaged file:\n{out[-2000:]}"
        await replace_member(c, wl, f)
        await wl.healed_now()

    await run(cluster, fault)


@pytest.mark.cluster_options(raft_extra={"wal_segment_size": 128 * 1024, "snapshot_logs_since_last": 300,
                                         "max_applied_log_to_keep": 50})
async def test_a_full_disk(cluster: Cluster) -> None:
    """Node 3's raft_dir is a small tmpfs. With too little room for a snapshot but
    enough for the WAL, the snapshot fails and the node keeps serving; once room is
    made its snapshot succeeds and its old segments go. With no room for the WAL the
    node stops (a WAL write is never retried); given room, it restarts and catches up."""
    c = cluster
    for i in (1, 2):
        await c.add_node(i)
    mnt = c.mount_tmpfs(c.root / "tmpfs3", "16m")
    await c.add_node(3, raft_dir=mnt / "data3")
    await c.start_cluster(3)
    await prefill(c.client_addresses(), 600, 2048)  # a snapshot of 1.3 MB
    ballast = mnt / "ballast"

    def fill(leave: int) -> None:
        ballast.unlink(missing_ok=True)
        st = __import__("os").statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        subprocess.run(["fallocate", "-l", str(max(0, free - leave)), str(ballast)], check=True)
        c.note(f"tmpfs: {leave} bytes left free")

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        logf = c.log_file(3)
        failed = len(log_messages(logf, "not saved"))
        built = len(log_messages(logf, "built snapshot"))
        fill(600 * 1024)  # the WAL fits, the snapshot does not
        await wait_logged(c, 3, "not saved", failed, timeout=30)
        assert c.running(3), f"node 3 died of a failed snapshot:\n{c.output(3)[-2000:]}"
        st = await c.status(3)
        assert st is not None
        await trio.sleep(1.0)
        st2 = await c.status(3)
        assert st2 is not None and st2["last_applied"]["index"] > st["last_applied"]["index"], "node 3 stopped applying"
        wal_full = dir_bytes(mnt / "data3" / "wal")
        ballast.unlink()
        c.note("ballast removed")
        await wait_logged(c, 3, "built snapshot", built, timeout=30)
        await c.wait_for(lambda: _smaller(mnt / "data3" / "wal", wal_full), 20, "node 3 to delete old segments")
        await wl.healed_now()
        # No room for the WAL: the node stops.
        wl.expected_exits.add(3)
        fill(0)
        rc = await c.wait_exit(3, 60)
        c.note(f"node 3 exited {rc} on a full disk")
        assert rc not in (None, 0), f"node 3 did not stop on a full disk (exit {rc})"
        assert "No space left" in c.output(3) + "\n".join(log_messages(logf, "No space left")), c.output(3)[-2000:]
        ballast.unlink()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        await restart(c, wl, 3)
        await wait_listening(c, 3)
        await wl.healed_now()
        await c.wait_healthy(3)  # caught up before the next round fills the disk again

    await run(cluster, fault, started=True)


async def _smaller(path: object, than: int) -> bool:
    return dir_bytes(path) < than  # type: ignore[arg-type]



@pytest.mark.cluster_options(raft_extra={"wal_segment_size": 128 * 1024, "snapshot_logs_since_last": 200,
                                         "max_applied_log_to_keep": 20})
async def test_a_snapshot_install_on_a_full_disk_keeps_the_node(cluster: Cluster) -> None:
    """Node 3 (raft_dir on a tmpfs) is stopped while the leader compacts past its log;
    with room for its WAL but not for the 1.3 MB snapshot, it restarts and the leader
    sends the snapshot. Its write used to fail with ENOSPC inside the Ready's persist,
    which stops the node although nothing but that file failed (found by
    test_a_full_disk with ROBUSTNESS_ROUNDS=3). Now the node refuses the install while
    the file would not fit (the last chunk is dropped, and said so), keeps running, and
    installs it once there is room."""
    import os

    c = cluster
    for i in (1, 2):
        await c.add_node(i)
    mnt = c.mount_tmpfs(c.root / "tmpfs3", "16m")
    await c.add_node(3, raft_dir=mnt / "data3")
    await c.start_cluster(3)
    await prefill(c.client_addresses(), 600, 2048)
    st = await c.status(3)
    assert st is not None
    c.kill(3)
    async with MetaClient.connect(c.client_addresses([1, 2]), timeout=10) as cl:
        for i in range(400):
            await cl.upsert(f"w{i}", b"x")
    await wait_purged_past(c, st["last_log_index"])
    vfs = os.statvfs(mnt)
    free = vfs.f_bavail * vfs.f_frsize
    subprocess.run(["fallocate", "-l", str(max(0, free - 600 * 1024)), str(mnt / "ballast")], check=True)
    refused = len(log_messages(c.log_file(3), "has no room for snapshot"))
    lead = await c.status(await c.wait_leader([1, 2]))
    assert lead is not None
    c.start(3)
    await wait_logged(c, 3, "has no room for snapshot", refused, timeout=30)
    rc = await c.wait_exit(3, 3)
    assert rc is None, f"node 3 stopped (exit {rc}) on an install it could not write:\n{c.output(3)[-600:]}"
    (mnt / "ballast").unlink()
    await c.wait_healthy(3)
    st = await c.status(3)
    assert st is not None and st["last_log_index"] >= lead["last_log_index"], (st, lead)
