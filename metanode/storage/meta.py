"""`raft_dir/meta`: who this node is (`NodeMeta`), checksummed and replaced atomically.

File format: the 8-byte magic ``MNMETA\\x00\\x01`` (the last byte is the format
version), then one record (`records.py`) whose body is `NodeMeta` in the wire codec
(a msgpack map ``{"node_id": 1, "cluster_id": "...", "cluster_name": "...",
"joined_at": 12}``; ``joined_at`` is absent or nil in files of older versions), and
nothing after it. Written to ``meta.tmp``, fsynced, renamed, directory fsynced: the
file is either the old or the new version, so any damage is real corruption and
stops the node (`FatalError` naming the file).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import attrs

from metanode import wire
from metanode.errors import FatalError
from metanode.storage import records
from metanode.storage.fsutil import describe_os_error, write_file_atomic

MAGIC = b"MNMETA\x00\x01"
FILE_NAME = "meta"


def _check(meta: NodeMeta) -> None:
    if meta.node_id < 0:
        raise ValueError(f"node_id must not be negative, got {meta.node_id}")


@attrs.frozen
class NodeMeta:
    """The identity of the node owning a data dir; None until the node is initialized.

    contract §2: the stored node id wins on restart, and a configured id that differs is
    an error.
    """

    node_id: int
    cluster_id: str
    cluster_name: str
    # The log index of the membership the join was answered with; 0 when this node
    # started the cluster (single, import); None: written by an older version.
    joined_at: int | None = None

    def __attrs_post_init__(self) -> None:
        _check(self)


wire.register_class(NodeMeta, unsigned=True)


def read_meta(path: Path) -> NodeMeta | None:
    """The `NodeMeta` in `path`, None when the file does not exist.

    Raises `FatalError` naming the file when it is damaged, `OSError` when it cannot
    be read.
    """
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        return None
    if buf[: len(MAGIC)] != MAGIC:
        raise FatalError(f"{path}: not a metanode meta file (bad magic {buf[:8]!r})")
    found, damage = records.split(buf, len(MAGIC))
    if damage is not None:
        raise FatalError(f"{path}: corrupt at byte offset {damage.offset}: {damage.reason}")
    if len(found) != 1:
        raise FatalError(f"{path}: expected one record, found {len(found)}")
    try:
        return wire.decode(bytes(found[0][1]), NodeMeta)
    except wire.DecodeError as exc:
        raise FatalError(f"{path}: {exc}") from exc


def write_meta(path: Path, meta: NodeMeta) -> int:
    """Replace `path` with `meta` atomically and durably; returns the bytes written.

    Raises `FatalError` naming the file if it cannot be written.
    """
    body = wire.encode(meta)
    try:
        return write_file_atomic(path, [MAGIC, records.frame([body])])
    except OSError as exc:
        raise FatalError(f"{path}: cannot write: {describe_os_error(exc)}") from exc


def remove_leftovers(path: Path) -> None:
    """Remove a temporary file left by a crash during `write_meta`."""
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".tmp").unlink()
