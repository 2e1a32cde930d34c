"""Length-prefixed frames (contract §7): a 4-byte big-endian body length, then the body.

Sans-I/O (the h11 way): the transport reads whatever the socket gives and calls
`FrameDecoder.feed`, which returns every complete frame body. A header announcing
more than the limit is refused as soon as its 4 bytes are seen, before any of the
body is buffered, so a peer cannot make us allocate a huge frame.
"""

from __future__ import annotations

import struct

from metanode.wire.errors import DecodeError, FrameTooLarge

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "HEADER_SIZE", "FrameDecoder", "encode_frame"]

HEADER_SIZE = 4
_unpack_header = struct.Struct(">I").unpack_from
MAX_ENCODABLE = (1 << 32) - 1

#: A sensible limit for raft traffic: above a 4 MiB snapshot chunk or a large batch.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024

# Consumed bytes are dropped from the buffer's front once they exceed this and half
# the buffer: amortized O(1) per byte, whatever the sizes of frames and reads.
_COMPACT_MIN = 64 * 1024


def encode_frame(body: bytes) -> bytes:
    """The frame carrying `body` (which must be 1 byte to 4 GiB - 1)."""
    n = len(body)
    if n == 0:
        raise ValueError("a frame body cannot be empty")
    if n > MAX_ENCODABLE:
        raise ValueError(f"a frame body of {n} bytes does not fit a 4-byte length")
    return n.to_bytes(HEADER_SIZE, "big") + body


class FrameDecoder:
    """Cuts a byte stream into frame bodies.

    ``max_frame_size`` bounds one body (the 4 header bytes not counted). After a
    `DecodeError` (a frame over the limit, or a zero-length frame) the stream is out
    of sync: every later `feed` raises the same error; close the connection.
    """

    __slots__ = ("_buf", "_error", "_max", "_pos")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if type(max_frame_size) is not int or not 1 <= max_frame_size <= MAX_ENCODABLE:
            raise ValueError(f"max_frame_size must be an int in [1, 2**32), got {max_frame_size!r}")
        self._max = max_frame_size
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._error: DecodeError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._max

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return the bodies of every frame now complete, in order."""
        if self._error is not None:
            raise self._error
        if not data:
            return []
        buf = self._buf
        if self._pos == len(buf):
            # Nothing pending (the usual case): parse `data` in place, buffer the rest.
            buf.clear()
            self._pos = 0
            view = memoryview(data).cast("B")
            size = view.nbytes
            frames, used = self._parse(view, 0)
            if used < size:
                buf += memoryview(data).cast("B")[used:]
            return frames
        buf += data
        frames, self._pos = self._parse(memoryview(buf), self._pos)
        if self._pos == len(buf):
            buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_MIN and 2 * self._pos >= len(buf):
            del buf[: self._pos]
            self._pos = 0
        return frames

    def _parse(self, view: memoryview, pos: int) -> tuple[list[bytes], int]:
        frames: list[bytes] = []
        end = len(view)
        limit = self._max
        try:
            while end - pos >= HEADER_SIZE:
                (n,) = _unpack_header(view, pos)
                if n > limit:
                    self._error = FrameTooLarge(n, limit)
                    raise self._error
                if n == 0:
                    self._error = DecodeError("zero-length frame: a frame body cannot be empty")
                    raise self._error
                start = pos + HEADER_SIZE
                if end - start < n:
                    break
                frames.append(view[start : start + n].tobytes())
                pos = start + n
        finally:
            view.release()
        return frames, pos
