"""Peer security of the raft port (docs/operations/security.md): TLS contexts and the
raft secret's challenge-response. Pure but for `os.urandom`: no trio, no sockets.

`PeerSecurity` says how this process speaks on the raft port: the two TLS contexts
(listener and dialer; both set or neither), the secret it proves with, the older
secrets it still accepts, and whether a peer without a valid proof is refused.

The proof (the secret never crosses the wire):

1. the dialer's hello carries a fresh random ``nonce`` (16 bytes) when it has a secret;
2. the listener answers with a `Challenge`: its own fresh nonce, its node id, and its
   proof ``HMAC-SHA256(secret, "listener" | hello body | listener nonce | listener id)``;
3. the dialer checks that proof against its secrets and answers with an `Auth`:
   ``HMAC-SHA256(secret, "dialer" | hello body | listener nonce | listener id)``.

The hello body is the exact bytes of the dialer's hello frame, so the proof covers
every field of it (cluster, node id, advertised address, the dialer's nonce). A
recorded exchange cannot be replayed: a listener proves over the dialer's fresh nonce
and a dialer over the listener's, each drawn anew per connection; the role label keeps
one side's proof from being reflected as the other's. Without TLS the proof
authenticates the connection's start only (an on-path attacker could relay it and take
the connection over): TLS is what protects the stream itself.

`current_security()` is the process's setting for the raft port: set by
`use_security` around a node (metanode/server.py) and read by `serve_raft`,
`PeerLink`, `CallPool` and `call` when they are not given one explicitly. It is a
context variable, inherited by every task a node starts (trio copies the spawning
task's context), so nodes of an in-process test cluster each keep their own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import attrs

__all__ = [
    "NONCE_SIZE",
    "PeerSecurity",
    "current_security",
    "new_nonce",
    "proof",
    "use_security",
]

NONCE_SIZE = 16
_LABEL = b"metanode raft secret proof v1"


@attrs.frozen
class PeerSecurity:
    """How this process authenticates on the raft port (see the module doc)."""

    server_ssl: ssl.SSLContext | None = None  #: the listener's TLS context (mutual)
    client_ssl: ssl.SSLContext | None = None  #: the dialer's TLS context (with our cert)
    secret: bytes | None = None  #: proves with it (`raft_secret`)
    accepted: tuple[bytes, ...] = ()  #: also accepted from peers (`raft_accepted_secrets`)
    strict: bool = False  #: refuse a peer without a valid proof (`raft_secret_strict`)

    def __attrs_post_init__(self) -> None:
        if (self.server_ssl is None) != (self.client_ssl is None):
            raise ValueError("TLS on the raft port needs both the listener's and the dialer's context")
        if self.strict and not self.secrets:
            raise ValueError("a strict raft secret needs a secret")

    @property
    def tls(self) -> bool:
        return self.server_ssl is not None

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """Every secret a peer's proof may use: ours first, then the accepted ones."""
        return ((self.secret,) if self.secret is not None else ()) + self.accepted

    def prove(self, role: str, hello_body: bytes, listener_nonce: bytes, listener_id: int) -> bytes | None:
        """Our proof in `role` (``"dialer"`` or ``"listener"``), None without a secret."""
        if self.secret is None:
            return None
        return proof(self.secret, role, hello_body, listener_nonce, listener_id)

    def verify(
        self, role: str, given: bytes | None, hello_body: bytes, listener_nonce: bytes, listener_id: int
    ) -> bool:
        """Is `given` the proof of `role` by one of `secrets`? (Constant time per secret.)"""
        if given is None:
            return False
        ok = False
        for secret in self.secrets:
            ok |= hmac.compare_digest(given, proof(secret, role, hello_body, listener_nonce, listener_id))
        return ok


def proof(secret: bytes, role: str, hello_body: bytes, listener_nonce: bytes, listener_id: int) -> bytes:
    """HMAC-SHA256 over an unambiguous transcript (every part length-prefixed)."""
    parts = (_LABEL, role.encode(), hello_body, listener_nonce, struct.pack(">Q", listener_id))
    message = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    return hmac.new(secret, message, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


NO_SECURITY = PeerSecurity()
_current: ContextVar[PeerSecurity] = ContextVar("metanode_peer_security", default=NO_SECURITY)


def current_security() -> PeerSecurity:
    """The raft port's security of this context (none unless `use_security` set it)."""
    return _current.get()


@contextmanager
def use_security(security: PeerSecurity) -> Iterator[PeerSecurity]:
    """Within the block (and in every task started from it), `current_security()` is
    `security`."""
    token = _current.set(security)
    try:
        yield security
    finally:
        _current.reset(token)
