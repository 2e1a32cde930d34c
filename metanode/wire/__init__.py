"""The wire format (design §5, contract §7). Pure: no trio, no I/O, no clocks.

`codec` turns attrs objects into msgpack and back, strictly; `framing` cuts a byte
stream into length-prefixed frames.
"""

from metanode.wire.codec import (
    MESSAGE_TAGS,
    PROTOCOL_VERSION,
    TAG_KEY,
    converter,
    decode,
    decode_message,
    decode_tagged,
    encode,
    encode_message,
    pack,
    register_class,
    register_tagged_union,
    structure,
    unpack,
    unstructure,
)
from metanode.wire.errors import DecodeError, EncodeError, FrameTooLarge
from metanode.wire.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_frame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MESSAGE_TAGS",
    "PROTOCOL_VERSION",
    "TAG_KEY",
    "DecodeError",
    "EncodeError",
    "FrameDecoder",
    "FrameTooLarge",
    "converter",
    "decode",
    "decode_message",
    "decode_tagged",
    "encode",
    "encode_message",
    "encode_frame",
    "pack",
    "register_class",
    "register_tagged_union",
    "structure",
    "unpack",
    "unstructure",
]
