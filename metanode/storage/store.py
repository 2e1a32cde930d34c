"""`RaftStorage`: the durable store of one node (WAL, snapshots, meta) behind one API.

Blocking code, no trio: the runtime calls every method through
`trio.to_thread.run_sync`. Methods are serialized by a lock, so a snapshot saved from
another thread cannot interleave with an append (the snapshot file itself is written
outside the lock).

The runtime persists each `Ready` with one call (design §3, contract §8):

    storage.append(entries=ready.entries, hard_state=ready.hard_state,
                   snapshot=ready.snapshot)        # one WAL write + one fdatasync

and after building a snapshot from the applied state:

    storage.save_snapshot(snapshot); core.compact(snapshot, upto)
    storage.purge(core.log.purged.index)

See `metanode.storage` for the files on disk.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, TypeVar

import attrs

from metanode.errors import ConfigError, FatalError, SnapshotFailed
from metanode.raft.types import Entry, HardState, LogId, PersistedState, Snapshot
from metanode.storage import meta as meta_file
from metanode.storage import snapshots, wal
from metanode.storage.fsutil import DirLock, describe_os_error
from metanode.storage.meta import NodeMeta
from metanode.storage.stats import StorageStats

log = logging.getLogger("metanode.storage")

DEFAULT_SEGMENT_BYTES = 64 << 20

P = ParamSpec("P")
T = TypeVar("T")


class RaftStorage:
    """The WAL, the snapshot files and the node meta of one `raft_dir`, locked.

    Open with `RaftStorage.open`; `load()` gives the `PersistedState` to build a
    `RaftCore` from. Every write is durable when the call returns. Any failed write
    or sync raises `FatalError` and leaves the store unusable (every later call
    raises `FatalError` too): the node must stop.
    """

    def __init__(
        self,
        root: Path,
        lock: DirLock,
        writer: wal.WalWriter,
        state: wal.WalState,
        snapshot: Snapshot | None,
        meta: NodeMeta | None,
        stats: StorageStats,
    ) -> None:
        self.root = root
        self._lock = lock
        self._mutex = threading.Lock()
        self._wal = writer
        self._wal_dir = root / "wal"
        self._snapshot_dir = root / "snapshot"
        self._meta = meta
        self._stats = stats
        self._hard_state = state.hard_state
        self._purged = state.purged
        self._snapshot_id = state.snapshot
        # The term of every entry after `_purged`: enough to validate appends and to
        # name the purge point, without a second copy of the log in memory.
        self._terms = array.array("Q", (e.term for e in state.entries))
        # What open() recovered, handed out by the first load() (then dropped).
        self._recovered: PersistedState | None = PersistedState(
            state.hard_state, snapshot, tuple(state.entries), state.purged
        )
        self._broken: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, raft_dir: str | Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> RaftStorage:
        """Open (creating it if missing) and lock `raft_dir`, and recover its state.

        Raises `ConfigError` naming the dir if it cannot be created or written or
        another process holds it; `FatalError` naming the file (and byte offset) if
        the data is damaged. A torn write at the end of the log is cut off (warning).
        """
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        root = Path(raft_dir)
        lock = DirLock.acquire(root)
        try:
            return cls._open_locked(root, lock, segment_bytes)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open_locked(cls, root: Path, lock: DirLock, segment_bytes: int) -> RaftStorage:
        started = time.perf_counter()
        stats = StorageStats()
        wal_dir, snap_dir, meta_path = root / "wal", root / "snapshot", root / "meta"
        try:
            wal_dir.mkdir(exist_ok=True)
            snap_dir.mkdir(exist_ok=True)
            meta = meta_file.read_meta(meta_path)
            replayed = wal.replay(wal_dir)
            snap_files, _ = snapshots.list_files(snap_dir)
        except OSError as exc:
            raise _open_error(root, "is not usable", exc) from exc
        state = replayed.state
        if not replayed.segments and (meta is not None or snap_files):
            raise FatalError(
                f"{wal_dir}: the WAL is missing but {root} holds"
                f" {'a node meta' if meta is not None else 'snapshots'}: refusing to start"
                " from an incomplete data dir"
            )
        snapshot = None
        if state.snapshot is not None:
            newer = sorted(i for i in snap_files if i.index > state.snapshot.index)
            if state.snapshot not in snap_files and newer:
                # The WAL lost the SNAPSHOT record of a newer file with its tail (a
                # disk that lost synced writes): an older file goes only once the
                # newer one's record is durable, and a file is complete before its
                # record is written. It holds committed entries only: use it (the log,
                # if it does not reach it, is reset to it at start).
                log.warning(
                    "%s: the WAL names snapshot %s, whose file is gone: it lost the record"
                    " of snapshot %s, which is used", wal_dir, state.snapshot, newer[-1],
                )
                state.snapshot = newer[-1]
            snapshot = snapshots.read_snapshot(snap_dir, state.snapshot)
        covered = snapshot.meta.last_log_id.index if snapshot is not None else 0
        if state.purged.index > covered:
            raise FatalError(
                f"{wal_dir}: the log is purged up to {state.purged} but no snapshot covers it"
            )
        checkpoint = wal.checkpoint_bodies(state.hard_state, state.purged, state.snapshot)
        try:
            writer = wal.WalWriter.open(
                wal_dir, replayed, checkpoint, state.last_index + 1, segment_bytes, stats
            )
            snapshots.remove_unreferenced(snap_dir, state.snapshot)
            meta_file.remove_leftovers(meta_path)
        except OSError as exc:
            raise _open_error(root, "is not writable", exc) from exc
        stats.recovery_seconds = time.perf_counter() - started
        log.info(
            "opened %s in %.3fs: %s, purged %s, last %d, snapshot %s, %d segments",
            root,
            stats.recovery_seconds,
            state.hard_state,
            state.purged,
            state.last_index,
            state.snapshot,
            stats.segments,
        )
        return cls(root, lock, writer, state, snapshot, meta, stats)

    # ------------------------------------------------------------------ reading
    def load(self) -> PersistedState:
        """What is on disk: hard state, latest snapshot, entries after `purged`.

        The first call returns what `open()` recovered; later calls (or calls after
        writes) read the data dir again.
        """
        with self._mutex:
            self._check_usable()
            recovered, self._recovered = self._recovered, None
            if recovered is not None:
                return recovered
            try:
                state = wal.replay(self._wal_dir).state
            except OSError as exc:
                raise FatalError(f"{exc.filename}: cannot read: {describe_os_error(exc)}") from exc
            snapshot = None
            if state.snapshot is not None:
                snapshot = snapshots.read_snapshot(self._snapshot_dir, state.snapshot)
            return PersistedState(state.hard_state, snapshot, tuple(state.entries), state.purged)

    @property
    def meta(self) -> NodeMeta | None:
        """Who this node is; None for a data dir never initialized."""
        return self._meta

    @property
    def stats(self) -> StorageStats:
        """A copy of the counters and sizes, for metrics."""
        return attrs.evolve(self._stats)

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    @property
    def purged(self) -> LogId:
        return self._purged

    @property
    def last_index(self) -> int:
        return self._purged.index + len(self._terms)

    @property
    def snapshot_id(self) -> LogId | None:
        """The log id of the latest durable snapshot."""
        return self._snapshot_id

    def wal_segments(self) -> list[tuple[str, int]]:
        """The WAL segment files, oldest first, as (20-digit file number, bytes); the
        last one is the segment being appended to. Read without the lock (a copy of a
        list the writer thread only appends to or pops from): it may be a write behind.
        For the status document (docs/reference/admin-api.md)."""
        return [(f"{s.number:020d}", s.size) for s in list(self._wal.segments)]

    # ------------------------------------------------------------------ writing
    def save_meta(self, meta: NodeMeta) -> None:
        """Replace the node meta atomically (temp file, fsync, rename, fsync dir)."""
        with self._mutex:
            self._check_usable()
            self._guard(meta_file.write_meta, self.root / "meta", meta)
            self._meta = meta
            self._stats.meta_writes += 1
            self._stats.dir_fsyncs += 1
            log.info("saved node meta %s", meta)

    def append(
        self,
        *,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        """Persist what one `Ready` asks for; durable when this returns (with
        `sync=False`, only a hard state whose commit index alone changed: written but
        not fsynced, as etcd does; a lost commit index is learned again from the
        leader).

        In order: install `snapshot` (received from the leader: its file is written
        and synced first, then the log is reset to it), append `entries` (replacing
        the stored entries from `entries[0].index` on: a conflicting truncate), then
        `hard_state`. The WAL records go out in one write with exactly one
        `fdatasync`. Does nothing when all three are empty.

        Raises `ValueError` for entries that do not fit the log (not contiguous, a
        gap after the last entry, or at or before the purge point) without writing
        anything; `FatalError` if a write or sync fails.
        """
        if not entries and hard_state is None and snapshot is None:
            return
        with self._mutex:
            self._check_usable()
            purged, last = self._purged, self.last_index
            if snapshot is not None:
                purged = snapshot.meta.last_log_id
                last = purged.index
            if entries:
                _check_entries(entries, purged, last)
            bodies: list[bytes] = []
            if snapshot is not None:
                self._guard(self._write_snapshot_file, snapshot)
                bodies.append(wal.encode_log_id(wal.Kind.INSTALL, snapshot.meta.last_log_id))
            if entries:
                bodies.append(wal.encode_entries(entries))
            if hard_state is not None:
                bodies.append(wal.encode_hard_state(hard_state))
            first_hint = entries[0].index if entries else last + 1
            if not sync and (entries or snapshot is not None):
                raise ValueError("entries and snapshots are always synced")
            self._guard(self._wal.write, bodies, self._checkpoint, first_hint, sync)
            self._recovered = None
            self._stats.appends += 1
            if snapshot is not None:
                sid = snapshot.meta.last_log_id
                self._purged = sid
                self._snapshot_id = sid
                self._terms = array.array("Q")
                self._wal.note_reset(sid.index)
                log.info("installed snapshot %s", sid)
                self._remove_older_snapshots(sid)
            if entries:
                first = entries[0].index
                prev_last = self.last_index
                del self._terms[first - self._purged.index - 1 :]
                self._terms.extend(e.term for e in entries)
                self._wal.note_entries(first, entries[-1].index, prev_last)
                self._stats.entries_appended += len(entries)
            if hard_state is not None:
                self._hard_state = hard_state

    def mapped_snapshot(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` (stored already) with its data memory-mapped from its file, so
        the raft core keeps it for followers without holding it in the heap."""
        return snapshots.map_snapshot(self._snapshot_dir, snapshot.meta.last_log_id, snapshot.meta)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep `snapshot`, built locally from the applied state, as the latest one.

        The file is written atomically (temp file, fsync, rename, fsync dir), then a
        SNAPSHOT record makes it current (one WAL fdatasync), then older snapshot
        files are removed. A snapshot not newer than the current one is ignored.
        The log is not changed: call `purge` for that.

        Raises `SnapshotFailed` when the file cannot be written (a full disk): the store
        stays usable, try again later; `FatalError` when the WAL record fails.
        """
        sid = snapshot.meta.last_log_id
        with self._mutex:
            self._check_usable()
            if self._is_old(sid):
                log.debug("ignoring snapshot %s: %s is newer", sid, self._snapshot_id)
                return
        try:
            self._write_snapshot_file(snapshot)  # outside the lock: may be big
        except FatalError as exc:
            # Only the new file failed (ENOSPC...): its temporary file is gone, the WAL and
            # the current snapshot are untouched, so the store stays usable.
            log.warning("%s", exc)
            raise SnapshotFailed(str(exc)) from exc
        with self._mutex:
            self._check_usable()
            if self._is_old(sid):  # a newer one was installed meanwhile
                log.debug("dropping snapshot %s: %s is newer", sid, self._snapshot_id)
                assert self._snapshot_id is not None
                snapshots.remove_older(self._snapshot_dir, self._snapshot_id)
                return
            body = wal.encode_log_id(wal.Kind.SNAPSHOT, sid)
            self._guard(self._wal.write, [body], self._checkpoint, self.last_index + 1)
            self._recovered = None
            self._snapshot_id = sid
            log.info("saved snapshot %s", sid)
        # Outside the lock: removing a large file takes a while (its pages are freed),
        # and the WAL must not wait for it. Only files older than a durable snapshot go.
        self._remove_older_snapshots(sid)

    def purge(self, upto: int) -> None:
        """Forget entries up to `upto` (they are behind the latest snapshot).

        Writes a PURGED record (one WAL fdatasync), then deletes the oldest segment
        files whose live entries are all <= `upto`. A no-op at or before the current
        purge point. Raises `ValueError` when `upto` is past the last entry or past
        the latest snapshot (purging it would lose data).
        """
        with self._mutex:
            self._check_usable()
            if upto <= self._purged.index:
                return
            if upto > self.last_index:
                raise ValueError(f"cannot purge up to {upto}: the last entry is {self.last_index}")
            if self._snapshot_id is None or upto > self._snapshot_id.index:
                raise ValueError(
                    f"cannot purge up to {upto}: the latest snapshot is {self._snapshot_id}"
                )
            purged = LogId(self._terms[upto - self._purged.index - 1], upto)
            body = wal.encode_log_id(wal.Kind.PURGED, purged)
            self._guard(self._wal.write, [body], self._checkpoint, self.last_index + 1)
            self._recovered = None
            del self._terms[: upto - self._purged.index]
            self._purged = purged
            deleted = self._guard(self._wal.delete_through, upto)
            log.debug("purged up to %s, deleted %d segments", purged, deleted)

    def close(self) -> None:
        """Close the WAL and release the dir lock. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._recovered = None
            self._wal.close()
            self._lock.release()

    def __enter__(self) -> RaftStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RaftStorage({str(self.root)!r}, purged={self._purged}, last={self.last_index},"
            f" snapshot={self._snapshot_id})"
        )

    # ------------------------------------------------------------------ helpers
    def _checkpoint(self) -> list[bytes]:
        return wal.checkpoint_bodies(self._hard_state, self._purged, self._snapshot_id)

    def _is_old(self, sid: LogId) -> bool:
        return self._snapshot_id is not None and sid.index <= self._snapshot_id.index

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the snapshots' file system."""
        vfs = os.statvfs(self._snapshot_dir)
        return vfs.f_bavail * vfs.f_frsize

    def _write_snapshot_file(self, snapshot: Snapshot) -> None:
        _, written = snapshots.write_snapshot(self._snapshot_dir, snapshot)
        self._stats.snapshots_written += 1
        self._stats.snapshot_bytes_written += written
        self._stats.dir_fsyncs += 1

    def _remove_older_snapshots(self, keep: LogId) -> None:
        try:
            snapshots.remove_older(self._snapshot_dir, keep)
        except OSError as exc:  # garbage left behind is removed at the next open
            log.warning("%s: cannot remove old snapshots: %s", self._snapshot_dir, exc)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        if self._broken is not None:
            raise FatalError(
                f"storage {self.root} is unusable after an earlier failure: {self._broken}"
            )

    def _guard(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a write; a `FatalError` poisons the store."""
        try:
            return fn(*args, **kwargs)
        except FatalError as exc:
            name = getattr(fn, "__name__", "write")
            self._stats.write_failures[name] = self._stats.write_failures.get(name, 0) + 1
            self._broken = str(exc)
            log.error("%s", exc)
            raise


_CONFIG_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
)


def _open_error(root: Path, what: str, exc: OSError) -> ConfigError | FatalError:
    """An OS error while opening: the operator's to fix (permissions, a read-only or
    wrong path: `ConfigError`), or the disk's (I/O errors: `FatalError`)."""
    where = f"{exc.filename}: " if exc.filename else ""
    message = f"raft_dir {str(root)!r} {what}: {where}{describe_os_error(exc)}"
    return ConfigError(message) if exc.errno in _CONFIG_ERRNOS else FatalError(message)


def _check_entries(entries: Sequence[Entry], purged: LogId, last: int) -> None:
    first = entries[0].index
    for i, e in enumerate(entries):
        if e.index != first + i:
            raise ValueError(f"entries are not contiguous: {entries[i - 1]} then {e}")
    if first > last + 1:
        raise ValueError(f"entries start at {first}, after a gap: the last entry is {last}")
    if first <= purged.index:
        raise ValueError(f"entries start at {first}, at or before the purge point {purged}")
