"""The write-ahead log: segments ``raft_dir/wal/<number>.wal`` of checksummed records.

Segment files
-------------
A segment is named by a 20-digit zero-padded number: the index of the first entry
the segment was opened for (last index + 1 at the time), raised if needed to stay
above the previous segment's number (a conflicting truncate can move the last index
back), so that name order is creation order. Its records (`records.py`) are msgpack
arrays whose first element is the record kind:

    [0, version, number]            HEADER: first record of every segment
    [1, first_index, [item, ...]]   ENTRIES: entries first_index, first_index+1, ...;
                                    item = [term, kind, data] or, for a MEMBERSHIP
                                    entry, [term, 2, data, membership]. A batch whose
                                    first index is at or below the last one replaces
                                    the stored suffix from there (conflicting truncate)
    [2, term, vote | nil, commit]   HARD_STATE
    [3, term, index]                PURGED: entries up to this log id are dropped
    [4, term, index]                INSTALL: snapshot snap-<term>-<index>.bin came from
                                    the leader: the log is reset to it
    [5, term, index]                SNAPSHOT: snap-<term>-<index>.bin is the latest
                                    snapshot (built locally)

A new segment starts, in the same write as its HEADER, with a checkpoint: the
current HARD_STATE, PURGED and (if any) SNAPSHOT. So every segment but the first
restates what the older ones established, and older segments can be deleted once
all their entries are purged (`WalWriter.delete_through`). A segment is sealed (a new
one started) by the first write that finds it holding `segment_bytes` or more.

Preallocated space. The last segment may go on past its last record with zero
bytes: the writer reserves the space ahead of its appends, up to the next multiple of
PREALLOC_BYTES and never past `segment_bytes` (`posix_fallocate`), so that an append
does not change the file's size and its `fdatasync` has no size to record (the
figures: docs/reference/data-dir.md). A record length is never 0, so a zero header (or
a partial one) followed only by zero bytes is where the records end. A segment is
sealed tight and durable: before the next one starts, anything past its records is
cut and its last write synced (it may have been a write without a sync).

Replay and recovery (contract §8)
-----------------------------
`replay` reads the segments in order and applies each record to a `WalState`; in
the last segment, zero bytes after the last record are preallocated space (above).
The last segment may end in a torn write: a record cut short, or failing its
checksum, with no intact record after it; or with intact records after it when a
512-byte sector between them reads as zeros (of preallocated space, a sector of the
write may reach the disk before an earlier one: the records after a write that was
never synced were never synced either). That tail is cut off (`WalWriter.open`,
warning).
Anything else is `FatalError` naming the file and the byte offset: a damaged record
in a sealed segment, a damaged record followed by intact ones, a record that passes
its checksum but cannot be decoded, a segment without its HEADER, a gap in the log.

Blocking code, no trio: the runtime calls it through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from metanode import wire
from metanode.errors import FatalError
from metanode.raft.types import ZERO_LOG_ID, Entry, EntryKind, HardState, LogId, Membership
from metanode.storage import records
from metanode.storage.fsutil import describe_os_error, fdatasync, fsync_dir, write_parts
from metanode.storage.stats import StorageStats

log = logging.getLogger("metanode.storage")

FORMAT_VERSION = 1
SUFFIX = ".wal"
_SEGMENT_NAME = re.compile(r"(\d{20})\.wal")
#: The writer reserves file space this many bytes at a time (module doc).
PREALLOC_BYTES = 4 << 20
# Every body is a msgpack fixarray of 3 or 4 items whose first item is the kind 0..5:
# what `records.find_intact` looks for when it checks for intact records after damage.
_BODY_START = re.compile(rb"[\x93\x94][\x00-\x05]")


class Kind(enum.IntEnum):
    HEADER = 0
    ENTRIES = 1
    HARD_STATE = 2
    PURGED = 3
    INSTALL = 4
    SNAPSHOT = 5


_ENTRY_KINDS = {k.value: k for k in EntryKind}


def segment_path(wal_dir: Path, number: int) -> Path:
    return wal_dir / f"{number:020d}{SUFFIX}"


# ------------------------------------------------------------------------ encoding


def encode_header(number: int) -> bytes:
    return wire.pack((Kind.HEADER, FORMAT_VERSION, number))


def encode_entries(entries: Sequence[Entry]) -> bytes:
    """One ENTRIES body for contiguous `entries` (checked by the caller)."""
    items: list[tuple[object, ...]] = []
    add = items.append
    for e in entries:
        if e.membership is None:
            add((e.term, e.kind, e.data))
        else:
            add((e.term, e.kind, e.data, wire.unstructure(e.membership, Membership)))
    return wire.pack((Kind.ENTRIES, entries[0].index, items))


def encode_hard_state(hs: HardState) -> bytes:
    return wire.pack((Kind.HARD_STATE, hs.term, hs.vote, hs.commit))


def encode_log_id(kind: Kind, log_id: LogId) -> bytes:
    """A PURGED, INSTALL or SNAPSHOT body."""
    return wire.pack((kind, log_id.term, log_id.index))


def checkpoint_bodies(hs: HardState, purged: LogId, snapshot: LogId | None) -> list[bytes]:
    """The records that open a segment after its HEADER: the state so far."""
    bodies = [encode_hard_state(hs), encode_log_id(Kind.PURGED, purged)]
    if snapshot is not None:
        bodies.append(encode_log_id(Kind.SNAPSHOT, snapshot))
    return bodies


def _decode_entries(wal_dir: Path, first: int, items: list[list[object]]) -> list[Entry]:
    """`Entry` objects of the raw ENTRIES items `items` (index `first` on)."""
    out: list[Entry] = []
    add = out.append
    kinds = _ENTRY_KINDS
    membership_kind = EntryKind.MEMBERSHIP
    index = first
    try:
        for item in items:
            if len(item) == 3:
                term, kind, data = item
                k = kinds[kind]  # type: ignore[index]
                if k is membership_kind or type(term) is not int or type(data) is not bytes:
                    raise ValueError(f"bad entry {item!r}"[:200])
                add(Entry(term, index, k, data))
            else:
                term, kind, data, m = item
                if kind != membership_kind or type(term) is not int or type(data) is not bytes:
                    raise ValueError(f"bad membership entry {item!r}"[:200])
                add(Entry(term, index, membership_kind, data, wire.structure(m, Membership)))
            index += 1
    except (ValueError, TypeError, KeyError, wire.DecodeError) as exc:
        raise FatalError(f"{wal_dir}: undecodable entry {index}: {exc}") from exc
    return out


# ------------------------------------------------------------------------ segments


@attrs.define
class Segment:
    """One segment file as the store tracks it."""

    number: int
    path: Path
    size: int = 0  # bytes of intact records
    max_live: int = 0  # highest index of an entry in it that is still in the log
    records: int = 0  # intact records
    checkpointed: bool = False  # holds HEADER + HARD_STATE + PURGED


def list_segments(wal_dir: Path) -> list[Segment]:
    """The segment files of `wal_dir`, oldest first; other files are warned about."""
    segments = []
    for entry in os.scandir(wal_dir):
        m = _SEGMENT_NAME.fullmatch(entry.name)
        if m:
            segments.append(Segment(int(m[1]), Path(entry.path)))
        else:
            log.warning("unexpected file in the WAL directory: %s", entry.path)
    segments.sort(key=lambda s: s.number)
    return segments


# ------------------------------------------------------------------------ replay


@attrs.define
class WalState:
    """What the records replayed so far say.

    Entries are held as the raw items of their records (`items[i]` is entry
    `start + i`, contiguous) and turned into `Entry` objects by `finish()`, only for
    those that survive: most of a long segment is usually purged by later records.
    """

    hard_state: HardState = HardState()
    purged: LogId = ZERO_LOG_ID
    snapshot: LogId | None = None
    start: int = 1
    items: list[list[object]] = attrs.Factory(list)
    entries: list[Entry] = attrs.Factory(list)  # set by finish()
    # Where the batch holding items[0] was written, for the message about a gap.
    start_at: tuple[Path, int] | None = None

    @property
    def last_index(self) -> int:
        """After `finish()`."""
        return self.entries[-1].index if self.entries else self.purged.index

    def add_entries(self, first: int, batch: list[list[object]], where: tuple[Path, int]) -> bool:
        """Apply an ENTRIES record; True when it replaced entries we held (from
        `first` on: a conflicting truncate)."""
        items = self.items
        if not batch:
            raise ValueError("empty entries record")
        if items:
            start = self.start
            end = start + len(items)  # one past the last
            if first == end:  # the common case: a plain append
                items.extend(batch)
                return False
            if start <= first < end:
                del items[first - start :]
                items.extend(batch)
                return True
        # The first batch seen, a rewrite from before the first entry we hold, or a
        # jump. The entries before it are in deleted segments (then a later PURGED
        # covers them) or lost (a gap: `finish` says so).
        replaced = bool(items) and first < self.start
        self.items = batch
        self.start = first
        self.start_at = where
        return replaced

    def purge(self, upto: LogId) -> None:
        if upto.index > self.purged.index:
            self.purged = upto
        self._trim()

    def install(self, snapshot: LogId) -> None:
        self.purged = snapshot
        self.items = []
        self.snapshot = snapshot

    def note_snapshot(self, snapshot: LogId) -> None:
        if self.snapshot is None or snapshot.index > self.snapshot.index:
            self.snapshot = snapshot

    def _trim(self) -> None:
        items = self.items
        cut = self.purged.index - self.start + 1
        if items and cut > 0:
            del items[:cut]
            self.start += cut

    def finish(self, wal_dir: Path) -> None:
        """Drop what is purged, build the entries; a gap between the purge point and
        the entries is fatal."""
        self._trim()
        if self.items and self.start != self.purged.index + 1:
            path, offset = self.start_at or (wal_dir, 0)
            raise FatalError(
                f"{path}: the log has a gap: entries {self.purged.index + 1}.."
                f"{self.start - 1} are missing before the record at byte offset {offset}"
            )
        self.entries = _decode_entries(wal_dir, self.start, self.items)
        self.items = []


@attrs.define
class Replayed:
    state: WalState
    segments: list[Segment]
    torn: records.Damage | None = None  # in the last segment
    torn_bytes: int = 0  # of the torn write (not the preallocated zeros after it)


# Plain ints: comparing with IntEnum members costs an attribute lookup per record.
_HEADER, _ENTRIES, _HARD_STATE, _PURGED, _INSTALL, _SNAPSHOT = (int(k) for k in Kind)


def _replay_segment(
    state: WalState, segments: list[Segment], seg: Segment, found: list[tuple[int, memoryview]]
) -> None:
    """Apply the intact records of `seg` to `state`, in order."""
    unpack = wire.unpack
    hard_state: tuple[int, list[object]] | None = None  # built once, at the end
    for offset, body in found:
        try:
            rec: list[object] = unpack(body)  # type: ignore[arg-type]
            kind = rec[0]
            if seg.records == 0:
                _check_header(seg, rec)
            elif kind == _ENTRIES:
                _, first, items = rec
                if type(first) is not int or first < 1 or type(items) is not list:
                    raise ValueError(f"bad entries record header {first!r}")
                if state.add_entries(first, items, (seg.path, offset)):  # type: ignore[arg-type]
                    _floor(segments, first - 1)  # type: ignore[operator]
                last = first + len(items) - 1  # type: ignore[operator, arg-type]
                if last > seg.max_live:
                    seg.max_live = last
            elif kind == _HARD_STATE:
                if len(rec) != 4:
                    raise ValueError(f"bad hard state {rec[1:]!r}")
                hard_state = (offset, rec)
            elif kind == _PURGED:
                state.purge(_log_id(rec))
                if seg.records == 2:  # HEADER, HARD_STATE, PURGED: the checkpoint is whole
                    seg.checkpointed = True
            elif kind == _INSTALL:
                snap = _log_id(rec)
                state.install(snap)
                _floor(segments, snap.index)
            elif kind == _SNAPSHOT:
                state.note_snapshot(_log_id(rec))
            elif kind == _HEADER:
                raise ValueError("a header after the start of the segment")
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except (ValueError, TypeError, KeyError, IndexError, wire.DecodeError) as exc:
            raise _undecodable(seg, offset, exc) from exc
        seg.records += 1
    if hard_state is not None:
        offset, rec = hard_state
        try:
            state.hard_state = wire.structure(
                {"term": rec[1], "vote": rec[2], "commit": rec[3]}, HardState
            )
        except wire.DecodeError as exc:
            raise _undecodable(seg, offset, exc) from exc


def _undecodable(seg: Segment, offset: int, exc: Exception) -> FatalError:
    return FatalError(f"{seg.path}: undecodable record at byte offset {offset}: {exc}")


def _log_id(rec: list[object]) -> LogId:
    _, term, index = rec
    if type(term) is not int or type(index) is not int or term < 0 or index < 0:
        raise ValueError(f"bad log id {rec[1:]!r}")
    return LogId(term, index)


def _check_header(seg: Segment, rec: list[object]) -> None:
    if rec[0] != _HEADER:
        raise FatalError(f"{seg.path}: the segment does not start with a header")
    _, version, number = rec
    if version != FORMAT_VERSION:
        raise FatalError(
            f"{seg.path}: WAL format version {version} is not supported"
            f" (this metanode reads version {FORMAT_VERSION})"
        )
    if number != seg.number:
        raise FatalError(f"{seg.path}: the header says segment {number}")


def _floor(segments: list[Segment], index: int) -> None:
    """Entries above `index` in these segments left the log (truncated or reset)."""
    for s in segments:
        if s.max_live > index:
            s.max_live = index


def replay(wal_dir: Path) -> Replayed:
    """Read every segment of `wal_dir`, oldest first, into a `WalState`.

    Read only: a torn tail of the last segment is reported in `Replayed.torn`, not cut.
    Raises `FatalError` (file and byte offset) for damage that is not a torn tail,
    `OSError` when a file cannot be read.
    """
    state = WalState()
    segments = list_segments(wal_dir)
    result = Replayed(state, segments)
    for i, seg in enumerate(segments):
        is_last = i == len(segments) - 1
        buf = seg.path.read_bytes()
        if is_last:
            found, damage, end = split_segment(buf)
        else:  # sealed tight (module doc): zeros there are damage
            found, damage = records.split(buf)
            end = len(buf)
        if damage is not None:
            where = f"{seg.path}: corrupt record at byte offset {damage.offset}: {damage.reason}"
            if not is_last:
                raise FatalError(f"{where} (in a sealed segment)")
            intact = records.find_intact(buf, damage.offset, _BODY_START)
            if intact is not None and not _lost_sector(buf, damage.offset, intact):
                raise FatalError(f"{where}, followed by an intact record at byte offset {intact}")
            result.torn = damage
            # Up to its last byte that is not zero: what follows is preallocated space.
            result.torn_bytes = len(buf.rstrip(b"\0")) - damage.offset
        elif not found and not is_last:
            raise FatalError(f"{seg.path}: empty sealed segment")
        seg.size = end
        _replay_segment(state, segments, seg, found)
    state.finish(wal_dir)
    return result


SECTOR = 512  # the unit a disk writes whole


def _lost_sector(buf: bytes, start: int, stop: int) -> bool:
    """Does a sector-aligned piece of `buf[start:stop]` (the first and last clipped)
    read as zeros: a sector of a write into preallocated space that never landed?"""
    pos = start
    while pos < stop:
        nxt = min((pos // SECTOR + 1) * SECTOR, stop)
        if buf.count(0, pos, nxt) == nxt - pos:
            return True
        pos = nxt
    return False


def split_segment(buf: bytes) -> tuple[list[tuple[int, memoryview]], records.Damage | None, int]:
    """The intact records of the last segment's bytes (`records.split`), the damage
    that stopped them (None when they end cleanly) and where they end: zero bytes
    after the last record are preallocated space (or a write none of which landed)."""
    found, damage = records.split(buf)
    if damage is None:
        return found, None, len(buf)
    if buf.count(0, damage.offset) == len(buf) - damage.offset:
        return found, None, damage.offset
    return found, damage, damage.offset


# ------------------------------------------------------------------------ writing


class WalWriter:
    """Appends records to the last segment, one `writev` and one `fdatasync` per call,
    at the end of its records (space past it is preallocated: module doc)."""

    def __init__(
        self, wal_dir: Path, segments: list[Segment], segment_bytes: int, stats: StorageStats
    ) -> None:
        self.dir = wal_dir
        self.segments = segments
        self.segment_bytes = segment_bytes
        self.stats = stats
        seg = segments[-1]
        fd = os.open(seg.path, os.O_WRONLY)
        try:
            self._allocated = os.fstat(fd).st_size  # the file's size: records, then zeros
            os.lseek(fd, seg.size, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._prealloc_warned = False
        # The last write had no fdatasync (unknown after a restart: say so, and the
        # first seal syncs once).
        self._unsynced = True
        self._update_stats()

    @classmethod
    def open(
        cls,
        wal_dir: Path,
        replayed: Replayed,
        checkpoint: list[bytes],
        first_hint: int,
        segment_bytes: int,
        stats: StorageStats,
    ) -> WalWriter:
        """Make the replayed WAL ready for appends: cut a torn tail, give the last
        segment a checkpoint if it lacks one, create the first segment of an empty
        dir. Raises `OSError`."""
        segments = replayed.segments
        torn = replayed.torn
        if torn is not None:
            log.warning(
                "%s: cutting a torn record at byte offset %d (%d bytes): %s",
                segments[-1].path,
                torn.offset,
                replayed.torn_bytes,
                torn.reason,
            )
            stats.torn_bytes_cut += replayed.torn_bytes
        dir_changed = False
        if segments and segments[-1].records == 0:
            # Nothing of its first write survived: as if it was never created.
            last = segments.pop()
            log.warning("%s: removing a segment with no intact record", last.path)
            last.path.unlink()
            first_hint = max(first_hint, last.number)
            dir_changed = True
            torn = None
        if segments and (torn is not None or not segments[-1].checkpointed):
            last = segments[-1]
            fd = os.open(last.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, last.size)
                os.lseek(fd, last.size, os.SEEK_SET)
                # The state so far, again: older segments may be deleted later.
                last.size += write_parts(fd, records.frame_parts(checkpoint))
                last.checkpointed = True
                fdatasync(fd)
            finally:
                os.close(fd)
        if dir_changed:
            fsync_dir(wal_dir)
        if not segments:
            number = max(first_hint, 1)
            path = segment_path(wal_dir, number)
            parts = records.frame_parts([encode_header(number), *checkpoint])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                size = write_parts(fd, parts)
                fdatasync(fd)
            finally:
                os.close(fd)
            fsync_dir(wal_dir)
            segments.append(Segment(number, path, size, records=3, checkpointed=True))
        return cls(wal_dir, segments, segment_bytes, stats)

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    def write(
        self, bodies: list[bytes], checkpoint: Callable[[], list[bytes]], first_hint: int,
        sync: bool = True,
    ) -> None:
        """Append the records `bodies` durably: one write, one fdatasync (none when
        `sync` is false: the records become durable with the next synced write).

        When the active segment holds `segment_bytes` or more, the records go to a
        new segment (numbered at least `first_hint`) after its header and
        `checkpoint()`, the state before these records; the directory is fsynced
        too then. Raises `FatalError` naming the file if the write or sync fails.
        """
        if self._fd is None:
            raise ValueError("the WAL is closed")
        parts = records.frame_parts(bodies)
        seg = self.active
        if seg.size >= self.segment_bytes:
            self._roll(parts, checkpoint(), first_hint)
            return
        self._reserve(self._fd, seg, sum(map(len, parts)))
        try:
            n = write_parts(self._fd, parts)
            if sync:
                fdatasync(self._fd)
        except OSError as exc:
            raise FatalError(
                f"{seg.path}: cannot append to the WAL: {describe_os_error(exc)}"
            ) from exc
        seg.size += n
        self._unsynced = not sync
        if seg.size > self._allocated:  # (the reservation failed or stopped at segment_bytes)
            self._allocated = seg.size
        seg.records += len(bodies)
        self.stats.wal_bytes_written += n
        if sync:
            self.stats.wal_fsyncs += 1
        self.stats.wal_bytes += n

    def _roll(self, parts: list[bytes], checkpoint: list[bytes], first_hint: int) -> None:
        old = self.active
        self._seal(old)
        number = max(first_hint, old.number + 1)
        path = segment_path(self.dir, number)
        head = records.frame_parts([encode_header(number), *checkpoint])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise FatalError(
                f"{path}: cannot create a WAL segment: {describe_os_error(exc)}"
            ) from exc
        self._allocated = 0
        self._prealloc_warned = False
        try:
            self._reserve(fd, Segment(number, path), sum(map(len, head + parts)))
            n = write_parts(fd, head + parts)
            fdatasync(fd)
            fsync_dir(self.dir)
        except OSError as exc:
            os.close(fd)
            raise FatalError(
                f"{path}: cannot write a new WAL segment: {describe_os_error(exc)}"
            ) from exc
        assert self._fd is not None
        os.close(self._fd)
        self._fd = fd
        self.segments.append(
            Segment(number, path, n, records=len(head) // 2 + len(parts) // 2, checkpointed=True)
        )
        self._allocated = max(self._allocated, n)
        log.debug("started WAL segment %s", path)
        self.stats.wal_bytes_written += n
        self.stats.wal_fsyncs += 1
        self.stats.dir_fsyncs += 1
        self._update_stats()

    def _seal(self, seg: Segment) -> None:
        """Before the next segment starts: `seg` ends at its records (the file is
        longer only when `segment_bytes` was lowered since its space was reserved)
        and its last write is durable (a write without a sync may have pushed it
        over `segment_bytes`)."""
        assert self._fd is not None
        try:
            cut = os.fstat(self._fd).st_size > seg.size  # the file, not our bookkeeping
            if not (cut or self._unsynced):
                return
            if cut:
                os.ftruncate(self._fd, seg.size)
            fdatasync(self._fd)
        except OSError as exc:
            raise FatalError(f"{seg.path}: cannot seal the WAL segment: {describe_os_error(exc)}") from exc
        self._allocated = seg.size
        self._unsynced = False
        self.stats.wal_fsyncs += 1

    def _reserve(self, fd: int, seg: Segment, n: int) -> None:
        """Make room for `n` more bytes after `seg`'s records without growing the file
        at the write: up to the next multiple of PREALLOC_BYTES past them, at most
        `segment_bytes` (a write past that grows the file itself). If the file
        system refuses (full, or no such call), appends grow the file as they go:
        slower syncs, said once per segment."""
        need = seg.size + n
        if need <= self._allocated:
            return
        end = min((need // PREALLOC_BYTES + 1) * PREALLOC_BYTES, self.segment_bytes)
        if end < need:
            return
        try:
            os.posix_fallocate(fd, self._allocated, end - self._allocated)
        except OSError as exc:
            if not self._prealloc_warned:
                self._prealloc_warned = True
                log.warning(
                    "%s: cannot preallocate WAL space (%s): appends grow the file",
                    seg.path, describe_os_error(exc),
                )
            return
        self._allocated = end

    def note_entries(self, first: int, last: int, prev_last: int) -> None:
        """Entries first..last were appended (replacing any from `first` on)."""
        if first <= prev_last:
            _floor(self.segments, first - 1)
        seg = self.active
        seg.max_live = max(seg.max_live, last)

    def note_reset(self, index: int) -> None:
        """The log was reset to a snapshot at `index`: older entries left it."""
        _floor(self.segments, index)

    def delete_through(self, upto: int) -> int:
        """Delete the oldest segments while every live entry in them is <= `upto`
        (the active segment always stays); returns how many. Call only once a
        PURGED record covering `upto` is durable."""
        deleted = 0
        while len(self.segments) > 1 and self.segments[0].max_live <= upto:
            seg = self.segments.pop(0)
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.segments.insert(0, seg)
                raise FatalError(f"{seg.path}: cannot delete: {describe_os_error(exc)}") from exc
            log.debug("deleted WAL segment %s", seg.path)
            deleted += 1
        if deleted:
            try:
                fsync_dir(self.dir)
            except OSError as exc:
                raise FatalError(f"{self.dir}: cannot sync: {describe_os_error(exc)}") from exc
            self.stats.dir_fsyncs += 1
            self.stats.segments_deleted += deleted
            self._update_stats()
        return deleted

    def _update_stats(self) -> None:
        self.stats.segments = len(self.segments)
        self.stats.wal_bytes = sum(s.size for s in self.segments)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
