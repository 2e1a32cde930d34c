"""Transport of the raft port (contract §7, design §4): frames and TCP.

`serve_raft` listens, `PeerLink` carries raft messages to one peer, `call` makes one
request (join, leave, forwarded writes and reads) and waits for its answer.
"""

from metanode.transport.frames import (
    FRAME_TAGS,
    Call,
    CallResult,
    ErrorFrame,
    ErrorInfo,
    Frame,
    Hello,
    decode_frame,
    frame_bytes,
)
from metanode.transport.tcp import (
    CallPool,
    ConnectFailed,
    Identity,
    PeerLink,
    PeerLinkStats,
    RaftPortStats,
    call,
    error_from_info,
    parse_address,
    serve_raft,
)

__all__ = [
    "FRAME_TAGS",
    "Call",
    "CallPool",
    "CallResult",
    "ConnectFailed",
    "ErrorFrame",
    "ErrorInfo",
    "Frame",
    "Hello",
    "Identity",
    "PeerLink",
    "PeerLinkStats",
    "RaftPortStats",
    "call",
    "decode_frame",
    "error_from_info",
    "frame_bytes",
    "parse_address",
    "serve_raft",
]
