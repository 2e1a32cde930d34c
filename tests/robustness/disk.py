"""Disk faults on a stopped node's data dir (layout: docs/reference/data-dir.md), and
the JSON log lines a node wrote (to see what it did: a snapshot saved, installed...)."""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path

import msgpack
import trio

from metanode.client import MetaClient
from metanode.storage import records, wal


def segments(raft_dir: Path) -> list[Path]:
    return sorted((raft_dir / "wal").glob("*.wal"))


def snapshot_files(raft_dir: Path) -> list[Path]:
    return sorted((raft_dir / "snapshot").glob("snap-*.bin"))


def record_offsets(segment: Path) -> list[tuple[int, int]]:
    """(offset, total length) of every intact record of a segment."""
    bodies, _damage = records.split(segment.read_bytes())
    return [(off, records.HEADER_SIZE + len(body)) for off, body in bodies]


def entry_records(segment: Path) -> list[tuple[int, int, int]]:
    """(offset, length, last entry index) of the ENTRIES records of a segment."""
    data = segment.read_bytes()
    bodies, _ = records.split(data)
    out = []
    for off, body in bodies:
        rec = msgpack.unpackb(bytes(body), raw=False, strict_map_key=False)
        if rec[0] == 1 and rec[2]:
            out.append((off, records.HEADER_SIZE + len(body), rec[1] + len(rec[2]) - 1))
    return out


def append_torn_record(segment: Path, rng: random.Random) -> str:
    """A write cut by a crash before its sync, where the next append would go (the end
    of the records; the file may go on with preallocated zeros): a record header
    announcing more body than follows, a whole record failing its checksum, or a
    partial header. Nothing acknowledged is in it."""
    kind = rng.choice(["short body", "bad checksum", "short header"])
    end = wal.split_segment(segment.read_bytes())[2]
    if kind == "short body":
        body = os.urandom(rng.randint(40, 400))
        torn = struct.pack("<II", len(body) + rng.randint(1, 500), 0x12345678) + body
    elif kind == "bad checksum":
        body = os.urandom(rng.randint(40, 400))
        torn = struct.pack("<II", len(body), zlib.crc32(body) ^ 1) + body
    else:  # a first byte that is not zero: the length it starts is not 0
        torn = bytes([rng.randint(1, 255)]) + os.urandom(rng.randint(0, 6))
    with open(segment, "r+b") as f:
        f.seek(end)
        f.write(torn)
    return kind


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def truncate_to(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def log_messages(log_file: Path, word: str) -> list[str]:
    """Messages of a node's JSON log file containing `word`."""
    if not log_file.exists():
        return []
    out = []
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            msg = str(json.loads(line).get("message", ""))
        except ValueError:
            msg = line
        if word in msg:
            out.append(msg)
    return out


async def prefill(addresses: list[str], keys: int, size: int, prefix: str = "p/") -> None:
    """`keys` keys of `size` bytes (random, so they do not compress), in txns of 32."""
    async with MetaClient.connect(addresses, timeout=20) as cl:
        for start in range(0, keys, 32):
            ops = [{"put": {"key": f"{prefix}{i:06d}", "value": os.urandom(size)}}
                   for i in range(start, min(keys, start + 32))]
            await cl.txn(if_then=ops)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def poll_for(pred: object, timeout: float, interval: float = 0.001) -> bool:
    """Poll a cheap sync predicate very often (a file appearing): True once it holds."""
    with trio.move_on_after(timeout):
        while not pred():  # type: ignore[operator]
            await trio.sleep(interval)
        return True
    return False


__all__ = [
    "append_torn_record", "dir_bytes", "entry_records", "flip_bit", "log_messages", "poll_for",
    "prefill", "record_offsets", "segments", "snapshot_files", "truncate_to",
]
