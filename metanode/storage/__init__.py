"""The durable store of one node (contract §8, design §5): WAL, snapshots, node meta.

Blocking code, no trio: the runtime calls it through `trio.to_thread.run_sync`.

On-disk layout of ``raft_dir`` (all integers little-endian)::

    raft_dir/
      LOCK                         flock'ed while a process has the dir open; holds its pid
      meta                         NodeMeta: b"MNMETA\\x00\\x01" + one record
      wal/
        00000000000000000001.wal   segments, named by a 20-digit number (the first
        00000000000000001733.wal   entry index they were opened for; increasing)
      snapshot/
        snap-<term>-<index>.bin    the latest snapshot: b"MNSNAP\\x00\\x01" + one record
                                   (SnapshotMeta) + [u64 len][u32 crc32] + data

A record is ``[u32 length][u32 crc32][msgpack body]`` (`records.py`). WAL record kinds
(`wal.py`): HEADER, ENTRIES (a contiguous batch; a batch starting at or before the last
index replaces the suffix), HARD_STATE, PURGED, INSTALL (a snapshot from the leader:
the log is reset to it), SNAPSHOT (a local snapshot became the latest). Each segment
starts with HEADER and a checkpoint (HARD_STATE, PURGED, SNAPSHOT) so that whole
segments behind the purge point can be deleted.

Durability: one ``writev`` + one ``fdatasync`` of the WAL per `RaftStorage.append`
(group commit: one call per `Ready`); files are replaced through a temporary file,
fsync, rename and a directory fsync. Recovery: a torn record at the tail of the last
segment is cut off (warning); any other damage, a missing or damaged snapshot, or a
gap in the log raises `FatalError` naming the file (and the byte offset).

Modules: `store` (`RaftStorage`), `wal` (segments, record kinds, replay), `snapshots`
(snapshot files), `meta` (`NodeMeta`), `records` (framing), `fsutil` (syncs, atomic
replace, the dir lock), `stats` (`StorageStats`). Reference: docs/reference/data-dir.md.
"""

from metanode.storage.meta import NodeMeta
from metanode.storage.stats import StorageStats
from metanode.storage.store import DEFAULT_SEGMENT_BYTES, RaftStorage

__all__ = ["DEFAULT_SEGMENT_BYTES", "NodeMeta", "RaftStorage", "StorageStats"]
