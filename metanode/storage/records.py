"""Checksummed records, the framing of every file in `raft_dir` (contract §8, design §5).

A record is ``[u32 length][u32 crc32][body]``: both integers little-endian, `length`
the size of `body` in bytes (never 0), `crc32` the `zlib.crc32` of `body` (there is no
crc32c in the standard library or our dependencies; `zlib.crc32` runs at several GB/s).
Records follow each other with no padding.

This module only frames and checks bytes; what a body means is up to its file
(`wal.py`, `snapshots.py`, `meta.py`). Blocking, pure Python, no trio.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable

import attrs

HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size  # 8
MAX_BODY = (1 << 32) - 1


@attrs.frozen
class Damage:
    """Why the record at `offset` could not be read."""

    offset: int
    reason: str


def frame(bodies: Iterable[bytes]) -> bytes:
    """The records holding `bodies`, as one bytes object (one copy of each body)."""
    return b"".join(frame_parts(bodies))


def frame_parts(bodies: Iterable[bytes]) -> list[bytes]:
    """The records holding `bodies` as [header, body, header, body, ...], for
    `os.writev` (no copy of the bodies)."""
    parts: list[bytes] = []
    pack = HEADER.pack
    crc32 = zlib.crc32
    for body in bodies:
        n = len(body)
        if not 0 < n <= MAX_BODY:
            raise ValueError(f"a record body must hold 1..{MAX_BODY} bytes, got {n}")
        parts.append(pack(n, crc32(body)))
        parts.append(body)
    return parts


def split(buf: bytes, start: int = 0) -> tuple[list[tuple[int, memoryview]], Damage | None]:
    """The intact records of `buf` from `start`, as (offset, body) pairs, in order.

    Stops at the first record that is cut short (header or body) or fails its
    checksum, and returns where and why as `Damage` (None when `buf` ends exactly
    after a record). Bodies are views into `buf`: no copy.
    """
    view = memoryview(buf)
    out: list[tuple[int, memoryview]] = []
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    end = len(buf)
    pos = start
    while pos < end:
        if end - pos < HEADER_SIZE:
            return out, Damage(pos, f"short header: {end - pos} of {HEADER_SIZE} bytes")
        length, crc = unpack(buf, pos)
        body_end = pos + HEADER_SIZE + length
        if length == 0:
            return out, Damage(pos, "zero length")
        if body_end > end:
            have = end - pos - HEADER_SIZE
            return out, Damage(pos, f"short body: {have} of {length} bytes")
        body = view[pos + HEADER_SIZE : body_end]
        if crc32(body) != crc:
            return out, Damage(pos, "checksum mismatch")
        out.append((pos, body))
        pos = body_end
    return out, None


def find_intact(buf: bytes, start: int, body_start: re.Pattern[bytes]) -> int | None:
    """The offset of the first intact record beginning after `start`, or None.

    Used to tell a torn tail from damage in the middle: a torn write leaves only a
    prefix of the last write, so no whole record can follow the damaged one. Only
    offsets whose body begins with `body_start` (the first bytes every body of the
    file starts with) are checked, which skips zero-filled or random bytes quickly.
    """
    end = len(buf)
    view = memoryview(buf)
    for match in body_start.finditer(buf, start + 1 + HEADER_SIZE):
        pos = match.start() - HEADER_SIZE
        length, crc = HEADER.unpack_from(buf, pos)
        body_end = pos + HEADER_SIZE + length
        if 0 < length and body_end <= end and zlib.crc32(view[pos + HEADER_SIZE : body_end]) == crc:
            return pos
    return None
