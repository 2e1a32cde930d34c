"""Power loss fuzz of the durable store (metanode/storage/wal.py; docs/reference/data-dir.md).

Random `RaftStorage` operations (appends with conflicting truncates, installs, local
snapshots, purges, hard states with and without a sync; random segment and
preallocation sizes; fallocate failing, also after a partial allocation) and crashes at
every fdatasync and directory fsync and between operations. A crash leaves each file
at its synced or its current size, and of its unsynced 512-byte sectors either a
prefix ("prefix") or any subset ("any": a write into preallocated space may land
sector by sector, a later one first), plus maybe one torn sector (zeros, a partial
write or garbage); unsynced directory entries may vanish or appear. After each crash
the store must open and hold one of the states the operation under way could leave:
never less than what was synced."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import attrs
import pytest

from metanode.errors import FatalError
from metanode.raft.types import HardState, PersistedState, Snapshot, SnapshotMeta
from metanode.storage import RaftStorage, wal
from tests.unit.test_storage import MEMBERS, _Model, ents, snap

SECTOR = 512


class Crash(BaseException):
    pass


class Disk:
    """Tracks what is durable in one wal dir."""

    def __init__(self, wal_dir: Path, rng: random.Random, p: float, mode: str) -> None:
        self.dir = wal_dir
        self.rng = rng
        self.p = p
        self.mode = mode
        self.files = {n: (wal_dir / n).read_bytes() for n in os.listdir(wal_dir)}
        self.names = set(self.files)
        self.armed = True
        self.image: dict[str, bytes] | None = None

    def current(self) -> dict[str, bytes]:
        return {n: (self.dir / n).read_bytes() for n in os.listdir(self.dir)}

    def mix(self, d: bytes | None, c: bytes) -> bytes:
        rng = self.rng
        if d is None:
            d = b""
        size = rng.choice([len(d), len(c)])
        dp = d[:size].ljust(size, b"\0")
        cp = c[:size].ljust(size, b"\0")
        diff = [i for i in range(0, size, SECTOR) if dp[i : i + SECTOR] != cp[i : i + SECTOR]]
        out = bytearray(dp)
        if self.mode == "prefix":
            k = rng.randint(0, len(diff))
            take = diff[:k]
        else:
            take = [i for i in diff if rng.random() < 0.5]
            k = len(diff)
        for i in take:
            out[i : i + SECTOR] = cp[i : i + SECTOR]
        if k < len(diff) and rng.random() < 0.5:  # a torn sector
            i = diff[k]
            cut = rng.randint(0, SECTOR)
            first = next(j for j in range(i, i + SECTOR) if dp[j] != cp[j])
            if rng.random() < 0.3:
                g = max(i + cut, first)
                out[g : i + SECTOR] = rng.randbytes(len(out[g : i + SECTOR]))
            else:
                out[i : i + cut] = cp[i : i + cut]
        return bytes(out)

    def crash_image(self) -> dict[str, bytes]:
        cur = self.current()
        img = {}
        for n in sorted(set(cur) | self.names):
            present = n in cur and n in self.names or self.rng.random() < 0.5
            if not present:
                continue
            if n in cur:
                img[n] = self.mix(self.files.get(n), cur[n])
            else:
                img[n] = self.files[n]
        return img

    def maybe_crash(self) -> None:
        if self.armed and self.rng.random() < self.p:
            self.image = self.crash_image()
            raise Crash

    def synced(self, fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        self.files[name] = (self.dir / name).read_bytes()

    def dir_synced(self) -> None:
        cur = set(os.listdir(self.dir))
        self.names = cur
        for n in list(self.files):
            if n not in cur:
                del self.files[n]


@attrs.define
class Ctx:
    disk: Disk | None = None


def _install_hooks(monkeypatch: pytest.MonkeyPatch, ctx: Ctx, rng: random.Random) -> None:
    real_fdatasync = wal.fdatasync
    real_fsync_dir = wal.fsync_dir
    real_fallocate = os.posix_fallocate

    def fdatasync(fd: int) -> None:
        if ctx.disk is not None:
            ctx.disk.maybe_crash()
        real_fdatasync(fd)
        if ctx.disk is not None:
            ctx.disk.synced(fd)

    def fsync_dir(path: Path) -> None:
        if ctx.disk is not None and Path(path) == ctx.disk.dir:
            ctx.disk.maybe_crash()
        real_fsync_dir(path)
        if ctx.disk is not None and Path(path) == ctx.disk.dir:
            ctx.disk.dir_synced()

    def fallocate(fd: int, off: int, length: int) -> None:
        r = rng.random()
        if r < 0.1:
            raise OSError(errno.ENOSPC, "No space left on device")
        if r < 0.2:  # partial allocation, then ENOSPC (ext4 extends the size as it goes)
            real_fallocate(fd, off, rng.randint(1, length))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fallocate(fd, off, length)

    monkeypatch.setattr(wal, "fdatasync", fdatasync)
    monkeypatch.setattr(wal, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)


def _run(tmp_path: Path, seed: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    rng = random.Random(seed)
    monkeypatch.setattr(wal, "PREALLOC_BYTES", rng.choice([512, 1000, 4096]))
    ctx = Ctx()
    _install_hooks(monkeypatch, ctx, rng)
    gen = 0
    root = tmp_path / f"d{gen}"
    model = _Model()
    chain: list[PersistedState] = [model.state()]  # states a crash may leave
    term = 1
    counts = {"crashes": 0, "fatal": 0, "ops": 0}
    hist: list = []

    def seg_bytes() -> int:
        return rng.choice([200, 300, 700, 1500, 5000])

    def open_store() -> RaftStorage:
        nonlocal root, gen
        while True:
            ctx.disk = Disk(root / "wal", rng, 0.15, mode) if (root / "wal").exists() else None
            try:
                st = RaftStorage.open(root, segment_bytes=seg_bytes())
            except Crash:
                crash()
                continue
            got = st.load()
            assert got in chain, (seed, got, chain, hist[-4:])
            # what came back is now the durable state
            ctx.disk = Disk(root / "wal", rng, 0.15, mode)
            return st

    def crash() -> None:
        nonlocal root, gen
        hist.append(("CRASH", sorted(os.listdir(root / "snapshot")), {n: len(b) for n, b in ctx.disk.image.items()}))
        assert ctx.disk is not None and ctx.disk.image is not None
        img = ctx.disk.image
        counts["crashes"] += 1
        gen += 1
        new = tmp_path / f"d{gen}"
        shutil.copytree(root, new, ignore=shutil.ignore_patterns("wal", "LOCK"))
        (new / "wal").mkdir()
        for n, data in img.items():
            (new / "wal" / n).write_bytes(data)
        shutil.rmtree(root)
        root = new
        ctx.disk = None

    store = open_store()
    try:
        for _ in range(120):
            counts["ops"] += 1
            op = rng.random()
            pre = model.state()
            cands: list[PersistedState] = []
            sync = True
            lo = batch = hs = s = upto = None
            try:
                if op < 0.5:
                    floor = model.snapshot.meta.last_log_id.index if model.snapshot else 0
                    lo = max(model.purged.index + 1, floor + 1, model.last + 1 - rng.randrange(4))
                    if lo > model.last + 1:
                        continue
                    term += rng.random() < 0.3
                    batch = ents(term, lo, lo + rng.randrange(1, 6), size=rng.randrange(0, 300))
                    hs = HardState(term, rng.choice([None, 1, 2]), lo - 1) if rng.random() < 0.5 else None
                    m2 = attrs.evolve(model, entries=list(model.entries))
                    del m2.entries[lo - m2.purged.index - 1 :]
                    m2.entries.extend(batch)
                    cands.append(m2.state())
                    m3 = attrs.evolve(m2, hard_state=hs or m2.hard_state)
                    cands.append(m3.state())
                    new_model = m3
                    do = lambda: store.append(entries=batch, hard_state=hs)  # noqa: E731
                elif op < 0.57:
                    term += 1
                    s = snap(term, model.last + rng.randrange(1, 4), rng.randbytes(50))
                    hs = HardState(term, None, s.meta.last_log_id.index)
                    m2 = _Model([], s.meta.last_log_id, model.hard_state, s)
                    cands.append(m2.state())
                    new_model = attrs.evolve(m2, hard_state=hs)
                    cands.append(new_model.state())
                    do = lambda: store.append(snapshot=s, hard_state=hs)  # noqa: E731
                elif op < 0.7 and model.entries:
                    cur = model.snapshot.meta.last_log_id.index if model.snapshot else 0
                    lo = max(cur + 1, model.entries[0].index)
                    if lo > model.last:
                        continue
                    at = rng.randrange(lo, model.last + 1)
                    e = model.entries[at - model.entries[0].index]
                    s = Snapshot(SnapshotMeta(e.log_id, MEMBERS), rng.randbytes(30))
                    m2 = attrs.evolve(model, entries=list(model.entries), snapshot=s)
                    cands.append(m2.state())
                    new_model = m2
                    do = lambda: store.save_snapshot(s)  # noqa: E731
                elif op < 0.8 and model.snapshot is not None:
                    upto = rng.randrange(model.purged.index, model.snapshot.meta.last_log_id.index + 1)
                    if upto > model.last:
                        continue
                    m2 = attrs.evolve(model, entries=list(model.entries))
                    sync = upto > m2.purged.index  # a no-op purge writes nothing
                    if upto > m2.purged.index:
                        m2.purged = m2.entries[upto - m2.entries[0].index].log_id
                        m2.entries[:] = [x for x in m2.entries if x.index > upto]
                    cands.append(m2.state())
                    new_model = m2
                    do = lambda: store.purge(upto)  # noqa: E731
                elif op < 0.88:
                    hs = HardState(term, rng.choice([None, 3]), max(0, model.last - 1))
                    sync = rng.random() < 0.5
                    new_model = attrs.evolve(model, entries=list(model.entries), hard_state=hs)
                    cands.append(new_model.state())
                    do = lambda: store.append(hard_state=hs, sync=sync)  # noqa: E731
                elif op < 0.95:  # crash between ops (loses unsynced hard states)
                    assert ctx.disk is not None
                    ctx.disk.image = ctx.disk.crash_image()
                    raise Crash
                else:  # clean restart
                    store.close()
                    store = open_store()
                    chain = [model.state()]
                    continue
                chain.extend(cands)
                hist.append((op, {k: v for k, v in locals().items() if k in ("lo", "batch", "hs", "s", "upto", "sync")}))
                do()
                model = new_model
                if sync:
                    chain = [model.state()]
            except Crash:
                store._wal.close()
                store._lock.release()
                crash()
                store = open_store()
                got = store.load()
                # What came back is the model from here on.
                model = _Model(list(got.entries), got.purged, got.hard_state, got.snapshot)
                chain = [model.state()]
                term = max(term, got.hard_state.term, *(e.term for e in got.entries)) if got.entries else max(term, got.hard_state.term)
                if got.snapshot is not None:
                    term = max(term, got.snapshot.meta.last_log_id.term)
            except FatalError:
                counts["fatal"] += 1
                raise
        ctx.disk = None
        store.close()
        store = open_store()
        assert store.load() in chain
    finally:
        store.close()
    return counts


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("mode", ["prefix", "any"])
def test_power_loss_never_loses_what_was_synced(
    tmp_path: Path, seed: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = _run(tmp_path, seed, mode, monkeypatch)
    assert counts["fatal"] == 0
