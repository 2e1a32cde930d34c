"""Counters and sizes of one store, for metrics (`RaftStorage.stats` returns a copy)."""

from __future__ import annotations

import attrs


@attrs.define
class StorageStats:
    """Counters (since open) and current sizes of a `RaftStorage`."""

    appends: int = 0  # append() calls that wrote something
    entries_appended: int = 0
    wal_bytes_written: int = 0
    wal_fsyncs: int = 0  # fdatasync of a WAL segment: one per append, purge, snapshot record
    dir_fsyncs: int = 0  # directory syncs (new or deleted segments, renamed files)
    snapshots_written: int = 0  # snapshot files (local and installed)
    snapshot_bytes_written: int = 0
    meta_writes: int = 0
    segments: int = 0  # current number of WAL segment files
    segments_deleted: int = 0
    wal_bytes: int = 0  # current size of the WAL on disk
    torn_bytes_cut: int = 0  # at open: the torn tail cut off the last segment
    recovery_seconds: float = 0.0  # how long open() took to replay the data dir
    write_failures: dict[str, int] = attrs.Factory(dict)  # failed writes, by the function
