"""Micro-benchmark of the wire codec: prints numbers, asserts nothing.

    python benchmarks/codec_bench.py

A 10-entry AppendRequest with 100-byte entries (the hot path of replication):
encode, decode, and for scale plain msgpack pack/unpack of the same builtins.
Median of several runs, microseconds per operation.
"""

from __future__ import annotations

import statistics
import timeit

import msgpack

from metanode.raft.messages import AppendRequest, Heartbeat
from metanode.raft.types import Entry, EntryKind, LogId
from metanode.wire import FrameDecoder, decode_message, encode_frame, encode_message

RUNS = 7


def per_op_us(fn, number: int) -> tuple[float, float]:
    """(median, min) over RUNS runs, in microseconds per call."""
    times = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=RUNS)]
    return statistics.median(times), min(times)


def main() -> None:
    entries = tuple(Entry(7, 100 + i, EntryKind.NORMAL, bytes(range(100))) for i in range(10))
    append = AppendRequest(7, 1, 2, LogId(7, 99), entries, 105)
    body = encode_message(append)
    builtins = msgpack.unpackb(body, raw=False)
    assert decode_message(body) == append
    hb = Heartbeat(7, 1, 2, 105, 3)
    hb_body = encode_message(hb)

    frames = encode_frame(hb_body) * 1000
    split = [frames[i : i + 1000] for i in range(0, len(frames), 1000)]

    def feed_split() -> None:
        dec = FrameDecoder()
        for chunk in split:
            dec.feed(chunk)

    rows = [
        ("AppendRequest(10 x 100 B) encode", per_op_us(lambda: encode_message(append), 2000)),
        ("AppendRequest(10 x 100 B) decode", per_op_us(lambda: decode_message(body), 2000)),
        (
            "  msgpack.packb of its builtins",
            per_op_us(lambda: msgpack.packb(builtins, use_bin_type=True), 2000),
        ),
        (
            "  msgpack.unpackb of its bytes",
            per_op_us(lambda: msgpack.unpackb(body, raw=False), 2000),
        ),
        ("Heartbeat encode", per_op_us(lambda: encode_message(hb), 5000)),
        ("Heartbeat decode", per_op_us(lambda: decode_message(hb_body), 5000)),
        (
            "FrameDecoder.feed 1000 heartbeat frames",
            per_op_us(lambda: FrameDecoder().feed(frames), 50),
        ),
        ("  the same in 1000-byte reads", per_op_us(feed_split, 50)),
    ]
    print(f"AppendRequest body: {len(body)} bytes; heartbeat body: {len(hb_body)} bytes")
    print(f"{'us per op (median, min of ' + str(RUNS) + ' runs)':<45} {'median':>8} {'min':>8}")
    for name, (median, best) in rows:
        print(f"{name:<45} {median:8.2f} {best:8.2f}")


if __name__ == "__main__":
    main()
