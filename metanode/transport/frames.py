"""Frames of the raft port (contract §7). Pure: no trio, no I/O.

Every frame is one msgpack map, tagged under ``"t"`` and encoded by the one converter
of `metanode.wire.codec`. The frame union holds:

* ``hello``  -- `Hello`, the dialer's first frame: ``{"t": "hello", "v", "cluster_id",
  "cluster_name", "from", "addr"?, "nonce"?}`` (``addr``, the dialer's advertised raft
  address: a node being added learns where the leader is from it; ``nonce``: the
  dialer will prove the raft secret, see `metanode.transport.security`);
* ``challenge`` -- `Challenge`, the listener's answer to a hello with a nonce: its own
  nonce, its node id and its proof of the secret;
* ``auth``   -- `Auth`, the dialer's proof, its next frame after a challenge;
* ``call``   -- `Call`, a request answered on the same connection;
* ``result`` -- `CallResult`, the answer to the `Call` with the same ``id``: a payload or
  an `ErrorInfo`;
* ``error``  -- `ErrorFrame`, sent by the listener just before it closes the connection
  (a refused hello, a protocol violation);
* every raft message (`metanode.raft.messages.MESSAGE_TYPES`), with its own tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Union

import attrs
from cattrs.errors import ForbiddenExtraKeysError

from metanode.raft.messages import MESSAGE_TYPES
from metanode.wire import (
    converter,
    decode_tagged,
    encode,
    encode_frame,
    register_class,
    register_tagged_union,
)

__all__ = [
    "FRAME_TAGS",
    "Auth",
    "Call",
    "Challenge",
    "CallResult",
    "ErrorFrame",
    "ErrorInfo",
    "Frame",
    "Hello",
    "decode_frame",
    "frame_bytes",
]


@attrs.frozen
class Hello:
    """The dialer's first frame: who it is and which cluster it believes it talks to.

    `from_id` travels as ``"from"``; 0 means "not a node" (the ``leave`` CLI, a client).
    `cluster_id` is None for a dialer that has not joined a cluster yet: it may only make
    calls (join, leave), never send raft messages.
    """

    TAG: ClassVar[str] = "hello"
    v: int
    cluster_id: str | None
    cluster_name: str
    from_id: int
    addr: str | None = None  # the dialer's advertised raft address, so replies can find it
    nonce: bytes | None = None  # set when the dialer proves the raft secret (then a Challenge answers)

    def __str__(self) -> str:
        return f"hello v{self.v} from {self.from_id} {self.cluster_name}/{self.cluster_id}"


@attrs.frozen
class Challenge:
    """The listener's answer to a hello carrying a nonce (docs/operations/security.md):
    a fresh nonce for the dialer to prove over, and the listener's own proof (None when
    it has no secret)."""

    TAG: ClassVar[str] = "challenge"
    nonce: bytes
    node_id: int
    proof: bytes | None = None

    def __str__(self) -> str:
        return f"challenge from {self.node_id} ({'with' if self.proof else 'without'} a proof)"


@attrs.frozen
class Auth:
    """The dialer's proof of the raft secret, its frame after a `Challenge` (None: it
    has no secret to prove with)."""

    TAG: ClassVar[str] = "auth"
    proof: bytes | None = None

    def __str__(self) -> str:
        return f"auth ({'with' if self.proof else 'without'} a proof)"


@attrs.frozen
class Call:
    """A request (``join``, ``leave``, ``write``, ``read``...) with an opaque payload."""

    TAG: ClassVar[str] = "call"
    id: int
    method: str
    payload: bytes

    def __str__(self) -> str:
        return f"call #{self.id} {self.method} {len(self.payload)}B"


@attrs.frozen
class ErrorInfo:
    """A `metanode.errors.ClientError` on the wire: its code, message and, for
    ``not_leader``, the leader's raft address ``"host:port"`` when known."""

    code: str
    message: str
    leader: str | None = None

    def __str__(self) -> str:
        leader = f" leader={self.leader}" if self.leader is not None else ""
        return f"{self.code}: {self.message}{leader}"


@attrs.frozen
class CallResult:
    """The answer to `Call` ``id``: exactly one of `payload` and `error` is set."""

    TAG: ClassVar[str] = "result"
    id: int
    payload: bytes | None = None
    error: ErrorInfo | None = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"result #{self.id} error {self.error}"
        return f"result #{self.id} {len(self.payload or b'')}B"


@attrs.frozen
class ErrorFrame:
    """Why the listener is about to close this connection (a refused hello...)."""

    TAG: ClassVar[str] = "error"
    code: str
    message: str

    def __str__(self) -> str:
        return f"error {self.code}: {self.message}"


def _check_result(result: CallResult) -> None:
    if (result.payload is None) == (result.error is None):
        raise ValueError("a result carries exactly one of payload and error")


register_class(Hello, unsigned=True)
register_class(Challenge, unsigned=True)
register_class(Auth)
register_class(Call, unsigned=True)
register_class(CallResult, unsigned=True, check=_check_result)
register_class(ErrorInfo)
register_class(ErrorFrame)

# Hello's `from_id` is "from" on the wire (a Python keyword cannot name a field). The
# codec has no renaming, so wrap its strict hooks: generate them first, then register
# exact-class hooks (singledispatch, which cattrs consults first) that rename the key.
_unstructure_hello_fields = converter.get_unstructure_hook(Hello)
_structure_hello_fields = converter.get_structure_hook(Hello)


def _unstructure_hello(hello: Hello) -> dict[str, Any]:
    data: dict[str, Any] = _unstructure_hello_fields(hello)
    data["from"] = data.pop("from_id")
    return data


def _structure_hello(value: Any, _: Any) -> Hello:
    if type(value) is not dict:
        raise TypeError(f"expected a hello as a map, got {type(value).__name__}")
    if "from_id" in value:
        raise ForbiddenExtraKeysError("", Hello, {"from_id"})
    if "from" not in value:
        raise ValueError("required field 'from' missing")
    body = value.copy()
    body["from_id"] = body.pop("from")
    return _structure_hello_fields(body, Hello)  # type: ignore[no-any-return]


converter.register_unstructure_hook(Hello, _unstructure_hello)
converter.register_structure_hook(Hello, _structure_hello)

Frame = Union[(Hello, Challenge, Auth, Call, CallResult, ErrorFrame, *MESSAGE_TYPES)]  # type: ignore[valid-type]  # noqa: UP007

#: tag -> class for every frame of the raft port (raft messages included).
FRAME_TAGS: Mapping[str, type] = register_tagged_union(Frame, name="frame")


def frame_bytes(frame: Any) -> bytes:
    """The length-prefixed bytes of one frame (a member of `Frame`)."""
    return encode_frame(encode(frame, Frame))


def decode_frame(body: bytes) -> Any:
    """The frame in `body` (a frame body, without its length); raises `DecodeError`."""
    return decode_tagged(body, Frame)
