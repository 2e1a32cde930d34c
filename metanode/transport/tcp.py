"""The raft port over TCP (contract §7, design §4): `serve_raft`, `PeerLink`, `call`.

Every connection starts with the dialer's `Hello`. Then the dialer either streams raft
messages one way (a `PeerLink`, one per peer, fire and forget: Raft tolerates loss), or
makes `Call`s answered on the same connection by `CallResult`s (`call`, one per
connection). The listener answers a refused hello or a protocol violation with an
`ErrorFrame` and closes that connection; nothing a dialer sends can stop the server or
reach the raft core before its hello was accepted.

I/O errors (`trio.BrokenResourceError`, `trio.ClosedResourceError`, `OSError`) are
translated once, at the edge of a connection (`_Conn`), into `TransportError`, which
never escapes a connection task: it ends that connection with a log line.

Security (`metanode.transport.security`, docs/operations/security.md): with TLS
contexts every connection is mutual TLS (`trio.SSLStream`) before any frame, and a
failed handshake (a plaintext peer, a certificate from another CA) closes it at once,
logged with the peer address. With a raft secret the dialer's hello carries a nonce,
the listener answers with a `Challenge` and the dialer with an `Auth`; only then does
the listener read raft messages or calls (or learn the dialer's address). Each
function takes its `PeerSecurity` as `security=`, by default `current_security()`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import select
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import attrs
import trio

from metanode.errors import (
    BadRequest,
    ClientError,
    NotLeader,
    Timeout,
    TooLarge,
    TransportError,
    Unauthenticated,
    Unavailable,
)
from metanode import trio_util
from metanode.raft.messages import MESSAGE_TYPES, AppendRequest, Message
from metanode.transport.frames import (
    Auth,
    Call,
    CallResult,
    Challenge,
    ErrorFrame,
    ErrorInfo,
    Hello,
    decode_frame,
    frame_bytes,
)
from metanode.transport.security import PeerSecurity, current_security, new_nonce
from metanode.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    DecodeError,
    EncodeError,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
    encode_message,
)

__all__ = [
    "Identity",
    "PeerLink",
    "PeerLinkStats",
    "RaftPortStats",
    "call",
    "error_from_info",
    "parse_address",
    "serve_raft",
]

log = logging.getLogger("metanode.transport")

_RECEIVE_SIZE = 64 * 1024
#: A connection that has not said hello by then is closed.
HELLO_TIMEOUT = 10.0
#: After an error frame, how long (and how many bytes) we read and discard what the
#: dialer had already sent, so that closing does not reset the connection before the
#: dialer could read the error frame.
_LINGER_SECONDS = 0.5
_LINGER_BYTES = 1 << 20
#: Calls running at once on one connection; the reader waits beyond that.
MAX_CALLS_PER_CONNECTION = 64
#: A sender batch stops growing past this many bytes (it may exceed it by one frame).
_MAX_BATCH_BYTES = 4 << 20

_write_fd = os.write  # PeerLink's direct write of a frame (tests replace it)


@attrs.frozen
class _Rest:
    """What the socket did not take of a frame `PeerLink.send_nowait` wrote itself."""

    data: bytes
    append: bool  # of an AppendEntries (for the append latency samples)

_RAFT_TYPES = frozenset(MESSAGE_TYPES)
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: The first two bytes of a TLS handshake record, read as a frame length's high half.
_TLS_RECORD_HEADER = 0x1603
_ERRORS_BY_CODE: dict[str, type[ClientError]] = {
    cls.code: cls
    for cls in (ClientError, NotLeader, Unavailable, TooLarge, Unauthenticated, BadRequest, Timeout)
}


class ConnectFailed(TransportError):
    """No connection was made: nothing was sent, so any request may be retried."""


@attrs.frozen
class Identity:
    """Who this process is on the raft port. `cluster_id` is None until the node has
    joined (or bootstrapped) a cluster; `node_id` 0 is "not a node" (the CLI)."""

    node_id: int
    cluster_name: str
    cluster_id: str | None
    address: str | None = None  # our advertised raft address, sent in the hello


# ------------------------------------------------------------------------- helpers


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as (host, port); `ValueError` if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, port


def _describe_io_error(exc: BaseException) -> str:
    """An I/O error in words, down to the OS errors it was raised from (trio wraps them:
    `open_tcp_stream` raises one OSError caused by a group of per-address errors)."""
    parts: list[str] = []

    def walk(e: BaseException | None, depth: int) -> None:
        if e is None or depth > 8:
            return
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub, depth + 1)
            return
        text = str(e)
        if text and text not in parts:
            parts.append(text)
        if isinstance(e, OSError) and e.errno is not None:
            return  # the OS error itself
        walk(e.__cause__ or e.__context__, depth + 1)

    walk(exc, 0)
    return ": ".join(parts) if parts else type(exc).__name__


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def error_from_info(code: str, message: str, leader: str | None = None) -> ClientError:
    """The `ClientError` subclass for `code` (a plain `ClientError` carrying an unknown
    code); `NotLeader` gets ``.leader``, the leader's ``"host:port"`` or None."""
    cls = _ERRORS_BY_CODE.get(code)
    if cls is NotLeader:
        return NotLeader(message, leader=leader)  # type: ignore[arg-type]
    if cls is not None:
        return cls(message)
    err = ClientError(message)
    err.code = code
    return err


class _Conn:
    """A stream with frame I/O; the one place where I/O errors become `TransportError`.

    Sends are serialized by a lock (calls answered concurrently share the stream). The
    stream is a TCP stream, or a `trio.SSLStream` over one.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str, max_frame_size: int) -> None:
        self.stream = stream
        self.peer = peer
        self.decoder = FrameDecoder(max_frame_size)
        self._send_lock = trio.Lock()
        self._backlog: list[bytes] = []  # frames read along with an earlier one

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except _IO_ERRORS as exc:
                raise TransportError(f"{self.peer}: send failed: {_describe_io_error(exc)}") from exc

    async def receive(self) -> bytes:
        """Some bytes, or b"" at the end of the stream."""
        try:
            return await trio_util.receive_some(self.stream, _RECEIVE_SIZE)
        except _IO_ERRORS as exc:
            raise TransportError(
                f"{self.peer}: receive failed: {_describe_io_error(exc)}"
            ) from exc

    async def receive_frames(self) -> list[bytes] | None:
        """The frame bodies completed by the next read; None at a clean end of stream.

        Raises `DecodeError` (a frame over the limit, a zero length, a stream cut in
        the middle of a frame) and `TransportError`.
        """
        if self._backlog:
            bodies, self._backlog = self._backlog, []
            return bodies
        data = await self.receive()
        if not data:
            if self.decoder.pending:
                raise DecodeError(
                    f"connection closed in the middle of a frame ({self.decoder.pending} bytes pending)"
                )
            return None
        return self.decoder.feed(data)

    def looks_closed(self) -> bool:
        """Has the peer closed (or written to) this idle connection? A call connection
        carries nothing unasked, so anything to read on it means it is done for: the
        peer restarted, or refused us. Checked without blocking, before reusing it."""
        stream: Any = self.stream
        sock = getattr(stream, "socket", None) or getattr(getattr(stream, "transport_stream", None), "socket", None)
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def push_back(self, bodies: list[bytes]) -> None:
        """Frames `receive_frames` returns first (read together with a handshake's)."""
        self._backlog = bodies + self._backlog

    async def send_eof(self) -> None:
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            return  # TLS: no half-close; the linger then ends when the dialer closes
        try:
            await send_eof()
        except _IO_ERRORS as exc:
            raise TransportError(f"{self.peer}: send_eof failed: {_describe_io_error(exc)}") from exc

    async def drain(self, seconds: float, max_bytes: int) -> None:
        """Read and discard until the end of the stream, `seconds` or `max_bytes`."""
        with trio.move_on_after(seconds):
            while max_bytes > 0:
                data = await self.receive()
                if not data:
                    return
                max_bytes -= len(data)


# -------------------------------------------------------------------------- server


class _Refuse(Exception):
    """Ends a server connection with an error frame (internal control flow)."""

    def __init__(self, code: str, message: str, *, linger: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.linger = linger


@attrs.define
class _Server:
    """State shared by the connections of one `serve_raft`."""

    identity: Callable[[], Identity]
    on_message: Callable[[Message], Awaitable[None] | None]
    on_call: Callable[[str, bytes, Hello], Awaitable[bytes]]
    on_peer: Callable[[int, str], None]
    on_stream: Callable[[int], None]
    leader_address: Callable[[int], str | None] | None
    max_frame_size: int
    stats: RaftPortStats = attrs.Factory(lambda: RaftPortStats())
    security: PeerSecurity = attrs.Factory(PeerSecurity)
    #: peers already warned about for a missing or wrong proof (non-strict): once each
    warned: set[tuple[int, str]] = attrs.Factory(set)

    async def handle(self, tcp: trio.SocketStream) -> None:
        """The task of one accepted connection; never raises (but `Cancelled`)."""
        peer = _peer_name(tcp)
        stream: trio.abc.Stream = tcp
        try:
            if self.security.server_ssl is not None:
                tls = await self._tls_handshake(tcp, peer)
                if tls is None:
                    return
                stream = tls
            await _ServerConnection(self, _Conn(stream, peer, self.max_frame_size)).run()
        except Exception:
            # A bug of ours: loud, but it ends this connection only, not the server.
            log.exception("%d raft port: connection from %s failed", self.identity().node_id, peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _tls_handshake(self, tcp: trio.SocketStream, peer: str) -> trio.SSLStream[Any] | None:
        """The connection as mutual TLS, or None (refused and logged): a plaintext
        dialer, a certificate from another CA, no certificate, no handshake in time.
        Nothing it sent was read as a frame."""
        assert self.security.server_ssl is not None
        stream = trio.SSLStream(tcp, self.security.server_ssl, server_side=True, https_compatible=True)
        why: str | None = None
        with trio.move_on_after(HELLO_TIMEOUT) as scope:
            try:
                await stream.do_handshake()
            except _IO_ERRORS as exc:
                why = _describe_io_error(exc)
        if scope.cancelled_caught:
            why = f"no TLS handshake within {HELLO_TIMEOUT:g} s"
        if why is None:
            return stream
        log.warning("%d raft port: refused %s: TLS handshake failed: %s", self.identity().node_id, peer, why)
        await trio.aclose_forcefully(stream)
        return None


class _ServerConnection:
    def __init__(self, server: _Server, conn: _Conn) -> None:
        self.server = server
        self.conn = conn
        self.hello: Hello | None = None
        self.hello_body = b""
        self.challenge: Challenge | None = None  # sent; the dialer's Auth is next
        self.authenticated = False  # hello (and proof) accepted: raft messages and calls may follow
        self.raft_checked = False
        self._node_id = -1  # ours, once raft_checked
        self.call_slots = trio.Semaphore(MAX_CALLS_PER_CONNECTION)

    @property
    def node_id(self) -> int:
        return self.server.identity().node_id

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            try:
                await self._read_loop(nursery)
            except _Refuse as refusal:
                await self._refuse(refusal)
            except DecodeError as exc:
                hint = ""
                if self.hello is None and isinstance(exc, FrameTooLarge) and exc.size >> 16 == _TLS_RECORD_HEADER:
                    hint = " (a TLS handshake: the peer has raft TLS set and this node does not)"
                log.warning("%d raft port: bad frame from %s: %s%s", self.node_id, self.conn.peer, exc, hint)
                code = "too_large" if isinstance(exc, FrameTooLarge) else "bad_request"
                # Never read the body of a frame over the limit: close at once.
                await self._refuse(_Refuse(code, str(exc), linger=not isinstance(exc, FrameTooLarge)))
            except TransportError as exc:
                log.debug("%d raft port: connection %s ended: %s", self.node_id, self.conn.peer, exc)
            # End of stream or error: nobody is left to read the answers of running calls.
            nursery.cancel_scope.cancel()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        hello_deadline = trio.current_time() + HELLO_TIMEOUT
        while True:
            if not self.authenticated:
                with trio.move_on_at(hello_deadline) as hello_wait:
                    bodies = await self.conn.receive_frames()
                if hello_wait.cancelled_caught:
                    what = "hello" if self.hello is None else "auth after the challenge"
                    raise _Refuse("bad_request", f"no {what} within {HELLO_TIMEOUT:g} s", linger=False)
            else:
                bodies = await self.conn.receive_frames()
            if bodies is None:
                return
            # By the dialer's id once it is authenticated (a stranger's claim is no label).
            src = str(self.hello.from_id) if self.hello is not None and self.authenticated else "0"
            recv = self.server.stats.recv_bytes
            recv[src] = recv.get(src, 0) + sum(len(body) + 4 for body in bodies)  # 4: the length
            for body in bodies:
                await self._on_frame(decode_frame(body), body, nursery)

    async def _on_frame(self, frame: Any, body: bytes, nursery: trio.Nursery) -> None:
        if self.hello is None:
            if not isinstance(frame, Hello):
                raise _Refuse("bad_request", f"the first frame must be a hello, got {type(frame).__name__}")
            self._check_hello(frame)
            self.hello = frame
            self.hello_body = body
            log.debug("%d raft port: %s from %s", self.node_id, frame, self.conn.peer)
            if frame.nonce is not None:
                await self._send_challenge()
            else:
                self._unproven("gave no proof of the raft secret")
        elif not self.authenticated:
            if not isinstance(frame, Auth):
                raise _Refuse("bad_request", f"expected an auth frame after the challenge, got {type(frame).__name__}")
            self._check_auth(frame)
        elif type(frame) in _RAFT_TYPES:
            self._check_raft(frame)
            try:
                stepping = self.server.on_message(frame)
                if stepping is not None:  # the node steps its core in this task
                    await stepping
            except Exception:
                log.exception("%d raft port: on_message failed for %s", self.node_id, frame)
                raise _Refuse("internal", "internal error", linger=False) from None
        elif isinstance(frame, Call):
            await self.call_slots.acquire()
            nursery.start_soon(self._run_call, frame)
        else:
            raise _Refuse("bad_request", f"unexpected {type(frame).__name__} frame")

    async def _send_challenge(self) -> None:
        """Answer a hello with a nonce (docs/operations/security.md): our nonce and proof."""
        security = self.server.security
        nonce = new_nonce()
        self.challenge = Challenge(
            nonce, self.node_id, security.prove("listener", self.hello_body, nonce, self.node_id)
        )
        await self.conn.send(frame_bytes(self.challenge))

    def _check_auth(self, auth: Auth) -> None:
        assert self.challenge is not None
        security = self.server.security
        if not security.secrets:
            self._accepted()  # we have no secret: nothing to check (and not strict)
        elif security.verify("dialer", auth.proof, self.hello_body, self.challenge.nonce, self.challenge.node_id):
            self._accepted()
        else:
            self._unproven("gave a wrong proof of the raft secret" if auth.proof else "gave no proof of the raft secret")

    def _unproven(self, what: str) -> None:
        """The dialer did not prove the secret: refused when strict, else warned about."""
        security = self.server.security
        assert self.hello is not None
        if security.strict:
            raise _Refuse("unauthenticated", f"node {self.hello.from_id} {what} (raft_secret_strict is set)")
        if security.secrets:
            key = (self.hello.from_id, self.conn.peer.rpartition(":")[0])
            level = logging.DEBUG if key in self.server.warned else logging.WARNING
            self.server.warned.add(key)
            log.log(level, "%d raft port: %s (node %d) %s: accepted, raft_secret_strict is off",
                    self.node_id, self.conn.peer, self.hello.from_id, what)
        self._accepted()

    def _accepted(self) -> None:
        hello = self.hello
        assert hello is not None
        self.authenticated = True
        if hello.addr and hello.cluster_id is not None and (
            hello.cluster_id == self.server.identity().cluster_id
        ):
            # Only a member of our cluster may tell us where it is now (a fresh
            # dialer claiming a member's id must not redirect that member's traffic).
            self.server.on_peer(hello.from_id, hello.addr)

    def _check_hello(self, hello: Hello) -> None:
        """Version, cluster name and cluster id must match ours (contract §3, §7)."""
        ident = self.server.identity()
        if hello.v != PROTOCOL_VERSION:
            raise _Refuse(
                "bad_request",
                f"protocol version {hello.v} is not ours ({PROTOCOL_VERSION})",
            )
        if hello.cluster_name != ident.cluster_name:
            raise _Refuse(
                "unauthenticated",
                f"cluster_name {hello.cluster_name!r} is not ours ({ident.cluster_name!r})",
            )
        ours = ident.cluster_id
        if hello.cluster_id is not None and ours is not None and hello.cluster_id != ours:
            raise _Refuse(
                "unauthenticated",
                f"cluster_id {hello.cluster_id!r} is not ours ({ours!r})",
            )

    def _check_raft(self, msg: Any) -> None:
        """May this connection carry raft messages, and is `msg` for us from the dialer?"""
        assert self.hello is not None
        if not self.raft_checked:
            ident = self.server.identity()
            theirs = self.hello.cluster_id
            if theirs is None:
                raise _Refuse(
                    "unauthenticated", "raft messages need a cluster_id in the hello"
                )
            ours = ident.cluster_id
            if ours is None:
                # A node adopts a cluster id only from a successful join reply (or
                # `single`, or an import): never from whoever dials it.
                raise _Refuse("unavailable", "this node has not joined a cluster yet")
            if ours != theirs:
                raise _Refuse("unauthenticated", f"cluster_id {theirs!r} is not ours ({ours!r})")
            self.raft_checked = True
            self._node_id = ident.node_id  # (a node's id never changes: one identity() a connection)
            # A raft stream (a PeerLink) started: the peer may have restarted. Calls
            # (forwarded requests, joins) do not count: they open connections freely.
            self.server.on_stream(self.hello.from_id)
        if msg.src != self.hello.from_id or msg.dst != self._node_id:
            raise _Refuse(
                "bad_request",
                f"message {msg.src}->{msg.dst} on a connection from node"
                f" {self.hello.from_id} to node {self._node_id}",
            )

    async def _run_call(self, frame: Call) -> None:
        """Run one call and answer it; never raises (but `Cancelled`)."""
        assert self.hello is not None
        try:
            try:
                payload = await self.server.on_call(frame.method, frame.payload, self.hello)
                result = CallResult(frame.id, payload=payload)
            except ClientError as exc:
                result = CallResult(frame.id, error=self._error_info(exc))
            except Exception as exc:
                log.exception("%d raft port: call %s from %s failed", self.node_id, frame, self.conn.peer)
                result = CallResult(
                    frame.id, error=ErrorInfo("internal", f"internal error: {type(exc).__name__}")
                )
            try:
                data = frame_bytes(result)
            except (EncodeError, ValueError):
                log.exception("%d raft port: cannot encode the answer to %s", self.node_id, frame)
                data = frame_bytes(CallResult(frame.id, error=ErrorInfo("internal", "bad answer")))
            await self.conn.send(data)
        except TransportError as exc:
            log.debug("%d raft port: answer to %s lost: %s", self.node_id, frame, exc)
        finally:
            self.call_slots.release()

    def _error_info(self, exc: ClientError) -> ErrorInfo:
        leader = getattr(exc, "leader", None)
        if isinstance(leader, int) and not isinstance(leader, bool):
            resolve = self.server.leader_address
            leader = resolve(leader) if resolve is not None else None
        if not isinstance(leader, str):
            leader = None
        return ErrorInfo(exc.code, str(exc), leader)

    async def _refuse(self, refusal: _Refuse) -> None:
        """Send an error frame, then close (after a short linger, see `_LINGER_SECONDS`)."""
        log.warning("%d raft port: refused %s (%s): %s", self.node_id, self.conn.peer,
                    self.hello if self.hello is not None else "no hello", refusal.message)
        try:
            with trio.move_on_after(_LINGER_SECONDS):
                await self.conn.send(frame_bytes(ErrorFrame(refusal.code, refusal.message)))
                await self.conn.send_eof()
            if refusal.linger:
                await self.conn.drain(_LINGER_SECONDS, _LINGER_BYTES)
        except TransportError as exc:
            log.debug("%d raft port: error frame to %s lost: %s", self.node_id, self.conn.peer, exc)


async def serve_raft(
    host: str,
    port: int,
    *,
    identity: Callable[[], Identity],
    on_message: Callable[[Message], Awaitable[None] | None],
    on_call: Callable[[str, bytes, Hello], Awaitable[bytes]],
    on_peer: Callable[[int, str], None] = lambda node_id, address: None,
    on_stream: Callable[[int], None] = lambda node_id: None,
    leader_address: Callable[[int], str | None] | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    stats: RaftPortStats | None = None,
    security: PeerSecurity | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen on the raft port; never returns (cancel it to stop).

    Binds with SO_REUSEADDR, then ``task_status.started(bound_port)`` (so ``port=0``
    works). A port in use raises `OSError` (errno ``EADDRINUSE``) before `started`.

    Each connection is its own task. Its first frame must be a `Hello` whose version
    and cluster name equal ours and whose cluster id, when both sides have one, equals
    ours; otherwise an `ErrorFrame` answers and the connection closes. The bytes of
    the frames received are counted in `stats`, by the dialer's node id. Then:

    * raft messages go to `on_message`, in order: it queues them (the node's bounded
      inbox) or returns an awaitable, awaited before the connection's next frame (the
      node steps its raft core in this task while its raft loop is idle). They need
      a cluster id in the hello, and must come from the hello's node and be
      addressed to us. A node without a cluster id (an empty
      data dir, until its join reply) refuses them: it never adopts a dialer's;
    * each `Call` runs ``await on_call(method, payload, hello)`` in its own task, so
      calls on one connection run concurrently; the answer carries the call's id. A
      `ClientError` becomes an `ErrorInfo` (``code``, ``str(e)``, and the leader's
      ``"host:port"`` for `NotLeader`: a str ``.leader`` as is, an int node id through
      `leader_address`); any other exception is logged with its traceback and answered
      with code ``internal``;
    * a hello of our cluster carrying the dialer's advertised address calls
      ``on_peer(node_id, addr)`` (how a node being added learns where the leader is
      before it has the log); dialers without a cluster id are not trusted with it;
    * the first raft message of a connection calls ``on_stream(node_id)``: the
      dialer's raft stream (re)started, e.g. after it restarted.

    A frame over `max_frame_size` closes its connection as soon as its header is read
    (the body is never buffered); undecodable or truncated frames close their
    connection only, logged at warning with the peer address.

    `security` (default `current_security()`): with TLS every connection must complete
    a mutual TLS handshake first; with a secret a hello carrying a nonce is answered
    with a `Challenge` and nothing but the dialer's `Auth` is read next; a dialer
    without a valid proof is refused (``unauthenticated``) when strict, else accepted
    with a warning (once per peer). Only an accepted dialer's address reaches
    `on_peer`. Refusals leave the node untouched.
    """
    security = security if security is not None else current_security()
    server = _Server(
        identity=identity,
        on_message=on_message,
        on_call=on_call,
        on_peer=on_peer,
        on_stream=on_stream,
        leader_address=leader_address,
        max_frame_size=max_frame_size,
        stats=stats if stats is not None else RaftPortStats(),
        security=security,
    )
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound_port: int = listeners[0].socket.getsockname()[1]
    mode = ", ".join(
        (["mutual TLS"] if security.tls else [])
        + (["raft secret" + (" (strict)" if security.strict else "")] if security.secrets else [])
    )
    log.info("%d raft port listening on %s:%d%s", identity().node_id, host or "*", bound_port,
             f" ({mode})" if mode else "")
    task_status.started(bound_port)
    await trio.serve_listeners(server.handle, listeners)  # type: ignore[arg-type]
    raise AssertionError("serve_listeners returned")  # pragma: no cover


# ------------------------------------------------------------------------- dialers


async def _connect(address: str, timeout: float) -> trio.SocketStream:
    """A TCP connection to `address`; `TransportError` naming it on any failure."""
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise ConnectFailed(f"cannot connect to {address}: {exc}") from None
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectFailed(f"cannot connect to {address}: timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {address}: {_describe_io_error(exc)}") from exc


def _hello(ident: Identity, nonce: bytes | None = None) -> Hello:
    return Hello(PROTOCOL_VERSION, ident.cluster_id, ident.cluster_name, ident.node_id, ident.address, nonce)


#: (our node id, listener address) pairs already warned about for a missing proof
_warned_listeners: set[tuple[int, str]] = set()


async def _open(
    address: str,
    ident: Identity,
    security: PeerSecurity,
    max_frame_size: int,
    *,
    timeout: float = math.inf,
    peer_id: int | None = None,
) -> tuple[_Conn, bytes]:
    """A connection to the raft port at `address`, through TLS and the secret's
    challenge when `security` has them, and the bytes to send before anything else
    (our hello, or our proof once the hello was answered): send them with the first
    frames, in one write.

    Raises `ConnectFailed` (nothing but the hello was sent: no connection, a TLS
    handshake that failed, no challenge, a listener that did not prove the secret while
    we are strict, not node `peer_id`) or the `ClientError` of an error frame refusing
    our hello. The stream is closed on every failure; on success the caller closes
    ``conn.stream``.
    """
    try:
        with trio.fail_after(timeout):
            tcp = await _connect(address, math.inf)
            stream: trio.abc.Stream = tcp
            try:
                if security.client_ssl is not None:
                    tls = trio.SSLStream(tcp, security.client_ssl, server_hostname=None, https_compatible=True)
                    stream = tls
                    try:
                        await tls.do_handshake()
                    except _IO_ERRORS as exc:
                        raise ConnectFailed(
                            f"cannot connect to {address}: TLS handshake failed: {_describe_io_error(exc)}"
                        ) from None
                conn = _Conn(stream, address, max_frame_size)
                if security.secret is None:
                    return conn, frame_bytes(_hello(ident))
                hello = frame_bytes(_hello(ident, new_nonce()))
                try:
                    await conn.send(hello)
                except TransportError as exc:
                    raise ConnectFailed(str(exc)) from None
                challenge = await _receive_challenge(conn)
                body = hello[4:]  # the frame's body, as the listener read it
                if peer_id is not None and challenge.node_id != peer_id:
                    raise ConnectFailed(f"{address} is node {challenge.node_id}, not node {peer_id}")
                if not security.verify("listener", challenge.proof, body, challenge.nonce, challenge.node_id):
                    what = "a wrong proof" if challenge.proof is not None else "no proof"
                    if security.strict:
                        raise ConnectFailed(
                            f"{address} (node {challenge.node_id}) gave {what} of the raft secret:"
                            " refused (raft_secret_strict is set)"
                        )
                    key = (ident.node_id, address)
                    level = logging.DEBUG if key in _warned_listeners else logging.WARNING
                    _warned_listeners.add(key)
                    log.log(level, "%d: %s (node %d) gave %s of the raft secret: talking to it anyway,"
                            " raft_secret_strict is off", ident.node_id, address, challenge.node_id, what)
                proof = security.prove("dialer", body, challenge.nonce, challenge.node_id)
                return conn, frame_bytes(Auth(proof))
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise ConnectFailed(f"cannot connect to {address}: no connection within {timeout:g} s") from None


async def _receive_challenge(conn: _Conn) -> Challenge:
    """The listener's answer to a hello with a nonce (frames after it are kept)."""
    try:
        bodies: list[bytes] = []
        while not bodies:
            got = await conn.receive_frames()
            if got is None:
                raise ConnectFailed(f"{conn.peer} closed the connection after our hello")
            bodies = got
        frame = decode_frame(bodies[0])
    except DecodeError as exc:
        raise ConnectFailed(f"{conn.peer}: bad answer to our hello: {exc}") from None
    except ConnectFailed:
        raise
    except TransportError as exc:
        raise ConnectFailed(str(exc)) from None
    conn.push_back(bodies[1:])
    if isinstance(frame, Challenge):
        return frame
    if isinstance(frame, ErrorFrame):
        raise error_from_info(frame.code, f"{conn.peer} refused: {frame.message}")
    raise ConnectFailed(f"{conn.peer}: expected a challenge after our hello, got {frame}")


async def call(
    address: str,
    identity: Identity,
    method: str,
    payload: bytes,
    *,
    timeout: float,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    security: PeerSecurity | None = None,
) -> bytes:
    """Call `method` on the node at `address` (``"host:port"`` of its raft port).

    One connection: hello, one `Call`, wait for its `CallResult`, close. Returns the
    result's payload. Raises the `ClientError` subclass of an error answer (or of an
    error frame refusing our hello): `NotLeader` with ``.leader`` the leader's
    ``"host:port"`` (or None), `Unavailable`, `BadRequest`, `TooLarge`,
    `Unauthenticated`, `Timeout`, a plain `ClientError` with ``.code`` for a code we do
    not know; `ConnectFailed` (nothing was sent) or another `TransportError` (the
    request may have arrived) naming the address and the OS error; `Timeout` after
    `timeout` seconds. `security` defaults to `current_security()`.
    """
    security = security if security is not None else current_security()
    try:
        with trio.fail_after(timeout):
            conn, first = await _open(address, identity, security, max_frame_size)
            try:
                return await _call_on(conn, first + frame_bytes(Call(1, method, payload)))
            finally:
                await trio.aclose_forcefully(conn.stream)
    except trio.TooSlowError:
        raise Timeout(f"{method} to {address}: no answer within {timeout:g} s") from None


async def _call_on(conn: _Conn, request: bytes, call_id: int = 1) -> bytes:
    await conn.send(request)
    while True:
        try:
            bodies = await conn.receive_frames()
            if bodies is None:
                raise TransportError(f"{conn.peer}: connection closed before the answer")
            frames = [decode_frame(body) for body in bodies]
        except DecodeError as exc:
            raise TransportError(f"{conn.peer}: bad answer: {exc}") from exc
        for frame in frames:
            if isinstance(frame, CallResult) and frame.id == call_id:
                if frame.error is not None:
                    e = frame.error
                    raise error_from_info(e.code, e.message, e.leader)
                assert frame.payload is not None
                return frame.payload
            if isinstance(frame, ErrorFrame):
                raise error_from_info(frame.code, f"{conn.peer} refused: {frame.message}")
            raise TransportError(f"{conn.peer}: unexpected answer {frame}")


class CallPool:
    """`call`, reusing connections: each address keeps up to `idle_per_address` idle
    connections (one call at a time on each), so a node forwarding many requests to the
    leader does not open (and leave in TIME_WAIT) one connection per request.

    Errors are those of `call`. An error *answer* leaves the connection reusable; any
    other failure closes it. A pooled connection is checked before its reuse: one the
    peer closed in the meantime (it restarted) is dropped and a new one dialed. One the
    peer closes after that check fails the call with a `TransportError` (the request
    may have arrived: never `ConnectFailed`).
    """

    def __init__(
        self,
        identity: Callable[[], Identity],
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        idle_per_address: int = 8,
        security: PeerSecurity | None = None,
    ) -> None:
        self.identity = identity
        self.max_frame_size = max_frame_size
        self.idle_per_address = idle_per_address
        # Read once, here: a node builds its pool where its security is current.
        self.security = security if security is not None else current_security()
        self._idle: dict[str, list[tuple[_Conn, Identity]]] = {}
        self._ids = itertools.count(1)
        self.connects = 0

    async def call(self, address: str, method: str, payload: bytes, *, timeout: float) -> bytes:
        ident = self.identity()
        pooled = self._idle.get(address, [])
        conn: _Conn | None = None
        while pooled:
            conn, hello_ident = pooled.pop()
            if hello_ident == ident and not conn.looks_closed():
                break
            # our identity changed (hello again), or the peer closed it (it restarted:
            # a call sent there would be lost with an unknown outcome)
            await trio.aclose_forcefully(conn.stream)
            conn = None
        call_id = next(self._ids)
        frame = frame_bytes(Call(call_id, method, payload))
        keep = False
        try:
            with trio.fail_after(timeout):
                if conn is None:
                    conn, first = await _open(address, ident, self.security, self.max_frame_size)
                    self.connects += 1
                    frame = first + frame
                try:
                    result = await _call_on(conn, frame, call_id)
                except ClientError:
                    keep = True  # an answer: the connection is fine
                    raise
                keep = True
                return result
        except trio.TooSlowError:
            raise Timeout(f"{method} to {address}: no answer within {timeout:g} s") from None
        finally:
            if conn is not None:
                idle = self._idle.setdefault(address, [])
                if keep and len(idle) < self.idle_per_address:
                    idle.append((conn, ident))
                else:
                    await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn, _ in idle:
                await trio.aclose_forcefully(conn.stream)
        self._idle.clear()


@attrs.define
class PeerLinkStats:
    """Counters of a `PeerLink`."""

    sent: int = 0  #: messages written to a connection
    dropped: int = 0  #: messages refused (queue full, disconnected) or lost with a connection
    reconnects: int = 0  #: connections established after the first one
    batches: int = 0  #: writes (each carries one or more messages)
    sent_bytes: int = 0  #: bytes written
    send_failures: int = 0  #: writes that failed (their messages are dropped)
    connect_failures: int = 0  #: connection attempts that failed
    #: seconds each write carrying an append took, until the metrics take them (bounded)
    append_seconds: list[float] = attrs.Factory(list)


#: `PeerLinkStats.append_seconds` kept at most (the metrics drain it at each scrape).
MAX_APPEND_SAMPLES = 4096


@attrs.define
class RaftPortStats:
    """Counters of one `serve_raft` (the metrics read them)."""

    #: bytes of the frames received, by the dialer's node id ("0" before a hello)
    recv_bytes: dict[str, int] = attrs.Factory(dict)


class PeerLink:
    """The one outgoing connection to one peer, carrying raft messages one way.

    A bounded queue feeds a sender task (`run`) that connects, says hello (with the
    identity read at each connection: a joining node learns its cluster id late),
    and writes every queued message in one ``send_all`` (concatenated frames); on a
    plain TCP connection whose writer waits with nothing queued, `send_nowait` writes
    each frame itself (see there). When the
    connection fails it reconnects after a capped exponential backoff (`backoff_min`
    doubling to `backoff_max`, times a jitter in [0.5, 1) drawn from `rng`), re-reading
    `address` at each attempt (the peer's address can change; `reconnect_nowait`
    skips the wait). Raft tolerates loss, so nothing is buffered without bound:
    `send_nowait` drops a message when the queue is full or while disconnected (the
    queue is emptied when a connection is lost) and counts it in `stats`.

    A frame read back on the connection can only be an `ErrorFrame` (the peer refused
    our hello, e.g. another cluster): it is logged and the connection retried later.
    """

    def __init__(
        self,
        peer_id: int,
        address: Callable[[], str | None],
        identity: Callable[[], Identity],
        *,
        queue_size: int = 1024,
        rng: random.Random | None = None,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        connect_timeout: float = 2.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        security: PeerSecurity | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._address = address
        self._identity = identity
        self._security = security if security is not None else current_security()
        self._rng = rng if rng is not None else random.Random()
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._max_frame_size = max_frame_size
        # Messages, and the rest of a frame `send_nowait` wrote in part.
        self._send_channel, self._receive_channel = trio.open_memory_channel[Message | _Rest](queue_size)
        self.stats = PeerLinkStats()
        # Accept messages while connecting or connected; drop them while backing off.
        self._accepting = True
        self._connected = False
        self._state_changed = trio.Event()
        self._wake = trio.Event()
        self._connection_scope: trio.CancelScope | None = None
        self._connections = 0
        self._last_error: str | None = None
        # The socket's fd while the writer task waits for messages on a plain TCP
        # connection: `send_nowait` then writes a frame itself (see there).
        self._idle_fd: int | None = None

    def __repr__(self) -> str:
        return f"<PeerLink to {self.peer_id} {'up' if self._connected else 'down'} {self.stats}>"

    @property
    def flushed(self) -> bool:
        """Everything accepted so far is on the socket: the writer waits with nothing
        queued, on a plain TCP connection (so `send_nowait` writes the next frame)."""
        return self._idle_fd is not None

    @property
    def connected(self) -> bool:
        """True while a connection is up (hello sent)."""
        return self._connected

    def send_nowait(self, msg: Message) -> bool:
        """Queue `msg` for the peer; False (and counted in ``stats.dropped``) when the
        queue is full or the link is down."""
        if not self._accepting:
            self.stats.dropped += 1
            return False
        item: Message | _Rest = msg
        fd, self._idle_fd = self._idle_fd, None  # set again below once this frame is out whole
        if fd is not None:
            # The writer waits with nothing queued on a plain TCP connection: write
            # the frame now, from the caller (the raft loop), a pass of the event loop
            # before the writer task would (at one write in flight that pass is ~a
            # quarter of a write's latency), and the next frames too while each goes out
            # whole. Whatever the socket does not take, and every message after it
            # until the writer waits again, goes through the writer, in order, batched
            # as before.
            frame = self._encode(msg)
            if frame is None:
                self._idle_fd = fd  # nothing written, nothing queued
                return False
            started = trio.current_time()
            try:
                n = _write_fd(fd, frame)
            except OSError:  # full (BlockingIOError) or broken: the writer finds out
                n = 0
            self.stats.sent_bytes += n
            is_append = isinstance(msg, AppendRequest)
            if n == len(frame):
                # Still nothing queued and the writer still waits: so may the next frame.
                self._idle_fd = fd
                self.stats.sent += 1
                self.stats.batches += 1
                if is_append and len(self.stats.append_seconds) < MAX_APPEND_SAMPLES:
                    self.stats.append_seconds.append(trio.current_time() - started)
                return True
            item = _Rest(frame[n:], is_append)
        try:
            self._send_channel.send_nowait(item)
        except trio.WouldBlock:
            self.stats.dropped += 1
            return False
        return True

    def reconnect_nowait(self) -> None:
        """Drop the current connection (if any) and connect again without backoff,
        re-reading the address: call it when the peer's address changed."""
        self._idle_fd = None  # the writer may be cancelled before it runs again
        if self._connection_scope is not None:
            self._connection_scope.cancel()
        self._wake.set()

    async def wait_connected(self) -> None:
        """Return once a connection is up."""
        while not self._connected:
            await self._state_changed.wait()

    async def wait_disconnected(self) -> None:
        """Return once no connection is up."""
        while self._connected:
            await self._state_changed.wait()

    def _set_state(self, *, accepting: bool, connected: bool) -> None:
        self._accepting = accepting
        if connected != self._connected:
            self._connected = connected
            self._state_changed.set()
            self._state_changed = trio.Event()

    def _drop_queued(self) -> None:
        while True:
            try:
                self._receive_channel.receive_nowait()
            except trio.WouldBlock:
                return
            self.stats.dropped += 1

    async def run(self) -> NoReturn:
        """The sender task: connect, send, reconnect, forever (cancel it to stop)."""
        failures = 0
        node_id = self._identity().node_id
        while True:
            self._wake = trio.Event()
            self._set_state(accepting=True, connected=False)
            started_at = trio.current_time()
            error: str | None = None
            try:
                error = await self._run_connection()
            finally:
                self._set_state(accepting=False, connected=False)
                self._drop_queued()
            if self._wake.is_set():
                failures = 0
            elif trio.current_time() - started_at >= self._backoff_max:
                failures = 0  # the link was up for a while: retry quickly
            if error is not None and error != self._last_error:
                log.warning("%d link to %d: %s", node_id, self.peer_id, error)
            elif error is not None:
                log.debug("%d link to %d: %s", node_id, self.peer_id, error)
            self._last_error = error
            delay = min(self._backoff_max, self._backoff_min * 2**failures)
            delay *= self._rng.uniform(0.5, 1.0)
            failures = min(failures + 1, 30)
            with trio.move_on_after(delay):
                await self._wake.wait()

    async def _run_connection(self) -> str | None:
        """One connection, until it fails (returns why) or `reconnect_nowait` (None)."""
        address = self._address()
        if address is None:
            return "no address known"
        with trio.CancelScope() as scope:
            self._connection_scope = scope
            try:
                conn, first = await _open(
                    address, self._identity(), self._security, self._max_frame_size,
                    timeout=self._connect_timeout, peer_id=self.peer_id,
                )
            except (TransportError, ClientError) as exc:
                self.stats.connect_failures += 1
                return str(exc)
            stream = conn.stream
            try:
                await conn.send(first)
                if self._connections:
                    self.stats.reconnects += 1
                self._connections += 1
                self._set_state(accepting=True, connected=True)
                if self._last_error is not None:
                    log.info("%d link to %d: connected to %s", self._identity().node_id,
                             self.peer_id, address)
                    self._last_error = None
                return await self._serve_connection(conn)
            except TransportError as exc:
                return str(exc)
            finally:
                self._connection_scope = None
                await trio.aclose_forcefully(stream)
        return None  # cancelled by reconnect_nowait

    async def _serve_connection(self, conn: _Conn) -> str:
        """Write queued messages and watch for an error frame until the connection ends."""
        reason: list[str] = []

        async def watch(cancel_scope: trio.CancelScope) -> None:
            try:
                reason.append(await self._read_error(conn))
            except TransportError as exc:
                reason.append(str(exc))
            self._idle_fd = None  # the connection ends: no more direct writes on it
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await self._write_loop(conn)
            except TransportError as exc:
                reason.append(str(exc))
            nursery.cancel_scope.cancel()
        return reason[0] if reason else "connection ended"

    async def _read_error(self, conn: _Conn) -> str:
        """Why the peer ended the connection: its error frame, or how it closed."""
        while True:
            try:
                bodies = await conn.receive_frames()
                if bodies is None:
                    return f"{conn.peer} closed the connection"
                frames = [decode_frame(body) for body in bodies]
            except DecodeError as exc:
                return f"{conn.peer} sent a bad frame: {exc}"
            for frame in frames:
                if isinstance(frame, ErrorFrame):
                    return f"{conn.peer} refused us: {frame.code}: {frame.message}"
                return f"{conn.peer} sent an unexpected {frame}"

    async def _write_loop(self, conn: _Conn) -> NoReturn:
        """Send what is queued, all of it in one write (up to `_MAX_BATCH_BYTES`)."""
        receive = self._receive_channel
        fd = conn.stream.socket.fileno() if isinstance(conn.stream, trio.SocketStream) else None
        while True:
            try:
                msg = receive.receive_nowait()
            except trio.WouldBlock:
                self._idle_fd = fd  # only with nothing queued: frames stay in order
                try:
                    msg = await receive.receive()
                finally:
                    self._idle_fd = None
            parts: list[bytes] = []
            size = 0
            appends = False
            while True:
                if isinstance(msg, _Rest):
                    appends = appends or msg.append
                    frame: bytes | None = msg.data
                else:
                    appends = appends or isinstance(msg, AppendRequest)
                    frame = self._encode(msg)
                if frame is not None:
                    parts.append(frame)
                    size += len(frame)
                if size >= _MAX_BATCH_BYTES:
                    break
                try:
                    msg = receive.receive_nowait()
                except trio.WouldBlock:
                    break
            if not parts:
                continue
            data = b"".join(parts)
            started = trio.current_time()
            try:
                await conn.send(data)
            except TransportError:
                self.stats.dropped += len(parts)
                self.stats.send_failures += 1
                raise
            self.stats.sent += len(parts)
            self.stats.batches += 1
            self.stats.sent_bytes += len(data)
            if appends and len(self.stats.append_seconds) < MAX_APPEND_SAMPLES:
                self.stats.append_seconds.append(trio.current_time() - started)

    def _encode(self, msg: Message) -> bytes | None:
        """The frame of `msg`, or None (dropped and logged: a bug of ours)."""
        try:
            body = encode_message(msg)
        except EncodeError:
            log.exception("%d link to %d: cannot encode %s", self._identity().node_id,
                          self.peer_id, msg)
            self.stats.dropped += 1
            return None
        if len(body) > self._max_frame_size:
            log.error("%d link to %d: %s is %d bytes, over the frame limit %d: dropped",
                      self._identity().node_id, self.peer_id, msg, len(body),
                      self._max_frame_size)
            self.stats.dropped += 1
            return None
        return encode_frame(body)
