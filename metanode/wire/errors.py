"""Errors of the wire layer. Pure."""

from __future__ import annotations

from metanode.errors import MetanodeError


class DecodeError(MetanodeError, ValueError):
    """Bytes from the network (or disk) that are not what they claim to be.

    Raised for every kind of bad input: malformed msgpack, a wrong shape, an unknown
    tag, a missing, extra or wrongly typed field, an out-of-range integer, a value
    that fails validation, a bad frame length. The message names what was wrong and
    where (a path like ``$.entries[2].term``). Never raised for a bug of ours.
    """


class EncodeError(MetanodeError, ValueError):
    """An object that cannot be encoded (an int beyond 64 bits, a foreign type...).

    Only our own objects are encoded, so this is a bug of the caller.
    """


class FrameTooLarge(DecodeError):
    """A frame header announces more bytes than the configured limit.

    Raised as soon as the 4-byte header is seen, before any of the body is buffered.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
