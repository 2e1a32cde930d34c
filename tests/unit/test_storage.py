"""Contract tests of the durable store (`metanode.storage`, contract §8, design §5).

Every test works on a real directory under `tmp_path` with real fsyncs. What is
checked is what a node relies on after a restart: what `append`, `save_snapshot`,
`purge` and `save_meta` made durable comes back from `load()` exactly; a torn write
at the end of the log is cut off; any other damage stops the node with a
`FatalError` naming the file and the byte offset; the dir is locked.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import attrs
import pytest

from metanode.errors import ConfigError, FatalError
from metanode.raft import RaftConfig, RaftCore
from metanode.raft.types import (
    ZERO_LOG_ID,
    Entry,
    EntryKind,
    HardState,
    LogId,
    Membership,
    PersistedState,
    Snapshot,
    SnapshotMeta,
    bootstrap_state,
)
from metanode.storage import NodeMeta, RaftStorage, records, wal

MEMBERS = Membership.of([1, 2, 3])


# ---------------------------------------------------------------- helpers


def ent(term: int, index: int, data: bytes | None = None) -> Entry:
    return Entry(term, index, EntryKind.NORMAL, data if data is not None else b"v%d" % index)


def ents(term: int, first: int, last: int, size: int | None = None) -> list[Entry]:
    return [
        ent(term, i, None if size is None else bytes([i % 251]) * size)
        for i in range(first, last + 1)
    ]


def snap(term: int, index: int, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(LogId(term, index), MEMBERS), data)


def reopen(path: Path, **kw: int) -> PersistedState:
    with RaftStorage.open(path, **kw) as store:
        return store.load()


def segments(path: Path) -> list[Path]:
    return sorted((path / "wal").glob("*.wal"))


def record_offsets(seg: Path) -> list[int]:
    found, damage, _end = wal.split_segment(seg.read_bytes())
    assert damage is None
    return [off for off, _ in found]


def records_end(seg: Path) -> int:
    """Where the records of a segment end (preallocated zeros may follow)."""
    found, damage, end = wal.split_segment(seg.read_bytes())
    assert damage is None
    return end


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    buf = bytearray(path.read_bytes())
    buf[offset] ^= 1 << bit
    path.write_bytes(bytes(buf))


def indexes(state: PersistedState) -> list[tuple[int, int]]:
    return [(e.term, e.index) for e in state.entries]


# ---------------------------------------------------------------- basics


def test_append_and_reload(tmp_path: Path) -> None:
    """Entries (all kinds, incl. a membership), the hard state and the purge point come
    back from a reopened dir exactly as written."""
    boot = bootstrap_state([1, 2, 3])
    with RaftStorage.open(tmp_path) as store:
        assert store.load() == PersistedState()
        store.append(entries=boot.entries, hard_state=boot.hard_state)
        more = [
            Entry(2, 2, EntryKind.NOOP),
            ent(2, 3, b""),
            Entry(2, 4, EntryKind.MEMBERSHIP, b"", Membership(((1, 2, 3), (2, 3, 4)), (5,))),
            ent(2, 5, bytes(range(256))),
        ]
        store.append(entries=more, hard_state=HardState(2, 1, 3))
        store.append(entries=[ent(2, 6)])
    state = reopen(tmp_path)
    assert state.hard_state == HardState(2, 1, 3)
    assert state.entries == (*boot.entries, *more, ent(2, 6))
    assert state.purged == ZERO_LOG_ID and state.snapshot is None


def test_conflicting_truncate(tmp_path: Path) -> None:
    """A batch starting at or below the last index replaces the stored suffix: append
    1..10 (term 1), then 6..8 of term 2: the log is 1..5 of term 1 and 6..8 of term 2."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 10))
        store.append(entries=ents(2, 6, 8))
        assert store.last_index == 8
    state = reopen(tmp_path)
    assert indexes(state) == [(1, i) for i in range(1, 6)] + [(2, i) for i in range(6, 9)]


def test_conflicting_truncate_across_segments(tmp_path: Path) -> None:
    """A truncate that reaches back into an older segment: replay applies the newer
    batch over entries of the sealed segment."""
    with RaftStorage.open(tmp_path, segment_bytes=150) as store:
        for i in range(1, 21):
            store.append(entries=[ent(1, i)])
        store.append(entries=ents(3, 4, 6))
    assert len(segments(tmp_path)) > 3
    state = reopen(tmp_path, segment_bytes=150)
    assert indexes(state) == [(1, 1), (1, 2), (1, 3), (3, 4), (3, 5), (3, 6)]


@pytest.mark.parametrize(
    "kind", ["entries", "hard_state_only", "snapshot_install", "local_snapshot_and_purge", "meta"]
)
def test_restart_after_every_kind_of_write(tmp_path: Path, kind: str) -> None:
    """Whatever the last write was, a restart finds it (and everything before it)."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 5), hard_state=HardState(1, 1, 3))
        if kind == "entries":
            store.append(entries=ents(1, 6, 7))
        elif kind == "hard_state_only":
            store.append(hard_state=HardState(4, None, 5))
        elif kind == "snapshot_install":
            leader = snap(2, 9, b"leader")
            store.append(snapshot=leader, entries=ents(2, 10, 11), hard_state=HardState(2, 2, 9))
        elif kind == "local_snapshot_and_purge":
            store.save_snapshot(snap(1, 4, b"local"))
            store.purge(3)
        elif kind == "meta":
            store.save_meta(NodeMeta(7, "cluster-uuid", "metanode"))
    with RaftStorage.open(tmp_path) as store:
        state = store.load()
        meta = store.meta
    expected_meta = NodeMeta(7, "cluster-uuid", "metanode") if kind == "meta" else None
    assert meta == expected_meta
    if kind == "entries":
        assert indexes(state) == [(1, i) for i in range(1, 8)]
    elif kind == "hard_state_only":
        assert state.hard_state == HardState(4, None, 5)
        assert indexes(state) == [(1, i) for i in range(1, 6)]
    elif kind == "snapshot_install":
        assert state.snapshot == snap(2, 9, b"leader")
        assert state.purged == LogId(2, 9)
        assert indexes(state) == [(2, 10), (2, 11)]
        assert state.hard_state == HardState(2, 2, 9)
    elif kind == "local_snapshot_and_purge":
        assert state.snapshot == snap(1, 4, b"local")
        assert state.purged == LogId(1, 3)
        assert indexes(state) == [(1, 4), (1, 5)]
    else:
        assert indexes(state) == [(1, i) for i in range(1, 6)]


def test_snapshot_install_discards_the_whole_log(tmp_path: Path) -> None:
    """§5.1 (Figure 5.3): a snapshot from the leader replaces the log, also entries
    after its last index; entries appended in the same call follow it."""
    with RaftStorage.open(tmp_path, segment_bytes=200) as store:
        for i in range(1, 31, 3):
            store.append(entries=ents(1, i, i + 2))
        store.append(snapshot=snap(2, 12, b"x" * 1000), entries=ents(2, 13, 14))
        assert (store.purged, store.last_index) == (LogId(2, 12), 14)
        assert store.snapshot_id == LogId(2, 12)
        store.append(entries=ents(2, 15, 15))
    state = reopen(tmp_path)
    assert state.purged == LogId(2, 12) and state.snapshot == snap(2, 12, b"x" * 1000)
    assert indexes(state) == [(2, 13), (2, 14), (2, 15)]
    assert [p.name for p in (tmp_path / "snapshot").iterdir()] == ["snap-2-12.bin"]


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("discard", ["truncate", "install"])
def test_segments_of_discarded_entries_are_purged(
    tmp_path: Path, discard: str, restart: bool
) -> None:
    """Entries discarded by a conflicting truncate or an install do not keep their
    segments alive: the next purge deletes every older segment (tracked while
    writing, and rebuilt by the replay after a restart)."""
    store = RaftStorage.open(tmp_path, segment_bytes=120)
    try:
        for i in range(1, 31, 3):
            store.append(entries=ents(1, i, i + 2))
        if discard == "truncate":
            store.append(entries=ents(2, 10, 12))  # discards 10..30
        else:
            store.append(snapshot=snap(2, 11), entries=ents(2, 12, 12))  # discards 1..30
        old = segments(tmp_path)[:-1]
        assert len(old) >= 3
        if restart:
            store.close()
            store = RaftStorage.open(tmp_path, segment_bytes=120)
        store.save_snapshot(snap(2, 12))
        store.purge(12)
        assert not set(old) & set(segments(tmp_path))
    finally:
        store.close()
    state = reopen(tmp_path)
    assert (state.purged, state.entries) == (LogId(2, 12), ())


def test_a_lost_snapshot_record_falls_back_to_the_newer_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that lost the WAL's tail, with the SNAPSHOT record of the newest file
    in it, after the older file was removed (robustness: a torn tail cut into synced
    records): the WAL names a file that is gone, and the newer one, complete, is used."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 8), hard_state=HardState(1, None, 8))
        store.save_snapshot(snap(1, 4, b"older"))
        [seg] = segments(tmp_path)
        before = seg.read_bytes()
        store.save_snapshot(snap(1, 6, b"newer"))  # removes snap-1-4.bin
    seg.write_bytes(before)  # the tail with the SNAPSHOT 1-6 record is lost
    assert sorted(p.name for p in (tmp_path / "snapshot").iterdir()) == ["snap-1-6.bin"]
    with caplog.at_level(logging.WARNING, "metanode.storage"):
        state = reopen(tmp_path)
    assert state.snapshot is not None and state.snapshot.meta.last_log_id == LogId(1, 6)
    assert bytes(state.snapshot.data) == b"newer" and indexes(state)[-1] == (1, 8)
    assert "lost the record of snapshot 1-6" in caplog.text
    seg.write_bytes(before)
    (tmp_path / "snapshot" / "snap-1-6.bin").unlink()  # and without a newer file: fatal
    with pytest.raises(FatalError, match="snapshot 1-4 is missing"):
        reopen(tmp_path)


def test_load_after_writes_reads_the_dir_again(tmp_path: Path) -> None:
    """load() is what is on disk, also after writes made through the same store."""
    with RaftStorage.open(tmp_path) as store:
        store.load()
        store.append(entries=ents(1, 1, 3), hard_state=HardState(1, None, 2))
        assert indexes(store.load()) == [(1, 1), (1, 2), (1, 3)]
        assert store.load().hard_state == HardState(1, None, 2)


def test_one_wal_fsync_per_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: one Ready = one append call = exactly one fdatasync of the WAL,
    whatever it holds, also when it starts a new segment."""
    calls: list[int] = []
    real = wal.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    with RaftStorage.open(tmp_path, segment_bytes=300) as store:
        monkeypatch.setattr(wal, "fdatasync", counting)
        for i in range(1, 30):
            before = store.stats
            calls.clear()
            store.append(entries=ents(1, i, i, size=20), hard_state=HardState(1, 1, i))
            assert len(calls) == 1
            assert store.stats.wal_fsyncs == before.wal_fsyncs + 1
        calls.clear()
        store.append(snapshot=snap(1, 40), entries=ents(1, 41, 45), hard_state=HardState(1, 1, 40))
        assert len(calls) == 1
        calls.clear()
        store.append()
        assert calls == []
        assert store.stats.segments > 3


def test_append_refuses_entries_that_do_not_fit(tmp_path: Path) -> None:
    """A gap after the last entry, non-contiguous entries, or entries at or before the
    purge point are the caller's bug: ValueError, and nothing is written."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 5))
        store.save_snapshot(snap(1, 3))
        store.purge(3)
        written = store.stats.wal_bytes_written
        with pytest.raises(ValueError, match="gap"):
            store.append(entries=ents(1, 7, 8))
        with pytest.raises(ValueError, match="contiguous"):
            store.append(entries=[ent(1, 6), ent(1, 8)])
        with pytest.raises(ValueError, match="purge point"):
            store.append(entries=ents(2, 3, 4))
        with pytest.raises(ValueError, match="snapshot"):
            store.purge(5)
        with pytest.raises(ValueError, match="last entry"):
            store.purge(9)
        assert store.stats.wal_bytes_written == written
    assert indexes(reopen(tmp_path)) == [(1, 4), (1, 5)]


# ---------------------------------------------------------------- segments and purge


def test_purge_deletes_whole_segments_only(tmp_path: Path) -> None:
    """Purging deletes the segment files whose entries are all purged, never a
    partial one nor the active one, and the log reloads from what is left."""
    with RaftStorage.open(tmp_path, segment_bytes=256) as store:
        for i in range(1, 61):
            store.append(entries=[ent(1, i)], hard_state=HardState(1, 1, i - 1))
        before = {p: p.read_bytes() for p in segments(tmp_path)}
        assert len(before) > 5
        store.save_snapshot(snap(1, 40))
        store.purge(35)
        after = segments(tmp_path)
        assert 0 < len(after) < len(before)
        # Sealed survivors are untouched (only the active segment grows).
        sealed = [p for p in after if p in before and p != after[-1]]
        assert sealed and all(p.read_bytes() == before[p] for p in sealed)
        # The deleted files are the oldest ones, and the segment holding entry 36
        # (named by the first index it was opened for) survived.
        deleted = set(before) - set(after)
        assert sorted(deleted) == sorted(before)[: len(deleted)]
        assert int(after[0].stem) <= 36
        assert store.stats.segments_deleted == len(deleted)
    state = reopen(tmp_path, segment_bytes=256)
    assert state.purged == LogId(1, 35)
    assert indexes(state) == [(1, i) for i in range(36, 61)]
    assert state.hard_state == HardState(1, 1, 59)
    assert state.snapshot == snap(1, 40)


def test_purge_then_more_writes_then_reload(tmp_path: Path) -> None:
    """Deleting old segments keeps the hard state they held: every new segment starts
    with a checkpoint of it."""
    with RaftStorage.open(tmp_path, segment_bytes=200) as store:
        store.append(hard_state=HardState(5, 2, 0))
        for i in range(1, 41):
            store.append(entries=[ent(5, i)])
        store.save_snapshot(snap(5, 40))
        store.purge(40)
        assert len(segments(tmp_path)) == 1
        store.append(entries=[ent(5, 41)])
    state = reopen(tmp_path, segment_bytes=200)
    assert state.hard_state == HardState(5, 2, 0)
    assert state.purged == LogId(5, 40)
    assert indexes(state) == [(5, 41)]


def test_a_missing_middle_segment_is_a_gap(tmp_path: Path) -> None:
    """Entries must be contiguous after the purge point: a segment lost from the middle
    of the log is FatalError, not a shorter log."""
    with RaftStorage.open(tmp_path, segment_bytes=150) as store:
        for i in range(1, 31):
            store.append(entries=[ent(1, i)])
    segs = segments(tmp_path)
    segs[len(segs) // 2].unlink()
    with pytest.raises(FatalError, match="gap"):
        RaftStorage.open(tmp_path, segment_bytes=150)


@attrs.define
class _Model:
    """What the store should hold: the simulator's `Disk`, as plainly as possible."""

    entries: list[Entry] = attrs.Factory(list)
    purged: LogId = ZERO_LOG_ID
    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None

    @property
    def last(self) -> int:
        return self.entries[-1].index if self.entries else self.purged.index

    def state(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, tuple(self.entries), self.purged)


def test_randomized_writes_match_a_model(tmp_path: Path) -> None:
    """A seeded mix of appends (with conflicting truncates), hard states, installs,
    local snapshots, purges and restarts, against a list model of the log; small
    segments so that purges delete files and truncates reach into sealed ones."""
    rng = random.Random(20240611)
    model = _Model()
    store = RaftStorage.open(tmp_path, segment_bytes=300)
    term = 1
    deleted = 0
    try:
        for _ in range(150):
            op = rng.random()
            if op < 0.55:  # append, a quarter of the time at the end, else truncating
                lo = max(model.purged.index + 1, model.last + 1 - rng.randrange(4))
                term += rng.random() < 0.3
                batch = ents(term, lo, lo + rng.randrange(1, 6), size=rng.randrange(0, 40))
                hs = HardState(term, rng.choice([None, 1, 2]), lo - 1)
                hs_or_none = hs if rng.random() < 0.5 else None
                store.append(entries=batch, hard_state=hs_or_none)
                del model.entries[lo - model.purged.index - 1 :]
                model.entries.extend(batch)
                model.hard_state = hs_or_none or model.hard_state
            elif op < 0.62:  # install a snapshot from the leader
                term += 1
                s = snap(term, model.last + rng.randrange(1, 4), rng.randbytes(50))
                hs = HardState(term, None, s.meta.last_log_id.index)
                store.append(snapshot=s, hard_state=hs)
                model.entries.clear()
                model.purged, model.snapshot, model.hard_state = s.meta.last_log_id, s, hs
            elif op < 0.75 and model.entries:  # local snapshot, then purge behind it
                cur = model.snapshot.meta.last_log_id.index if model.snapshot else 0
                lo = max(cur + 1, model.entries[0].index)
                if lo <= model.last:
                    at = rng.randrange(lo, model.last + 1)
                    e = model.entries[at - model.entries[0].index]
                    s = Snapshot(SnapshotMeta(e.log_id, MEMBERS), rng.randbytes(30))
                    store.save_snapshot(s)
                    model.snapshot = s
                    upto = rng.randrange(model.purged.index, at + 1)
                    store.purge(upto)
                    if upto > model.purged.index:
                        model.purged = model.entries[upto - model.entries[0].index].log_id
                        model.entries[:] = [x for x in model.entries if x.index > upto]
            elif op < 0.85:  # restart
                deleted += store.stats.segments_deleted
                store.close()
                store = RaftStorage.open(tmp_path, segment_bytes=300)
                assert store.load() == model.state()
            else:  # hard state only
                hs = HardState(term, rng.choice([None, 3]), max(0, model.last - 1))
                store.append(hard_state=hs)
                model.hard_state = hs
        assert store.load() == model.state()
        assert deleted + store.stats.segments_deleted > 0
    finally:
        store.close()
    assert reopen(tmp_path, segment_bytes=300) == model.state()


# ---------------------------------------------------------------- torn writes and damage


def _write_log_for_tail_tests(path: Path) -> Path:
    """A log of two segments whose last record is an entries batch; returns the last
    segment."""
    with RaftStorage.open(path, segment_bytes=200) as store:
        for i in range(1, 9):
            store.append(entries=[ent(1, i)], hard_state=HardState(1, None, i - 1))
        store.append(entries=[ent(1, 9, b"tail"), ent(1, 10, b"end")])
    segs = segments(path)
    assert len(segs) >= 2
    return segs[-1]


def test_torn_tail_at_every_byte_offset_of_the_last_record(tmp_path: Path) -> None:
    """contract §8: a write torn at any byte of the last record (short header, short
    body) is cut off at open; the records before it survive and appending works."""
    base = tmp_path / "base"
    last_seg = _write_log_for_tail_tests(base)
    full = last_seg.read_bytes()
    start = record_offsets(last_seg)[-1]
    end = records_end(last_seg)
    assert end - start > records.HEADER_SIZE
    for how in ("truncated", "zeroed"):  # the file cut there, or the rest never written
        for cut in range(start, end):
            work = tmp_path / f"{how}{cut}"
            shutil.copytree(base, work)
            seg = work / "wal" / last_seg.name
            with open(seg, "r+b") as f:
                if how == "truncated":
                    f.truncate(cut)
                else:  # preallocated space the write only partly reached
                    f.seek(cut)
                    f.write(bytes(len(full) - cut))
            with RaftStorage.open(work) as store:
                state = store.load()
                assert indexes(state) == [(1, i) for i in range(1, 9)], (how, cut)
                assert state.hard_state == HardState(1, None, 7)
                # The torn write up to its last byte that is not zero.
                assert store.stats.torn_bytes_cut == len(full[start:cut].rstrip(b"\0")), cut
                store.append(entries=[ent(2, 9)])
            assert indexes(reopen(work)) == [(1, i) for i in range(1, 9)] + [(2, 9)]
            shutil.rmtree(work)


def test_torn_first_write_of_a_new_segment(tmp_path: Path) -> None:
    """A crash while a new segment gets its header and checkpoint: a segment left
    with no intact record is removed; one with a partial checkpoint gets a whole one,
    so the hard state survives when the older segments are purged later."""
    base = tmp_path / "base"
    with RaftStorage.open(base, segment_bytes=50) as store:
        store.append(hard_state=HardState(7, 3, 0))
        for i in range(1, 6):
            store.append(entries=[ent(7, i)])
    last_seg = segments(base)[-1]
    offsets = record_offsets(last_seg)
    assert len(offsets) == 4  # HEADER, HARD_STATE, PURGED, then entry 5
    header, hard_state = offsets[1:3]  # where HEADER and HARD_STATE end
    for cut in (3, header, hard_state):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(base, work)
        seg = work / "wal" / last_seg.name
        with open(seg, "r+b") as f:
            f.truncate(cut)
        with RaftStorage.open(work, segment_bytes=50) as store:
            state = store.load()
            assert indexes(state) == [(7, i) for i in range(1, 5)], cut
            assert state.hard_state == HardState(7, 3, 0)
            assert seg.exists() == (cut != 3)
            if seg.exists():  # repaired: it restates the state on its own
                alone = tmp_path / "alone"
                alone.mkdir()
                shutil.copy(seg, alone)
                assert wal.replay(alone).state.hard_state == HardState(7, 3, 0)
                shutil.rmtree(alone)
            store.append(entries=[ent(8, 5)])
            store.save_snapshot(snap(8, 5))
            store.purge(5)
            assert len(segments(work)) == 1
        state = reopen(work)
        assert state.hard_state == HardState(7, 3, 0), cut
        assert state.purged == LogId(8, 5) and state.entries == ()


def test_flipped_bit_in_the_last_record_is_a_torn_write(tmp_path: Path) -> None:
    """A bad checksum of the final record of the last segment looks exactly like a
    torn write: it is cut off, the rest is served."""
    last_seg = _write_log_for_tail_tests(tmp_path)
    start = record_offsets(last_seg)[-1]
    flip_bit(last_seg, start + records.HEADER_SIZE + 5, 3)
    size = len(last_seg.read_bytes().rstrip(b"\0"))  # (the record's last byte is not 0)
    with RaftStorage.open(tmp_path) as store:
        assert indexes(store.load()) == [(1, i) for i in range(1, 9)]
        assert store.stats.torn_bytes_cut == size - start


@pytest.mark.parametrize("where", ["body", "length", "length_high_bit", "crc"])
def test_flipped_bit_in_a_middle_record_of_the_last_segment_is_fatal(
    tmp_path: Path, where: str
) -> None:
    """Damage followed by intact records is not a torn write (a torn write leaves
    only a prefix of the last write): FatalError naming the file and the offset,
    whichever field of the record is hit, and the file is left as it was."""
    last_seg = _write_log_for_tail_tests(tmp_path)
    offsets = record_offsets(last_seg)
    victim = offsets[-2]
    pos, bit = {
        "body": (victim + records.HEADER_SIZE + 2, 1),
        "length": (victim, 0),
        "length_high_bit": (victim + 3, 6),
        "crc": (victim + 5, 2),
    }[where]
    flip_bit(last_seg, pos, bit)
    damaged = last_seg.read_bytes()
    with pytest.raises(FatalError) as info:
        RaftStorage.open(tmp_path)
    assert str(last_seg) in str(info.value)
    assert f"byte offset {victim}" in str(info.value)
    assert last_seg.read_bytes() == damaged
    # The failed open released the lock: a repaired dir could be opened again.
    with pytest.raises(FatalError):
        RaftStorage.open(tmp_path)


def test_flipped_bit_in_a_sealed_segment_is_fatal(tmp_path: Path) -> None:
    """A checksum error in a sealed segment (not the last) is never a torn write:
    FatalError naming the file and the byte offset."""
    _write_log_for_tail_tests(tmp_path)
    sealed = segments(tmp_path)[0]
    offsets = record_offsets(sealed)
    victim = offsets[-1]  # even the sealed segment's last record
    flip_bit(sealed, victim + records.HEADER_SIZE + 1)
    with pytest.raises(FatalError) as info:
        RaftStorage.open(tmp_path)
    assert str(sealed) in str(info.value)
    assert f"byte offset {victim}" in str(info.value)


def test_truncated_sealed_segment_is_fatal(tmp_path: Path) -> None:
    """A sealed segment cut short lost acknowledged records: FatalError."""
    _write_log_for_tail_tests(tmp_path)
    sealed = segments(tmp_path)[0]
    with open(sealed, "r+b") as f:
        f.truncate(records_end(sealed) - 3)
    with pytest.raises(FatalError, match="sealed segment"):
        RaftStorage.open(tmp_path)


def test_zero_bytes_after_the_records_are_free_space(tmp_path: Path) -> None:
    """Zeros after the last record (preallocated, or a crash left the file longer
    than the data) are not a torn write: nothing is cut, and appends go right after
    the records, over the zeros."""
    last_seg = _write_log_for_tail_tests(tmp_path)
    end = records_end(last_seg)
    with open(last_seg, "ab") as f:
        f.write(bytes(4096))
    size = last_seg.stat().st_size
    with RaftStorage.open(tmp_path) as store:
        assert indexes(store.load()) == [(1, i) for i in range(1, 11)]
        assert store.stats.torn_bytes_cut == 0
        store.append(entries=[ent(1, 11)])
    assert record_offsets(last_seg)[-1] == end and last_seg.stat().st_size == size
    assert indexes(reopen(tmp_path)) == [(1, i) for i in range(1, 12)]


def test_appends_fill_preallocated_space_without_growing_the_file(tmp_path: Path) -> None:
    """The writer reserves space up to the next multiple of PREALLOC_BYTES (never past
    the segment size), so an append does not change the file's size (its fdatasync has no size to record); replay
    finds the records' end before the zeros, and a new segment is preallocated too."""
    seg_bytes = 8 * wal.PREALLOC_BYTES
    with RaftStorage.open(tmp_path, segment_bytes=seg_bytes) as store:
        store.append(entries=[ent(1, 1)])
        [seg] = segments(tmp_path)
        assert seg.stat().st_size == wal.PREALLOC_BYTES
        for i in range(2, 40):
            store.append(entries=[ent(1, i, b"v" * 1000)])
        assert seg.stat().st_size == wal.PREALLOC_BYTES
        assert store.stats.wal_bytes == records_end(seg) < wal.PREALLOC_BYTES
        store.append(entries=[ent(1, 40, b"w" * (wal.PREALLOC_BYTES + 10))])  # more than reserved
        assert seg.stat().st_size == 2 * wal.PREALLOC_BYTES  # the next multiple past the records
    assert [i for _, i in indexes(reopen(tmp_path, segment_bytes=seg_bytes))] == list(range(1, 41))
    with RaftStorage.open(tmp_path, segment_bytes=100_000) as store:  # past its size: rolls
        store.append(entries=[ent(1, 41)])
        new = segments(tmp_path)[-1]
        assert new != seg and new.stat().st_size == 100_000  # capped at the segment size
    assert [i for _, i in indexes(reopen(tmp_path))] == list(range(1, 42))


def test_a_segment_is_sealed_tight_and_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a new segment starts, the old one ends at its records and its last write
    is synced: a write without a sync may have filled it (a commit index alone), and
    a sealed segment is never repaired at open. Zeros in a sealed segment are damage."""
    synced: list[str] = []
    real = wal.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(wal, "fdatasync", recording)
    with RaftStorage.open(tmp_path, segment_bytes=200) as store:
        store.append(entries=ents(1, 1, 4, size=20))
        [old] = segments(tmp_path)
        while records_end(old) < 200:  # unsynced hard states fill it
            store.append(hard_state=HardState(1, None, 4), sync=False)
        synced.clear()
        store.append(entries=ents(1, 5, 5))  # rolls
        new = segments(tmp_path)[-1]
        assert new != old and synced[0] == old.name and new.name in synced
        assert old.stat().st_size == records_end(old)
    # Lowered segment size: the big reservation is cut when the segment is sealed.
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 6, 6, size=300))  # past the 200 reserved: 4 MiB more
        assert new.stat().st_size == wal.PREALLOC_BYTES
    with RaftStorage.open(tmp_path, segment_bytes=64) as store:
        store.append(entries=ents(1, 7, 7))
        assert segments(tmp_path)[-1] != new and new.stat().st_size == records_end(new)
    assert [i for _, i in indexes(reopen(tmp_path))] == list(range(1, 8))
    with open(new, "ab") as f:  # a sealed segment never ends in zeros
        f.write(bytes(100))
    with pytest.raises(FatalError, match="in a sealed segment"):
        RaftStorage.open(tmp_path)


def test_a_torn_write_whose_later_sector_landed_first_is_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write into preallocated space may reach the disk sector by sector, a later
    one first: its first sector reads as zeros while records after it are intact.
    None of it was synced (nor anything after it): cut, not refused. Damage with no
    zeroed sector before the intact records stays fatal (test above)."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 5), hard_state=HardState(1, None, 5))
        [seg] = segments(tmp_path)
        start = records_end(seg)
        # One write: entries 6..9 (a record spanning sectors) and a hard state after.
        store.append(entries=ents(1, 6, 9, size=300), hard_state=HardState(1, None, 9))
    end = records_end(seg)
    assert end - start > 2 * wal.SECTOR
    first = (start // wal.SECTOR + 1) * wal.SECTOR  # the write's first sector, from its start
    with open(seg, "r+b") as f:
        f.seek(start)
        f.write(bytes(first - start))
    with caplog.at_level(logging.WARNING, logger="metanode.storage"):
        with RaftStorage.open(tmp_path) as store:
            state = store.load()
            assert indexes(state) == [(1, i) for i in range(1, 6)]
            assert state.hard_state == HardState(1, None, 5)
            assert store.stats.torn_bytes_cut == end - start  # from the damaged record on
            store.append(entries=ents(2, 6, 6))
    assert any("cutting a torn record" in r.getMessage() for r in caplog.records)
    assert indexes(reopen(tmp_path)) == [(1, i) for i in range(1, 6)] + [(2, 6)]


def test_a_file_system_refusing_preallocation_only_slows_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """posix_fallocate failing (a full disk, a file system without it): said once per
    segment, and appends grow the file as they go."""
    calls = []

    def refuse(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    with caplog.at_level(logging.WARNING, logger="metanode.storage"):
        with RaftStorage.open(tmp_path) as store:
            for i in range(1, 6):
                store.append(entries=[ent(1, i)])
            [seg] = segments(tmp_path)
            assert seg.stat().st_size == records_end(seg) == store.stats.wal_bytes
    said = [r.getMessage() for r in caplog.records if "preallocate" in r.getMessage()]
    assert len(said) == 1 and "No space left" in said[0] and str(seg) in said[0]
    assert len(calls) == 5  # tried again at each append: the disk may have room later
    assert indexes(reopen(tmp_path)) == [(1, i) for i in range(1, 6)]


def test_missing_snapshot_file_is_fatal(tmp_path: Path) -> None:
    """The log says which snapshot is current: if its file is gone, or fails its
    checksum, the node must not start (the purged entries exist nowhere else)."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 10))
        store.save_snapshot(snap(1, 8, b"precious state"))
        store.purge(8)
    path = tmp_path / "snapshot" / "snap-1-8.bin"
    data = path.read_bytes()
    path.unlink()
    with pytest.raises(FatalError) as info:
        RaftStorage.open(tmp_path)
    assert str(path) in str(info.value)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FatalError, match="checksum") as info:
        RaftStorage.open(tmp_path)
    assert str(path) in str(info.value)
    path.write_bytes(data)
    assert reopen(tmp_path).snapshot == snap(1, 8, b"precious state")


def test_unrecorded_snapshot_files_are_removed_at_open(tmp_path: Path) -> None:
    """A crash after a snapshot file is renamed but before the WAL records it leaves
    a file nobody references; it and temporary files are removed at open, the
    recorded snapshot stays."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 10))
        store.save_snapshot(snap(1, 5))
    snap_dir = tmp_path / "snapshot"
    shutil.copy(snap_dir / "snap-1-5.bin", snap_dir / "snap-1-9.bin")
    (snap_dir / "snap-1-9.bin.abcd.tmp").write_bytes(b"half")
    state = reopen(tmp_path)
    assert state.snapshot == snap(1, 5)
    assert sorted(p.name for p in snap_dir.iterdir()) == ["snap-1-5.bin"]


def test_corrupt_meta_is_fatal(tmp_path: Path) -> None:
    """The meta file is replaced atomically, so any damage is corruption: FatalError."""
    with RaftStorage.open(tmp_path) as store:
        store.save_meta(NodeMeta(3, "c", "n"))
    meta = tmp_path / "meta"
    flip_bit(meta, len(meta.read_bytes()) - 2)
    with pytest.raises(FatalError) as info:
        RaftStorage.open(tmp_path)
    assert str(meta) in str(info.value)


def test_a_missing_wal_with_a_meta_is_fatal(tmp_path: Path) -> None:
    """An initialized node whose WAL vanished must not start as an empty node: it
    would forget its votes and its log."""
    with RaftStorage.open(tmp_path) as store:
        store.append(entries=ents(1, 1, 3), hard_state=HardState(3, 1, 2))
        store.save_meta(NodeMeta(1, "c", "n"))
    shutil.rmtree(tmp_path / "wal")
    with pytest.raises(FatalError, match="WAL is missing"):
        RaftStorage.open(tmp_path)


# ---------------------------------------------------------------- the directory


def test_the_dir_is_locked(tmp_path: Path) -> None:
    """A second open of the same dir (another process, or this one) is refused with
    ConfigError naming the dir; after close it opens again."""
    store = RaftStorage.open(tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            RaftStorage.open(tmp_path)
        assert str(tmp_path) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
    finally:
        store.close()
    store.close()  # idempotent
    RaftStorage.open(tmp_path).close()


def test_an_unusable_dir_is_a_config_error(tmp_path: Path) -> None:
    """A raft_dir that cannot be created is ConfigError naming the dir and the OS
    error (here its parent is a regular file)."""
    parent = tmp_path / "file"
    parent.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        RaftStorage.open(parent / "raft")
    assert str(parent / "raft") in str(info.value)
    assert "Not a directory" in str(info.value)


def _open_error_as_nobody(raft_dir: Path) -> str:
    """The ConfigError message of opening `raft_dir` in a forked child that dropped
    root privileges (root ignores permission bits)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_fd)
            os.setgid(65534)
            os.setuid(65534)
            try:
                RaftStorage.open(raft_dir).close()
                message = "opened"
            except ConfigError as exc:
                message = str(exc)
            os.write(write_fd, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_an_unwritable_dir_is_a_config_error() -> None:
    """A raft_dir without write permission is ConfigError naming the dir and the OS
    error (as root, checked in a child that dropped its privileges)."""
    base = Path(tempfile.mkdtemp(prefix="metanode-ro."))
    raft_dir = base / "raft"
    try:
        raft_dir.mkdir()
        base.chmod(0o755)
        raft_dir.chmod(0o555)
        if os.geteuid() == 0:
            message = _open_error_as_nobody(raft_dir)
        else:
            with pytest.raises(ConfigError) as info:
                RaftStorage.open(raft_dir)
            message = str(info.value)
        assert str(raft_dir) in message
        assert "Permission denied" in message
    finally:
        raft_dir.chmod(0o700)
        shutil.rmtree(base)


# ---------------------------------------------------------------- with the core


def _persist(core: RaftCore, store: RaftStorage) -> None:
    """The runtime's loop, minus the network: persist each Ready, then advance."""
    while core.has_ready():
        ready = core.take_ready()
        store.append(entries=ready.entries, hard_state=ready.hard_state, snapshot=ready.snapshot)
        core.advance(ready)


def test_persisted_state_round_trip_through_raft_core(tmp_path: Path) -> None:
    """A single-node core elected, writing, compacting; a core built from load()
    after a restart has the same term, vote, commit, log and membership (§3.8)."""
    config = RaftConfig(1)
    with RaftStorage.open(tmp_path, segment_bytes=400) as store:
        boot = bootstrap_state([1])
        store.append(entries=boot.entries, hard_state=boot.hard_state)
        core = RaftCore(config, store.load(), random.Random(1))
        for _ in range(3 * config.election_ticks):
            core.tick()
            _persist(core, store)
        assert core.is_leader
        for i in range(20):
            core.propose(b"cmd%d" % i)
            _persist(core, store)
        applied = core.log.applied
        s = Snapshot(SnapshotMeta(core.log.last_log_id, core.membership_at(applied)), b"sm")
        store.save_snapshot(s)
        core.compact(s, applied - 5)
        store.purge(core.log.purged.index)
        core.propose(b"after")
        _persist(core, store)
        before = core.status()
    with RaftStorage.open(tmp_path, segment_bytes=400) as store:
        again = RaftCore(config, store.load(), random.Random(2))
    after = again.status()
    assert after.term == before.term >= 2
    assert after.vote == before.vote == 1
    assert after.commit == before.commit == before.last_log_id.index
    assert after.last_log_id == before.last_log_id
    assert after.purged == before.purged
    assert after.snapshot_last_log_id == s.meta.last_log_id
    assert after.membership == before.membership == Membership.of([1])
    assert again.log.entries == core.log.entries


def test_a_commit_only_hard_state_may_skip_the_fsync(tmp_path):
    """etcd's MustSync: entries and term/vote are always synced; a hard state whose
    commit alone moved may be written without an fsync (the next synced write carries
    it), and reloads like any other record."""
    from metanode.raft.types import Entry, HardState

    store = RaftStorage.open(tmp_path / "d")
    store.append(entries=[Entry(1, 1)], hard_state=HardState(1, 1, 0))
    before = store.stats.wal_fsyncs
    store.append(hard_state=HardState(1, 1, 1), sync=False)
    assert store.stats.wal_fsyncs == before
    with pytest.raises(ValueError):
        store.append(entries=[Entry(1, 2)], sync=False)
    store.close()
    assert RaftStorage.open(tmp_path / "d").load().hard_state == HardState(1, 1, 1)
