"""Snapshot files: ``raft_dir/snapshot/snap-<term>-<index>.bin``.

File format (all integers little-endian):

    b"MNSNAP\\x00\\x01"                 8-byte magic, the last byte the format version
    [u32 length][u32 crc32][body]       one record (`records.py`): the `SnapshotMeta`
                                        (last_log_id and membership) in the wire codec
    [u64 data length][u32 crc32(data)]  then the state machine's snapshot bytes
    data

A snapshot is written to ``snap-<term>-<index>.bin.<random>.tmp`` in the same
directory, fsynced, renamed to its final name, and the directory fsynced: a file
with a final name is always complete. Which file is current is recorded in the WAL
(`wal.py`), after the file is durable; older files are removed only after that
record is durable too. Files the WAL does not reference (a crash between the two
steps) and temporary files are removed when the store is opened.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import struct
import zlib
from pathlib import Path

from metanode import wire
from metanode.errors import FatalError
from metanode.raft.types import LogId, Snapshot, SnapshotMeta
from metanode.storage import records
from metanode.storage.fsutil import describe_os_error, write_file_atomic

log = logging.getLogger("metanode.storage")

MAGIC = b"MNSNAP\x00\x01"
DATA_HEADER = struct.Struct("<QI")
_NAME = re.compile(r"snap-(\d+)-(\d+)\.bin")


def file_name(log_id: LogId) -> str:
    """``snap-<term>-<index>.bin``."""
    return f"snap-{log_id.term}-{log_id.index}.bin"


def write_snapshot(directory: Path, snapshot: Snapshot) -> tuple[Path, int]:
    """Write `snapshot` durably under its final name; returns (path, bytes written).

    Raises `FatalError` naming the file when it cannot be written.
    """
    last = snapshot.meta.last_log_id
    path = directory / file_name(last)
    tmp = directory / f"{path.name}.{secrets.token_hex(4)}.tmp"
    meta = records.frame([wire.encode(snapshot.meta)])
    data = snapshot.data
    if isinstance(data, Parts):
        crc = 0
        for part in data.parts:
            crc = zlib.crc32(part, crc)
        chunks = data.parts
    else:
        crc, chunks = zlib.crc32(data), [data]
    head = MAGIC + meta + DATA_HEADER.pack(len(data), crc)
    try:
        written = write_file_atomic(path, [head, *chunks], tmp)
    except OSError as exc:
        raise FatalError(f"{path}: cannot write snapshot: {describe_os_error(exc)}") from exc
    return path, written


class Parts:
    """Snapshot data as the pieces it was packed in, written one after the other
    (never joined into one bytes object: joining 126 MB holds the interpreter ~0.2 s)."""

    __slots__ = ("parts", "_size")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self._size = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self._size


class MappedData:
    """A snapshot file's data, memory-mapped: `len()` and slices (bytes), as the raft
    core uses a snapshot's data to send it in chunks, without holding it in the heap
    (the pages are the page cache's, read when a chunk is sent). The mapping stays
    valid after the file is removed."""

    __slots__ = ("_mm", "_offset", "_size")

    def __init__(self, mm: mmap.mmap, offset: int, size: int) -> None:
        self._mm = mm
        self._offset = offset
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: slice) -> bytes:
        if not isinstance(index, slice):
            raise TypeError("snapshot data is read in slices")
        start, stop, step = index.indices(self._size)
        if step != 1:
            raise ValueError("snapshot data slices are contiguous")
        return self._mm[self._offset + start : self._offset + max(start, stop)]

    def __bytes__(self) -> bytes:
        return self[:]


def map_snapshot(directory: Path, expect: LogId, meta: SnapshotMeta) -> Snapshot:
    """`expect`'s snapshot with its data memory-mapped from its file (checked when it
    was read or written); `FatalError` naming the file if it cannot be mapped."""
    path = directory / file_name(expect)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + records.HEADER_SIZE)
            length, _ = records.HEADER.unpack_from(head, len(MAGIC))
            f.seek(len(MAGIC) + records.HEADER_SIZE + length)
            size, _ = DATA_HEADER.unpack(f.read(DATA_HEADER.size))
            offset = len(MAGIC) + records.HEADER_SIZE + length + DATA_HEADER.size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, struct.error) as exc:
        raise FatalError(f"{path}: cannot map snapshot {expect}: {exc}") from exc
    if offset + size > len(mm):
        mm.close()
        raise FatalError(f"{path}: corrupt snapshot: the file ends before its data")
    return Snapshot(meta, MappedData(mm, offset, size))  # type: ignore[arg-type]


def read_snapshot(directory: Path, expect: LogId) -> Snapshot:
    """The snapshot `expect` from its file, every checksum verified.

    Raises `FatalError` naming the file when it is missing, damaged, or holds
    another snapshot than its name says.
    """
    path = directory / file_name(expect)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + records.HEADER_SIZE)
            if head[: len(MAGIC)] != MAGIC:
                raise FatalError(f"{path}: not a metanode snapshot file (bad magic {head[:8]!r})")
            if len(head) < len(MAGIC) + records.HEADER_SIZE:
                raise FatalError(f"{path}: corrupt snapshot: the file ends in its header")
            length, _ = records.HEADER.unpack_from(head, len(MAGIC))
            rest = f.read(length + DATA_HEADER.size)
            found, damage = records.split(head[len(MAGIC) :] + rest[:length])
            if damage is not None or len(found) != 1:
                reason = damage.reason if damage else "bad meta record"
                raise FatalError(
                    f"{path}: corrupt snapshot meta at byte offset {len(MAGIC)}: {reason}"
                )
            offset = len(MAGIC) + records.HEADER_SIZE + length
            if len(rest) < length + DATA_HEADER.size:
                raise FatalError(f"{path}: corrupt snapshot: the file ends at byte {offset}")
            size, crc = DATA_HEADER.unpack_from(rest, length)
            offset += DATA_HEADER.size
            data = f.read(size)
            if len(data) != size or f.read(1):
                raise FatalError(
                    f"{path}: corrupt snapshot: {size} data bytes expected at byte offset"
                    f" {offset}, the file holds {len(data)}{' and more' if data else ''}"
                )
    except FileNotFoundError as exc:
        raise FatalError(f"{path}: snapshot {expect} is missing") from exc
    except OSError as exc:
        raise FatalError(f"{path}: cannot read snapshot: {describe_os_error(exc)}") from exc
    if zlib.crc32(data) != crc:
        raise FatalError(
            f"{path}: corrupt snapshot: data checksum mismatch at byte offset {offset}"
        )
    try:
        meta = wire.decode(bytes(found[0][1]), SnapshotMeta)
    except wire.DecodeError as exc:
        raise FatalError(f"{path}: corrupt snapshot meta: {exc}") from exc
    if meta.last_log_id != expect:
        raise FatalError(f"{path}: holds snapshot {meta.last_log_id}, expected {expect}")
    return Snapshot(meta, data)


def list_files(directory: Path) -> tuple[dict[LogId, Path], list[Path]]:
    """Snapshot files by log id, and everything else in `directory` (temporary files)."""
    snaps: dict[LogId, Path] = {}
    others: list[Path] = []
    for entry in os.scandir(directory):
        m = _NAME.fullmatch(entry.name)
        if m:
            snaps[LogId(int(m[1]), int(m[2]))] = Path(entry.path)
        else:
            others.append(Path(entry.path))
    return snaps, others


def remove_older(directory: Path, keep: LogId) -> int:
    """Remove the snapshot files older than `keep` (the current one, durable and
    recorded); returns how many. Temporary files of writes in progress stay."""
    snaps, _ = list_files(directory)
    removed = 0
    for log_id, path in snaps.items():
        if log_id.index < keep.index:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def remove_unreferenced(directory: Path, keep: LogId | None) -> None:
    """At open: remove every file of `directory` but the current snapshot `keep`
    (older snapshots, newer ones the WAL never recorded, temporary files)."""
    snaps, others = list_files(directory)
    for log_id, path in snaps.items():
        if log_id != keep:
            log.info("removing unreferenced snapshot file %s", path)
            path.unlink()
    for path in others:
        if path.name.endswith(".tmp"):
            log.info("removing temporary file %s", path)
            path.unlink()
        else:
            log.warning("unexpected file in the snapshot directory: %s", path)
