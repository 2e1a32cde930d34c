"""The async client (contract §6) of the client protocol (docs/reference/client-protocol.md).

One WebSocket at a time to `ws://ADDRESS/v1`; a reader task hands each reply to the
request waiting for its `id`, so any number of requests share the socket.

Failover rules (docs/guide/client.md):
- `connect()` tries the addresses in order and keeps the first that answers.
- Every request has a deadline, `timeout` seconds after it was made.
- No connection, or the connection broke before the request went out: connect to the
  next address (round robin, a short backoff after each full round) and send it there;
  at the deadline raise `Unavailable` naming every address tried and its error.
- `not_leader` with a leader address: send the next requests to that address (the old
  socket closes once its requests are answered) and retry this one there; without an
  address: wait a little and retry; at most `MAX_REDIRECTS` times per request.
- The connection broke after the request went out: a read is sent again elsewhere; a
  write (upsert, delete, txn) raises `Timeout` saying that its outcome is unknown, and
  is never sent again. No reply by the deadline: `Timeout` as well (a write's says
  its outcome is unknown), and the next request opens a socket to the next address.
- The server's `unavailable` (no leader now) is retried for reads until the deadline and
  raised for writes; every other error code is raised as its `MetaError` subclass.
"""

from __future__ import annotations

import builtins
import itertools
import logging
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import msgpack
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
)
from wsproto import ConnectionType, WSConnection

from metanode.client.errors import (
    BadRequest,
    HistoryCompacted,
    MetaError,
    NotLeader,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    error_from_wire,
)
from metanode import wsfast
from metanode.trio_util import single_errors

log = logging.getLogger("metanode.client")

PATH = "/v1"
MAX_REDIRECTS = 5
# Replies are not bounded by the server's request limit (a `list` may be large).
MAX_REPLY_SIZE = 1 << 30
MESSAGE_QUEUE_SIZE = 256
# One message carries queued requests up to this size (array header included). A
# server whose grpc_api_max_message_size is lower answers such a batch too_large:
# each of its requests is then sent again alone (nothing of it was done).
SEND_BATCH_BYTES = 256 << 10


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of `n` items (the items are packed already)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _fit(outbox: list[tuple[bytes, Any]], room: int) -> int:
    """How many queued requests from the front fit in `room` bytes (at least one); a
    request to be sent alone (`solo`) goes in a message of its own."""
    n, size = 0, 0
    for packed, waiter in outbox:
        if n and (size + len(packed) > room or waiter.solo):
            break
        if waiter.solo:
            return 1
        n += 1
        size += len(packed)
    return n


CONSISTENCIES = ("linearizable", "local")
WATCH_FILTERS = ("all", "update", "delete")
# Live events a watch buffers for a caller that does not read; past it the watch stops
# buffering, cancels that stream, and resumes from the last revision the caller got.
WATCH_BUFFER = 10_000


# ---------------------------------------------------------------------- wire shapes
@attrs.frozen
class SeqV:
    """A value with its sequence number; `expire_at_ms` when it has a TTL."""

    seq: int
    data: bytes
    expire_at_ms: int | None = None

    @classmethod
    def from_wire(cls, v: Any) -> SeqV | None:
        """`{"seq", "data", "meta": {"expire_at_ms"} | null}` or null."""
        if v is None:
            return None
        try:
            meta = v["meta"]
            expire = None if meta is None else meta.get("expire_at_ms")
            seq, data = v["seq"], v["data"]
        except (KeyError, TypeError, AttributeError):
            raise MetaError(f"malformed SeqV in a reply: {v!r}") from None
        if not _is_int(seq) or not isinstance(data, bytes) or not (expire is None or _is_int(expire)):
            raise MetaError(f"malformed SeqV in a reply: {v!r}")
        return cls(seq, data, expire)


@attrs.frozen
class Change:
    """An upsert's or delete's effect: the value before and after. On a `match_seq`
    mismatch nothing changed and `prev == result`."""

    prev: SeqV | None
    result: SeqV | None

    @property
    def changed(self) -> bool:
        return self.prev != self.result

    @classmethod
    def from_wire(cls, v: Any) -> Change:
        if not isinstance(v, dict) or "prev" not in v or "result" not in v:
            raise MetaError(f"malformed change in a reply: {v!r}")
        return cls(SeqV.from_wire(v["prev"]), SeqV.from_wire(v["result"]))


# The SeqV fields of each kind of txn response.
_TXN_SEQV_FIELDS = {"put": ("prev", "result"), "delete": ("prev", "result"), "get": ("value",)}


@attrs.frozen
class TxnReply:
    """`success` says which branch ran; `responses` has one map per op of that branch,
    shaped as on the wire with its SeqV maps decoded: `{"put": {key, prev, result}}`,
    `{"get": {key, value}}`, `{"delete": {key, prev, result}}`,
    `{"delete_by_prefix": {prefix, count}}` (others are kept as sent)."""

    success: bool
    responses: builtins.list[dict[str, Any]] = attrs.field(factory=builtins.list)

    @classmethod
    def from_wire(cls, v: Any) -> TxnReply:
        if not isinstance(v, dict) or not isinstance(v.get("success"), bool):
            raise MetaError(f"malformed txn reply: {v!r}")
        responses = v.get("responses") or []
        if not isinstance(responses, builtins.list):
            raise MetaError(f"malformed txn reply: {v!r}")
        return cls(v["success"], [_txn_response(r) for r in responses])


def _txn_response(r: Any) -> Any:
    if not isinstance(r, dict) or len(r) != 1:
        return r
    ((kind, body),) = r.items()
    fields = _TXN_SEQV_FIELDS.get(kind)
    if fields is None or not isinstance(body, dict):
        return r
    return {kind: {k: SeqV.from_wire(x) if k in fields else x for k, x in body.items()}}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def encode_match_seq(match_seq: Any) -> dict[str, int] | None:
    """None (any), n (exactly seq n; 0 = only if absent), `{"exact": n}` or `{"ge": n}`."""
    if match_seq is None:
        return None
    if _is_int(match_seq):
        kind, n = "exact", match_seq
    elif isinstance(match_seq, Mapping) and len(match_seq) == 1:
        ((kind, n),) = match_seq.items()
        if kind not in ("exact", "ge") or not _is_int(n):
            raise ValueError(f'match_seq must be None, an int, {{"exact": n}} or {{"ge": n}}, got {match_seq!r}')
    else:
        raise TypeError(f'match_seq must be None, an int, {{"exact": n}} or {{"ge": n}}, got {match_seq!r}')
    if n < 0:
        raise ValueError(f"match_seq must not be negative, got {match_seq!r}")
    return {kind: n}


def _key(key: Any, name: str = "key") -> str:
    if not isinstance(key, str):
        raise TypeError(f"{name} must be a str, got {type(key).__name__}")
    return key


def _value(value: Any) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"value must be bytes, got {type(value).__name__}")
    return value


def _consistency(consistency: str) -> str:
    if consistency not in CONSISTENCIES:
        raise ValueError(f'consistency must be "linearizable" or "local", got {consistency!r}')
    return consistency


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"an address must be host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _describe_close(reason: CloseReason | None) -> str:
    if reason is None:
        return "connection closed"
    text = f"connection closed ({reason.code} {reason.name}"
    return text + (f": {reason.reason})" if reason.reason else ")")


def _describe_connect_error(e: BaseException | None, timeout: float) -> str:
    if e is None:
        return "the connection closed during the WebSocket handshake"
    if isinstance(e, ConnectionTimeout):
        return f"no WebSocket handshake within {timeout:g} s"
    if isinstance(e, ConnectionRejected):
        return f"WebSocket handshake rejected with HTTP {e.status_code}"
    # HandshakeError from OSError("all attempts to connect to h:p failed") from the
    # attempts' own errors (one, or a group): the first of those says why.
    for _ in range(5):
        cause = e.__cause__
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        if cause is None or not (isinstance(e, HandshakeError) or "all attempts to connect" in str(e)):
            break
        e = cause
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class _TLSFailed(OSError):
    """The TLS handshake failed (its text says why); the stream is closed."""


async def _start_tls(stream: trio.SocketStream, context: ssl.SSLContext, host: str) -> trio.SSLStream[Any]:
    tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as e:
        await trio.aclose_forcefully(tls)
        raise _TLSFailed(f"TLS handshake failed: {e.__cause__ or e}") from None
    return tls


async def _wait_any(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


# ---------------------------------------------------------------------- one socket
class _Waiter:
    __slots__ = ("batched", "deadline", "done", "expired", "lost", "reply", "solo", "unsent")

    def __init__(self, deadline: float = math.inf) -> None:
        self.done = trio.Event()
        self.deadline = deadline  # `MetaClient._expire_calls` ends the wait then
        self.expired = False  # it did
        self.reply: dict | None = None
        self.lost: str | None = None  # why the socket ended before the reply
        self.unsent = False  # the socket ended before the request went out: retry it
        self.solo = False  # send it alone (a batch it was in was too large for the server)
        self.batched = False  # it went out together with other requests


class _Conn:
    """One WebSocket; its task (`MetaClient._run_conn`) reads replies until it ends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ws: WebSocketConnection | None = None
        self.waiters: dict[int, _Waiter] = {}
        self.streams: dict[int, _Stream] = {}  # watches in progress on this socket
        self.lost: str | None = None  # set once the socket ended
        self.retiring = False  # takes no new requests; closes when its requests are answered
        self.close_requested = trio.Event()
        self.ended = trio.Event()
        self.reader_done = trio.Event()  # trio-websocket's reader task ended
        self.reader_error: BaseException | None = None
        # Requests queued since the last send: the sender task sends them all as one
        # message (an array), so many concurrent callers cost one message each way.
        self.outbox: list[tuple[bytes, _Waiter]] = []
        self.outbox_ready = trio.Event()

    def send_nowait(self, packed: bytes, waiter: _Waiter) -> None:
        """Queue `packed` for the sender task; or, alone in flight (nothing queued,
        no other request waiting: nothing to batch it with), write it at once
        (`wsfast.send_now`), a task switch earlier."""
        if not self.outbox and len(self.waiters) == 1 and self.ws is not None and wsfast.send_now(self.ws, packed):
            return
        self.outbox.append((packed, waiter))
        self.outbox_ready.set()

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.retiring and not self.close_requested.is_set()

    def retire(self) -> None:
        self.retiring = True
        if not self.waiters:
            self.close_requested.set()


class _Backoff:
    def __init__(self, first: float = 0.05, most: float = 1.0) -> None:
        self.next_s = first
        self.most = most

    async def sleep(self) -> None:
        await trio.sleep(self.next_s)
        self.next_s = min(self.most, self.next_s * 2)

    async def sleep_until(self, deadline: float) -> bool:
        """`sleep`, cut short at `deadline`: False if it was."""
        with trio.move_on_at(deadline):
            await self.sleep()
            return True
        return False


# ---------------------------------------------------------------------- the client
class MetaClient:
    """Use `MetaClient.connect(addresses, token=None, timeout=10, tls=None)`."""

    def __init__(
        self, nursery: trio.Nursery, addresses: Iterable[str], token: str | None, timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if isinstance(addresses, str):
            raise TypeError(f"addresses must be a list of host:port, got the str {addresses!r}")
        self._addresses = builtins.list(dict.fromkeys(addresses))
        if not self._addresses:
            raise ValueError("MetaClient needs at least one address")
        for a in self._addresses:
            split_address(a)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._nursery = nursery
        self._token = token
        self._tls = tls  # wss:// (docs/guide/client.md#tls)
        self._timeout = float(timeout)
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._conns: set[_Conn] = set()
        self._connect_lock = trio.Lock()
        self._cursor = 0  # round robin position in _addresses
        self._preferred: str | None = None  # a leader some server named
        self._connect_errors: dict[str, str] = {}  # of the attempts since the last success
        self._closed = False
        # `_expire_calls`: no waiting request has an earlier deadline; set when lowered.
        self._due = math.inf
        self._due_moved = trio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, addresses: Iterable[str], token: str | None = None, timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[MetaClient]:
        """Connect to the first of `addresses` that answers (each `host:port` of a
        node's `grpc_api_address`); `timeout` bounds the connect and every request.
        With `tls` every socket is ``wss://``: TLS with that context, the server's
        certificate checked as the context says (by default its CA and host name)."""
        # The background tasks never raise: a group holds the body's own error.
        async with single_errors(), trio.open_nursery() as nursery:
            client = cls(nursery, addresses, token, timeout, tls=tls)
            nursery.start_soon(client._expire_calls)
            try:
                await client._connect_first()
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()

    @property
    def address(self) -> str | None:
        """The address of the current connection, if any."""
        return self._conn.address if self._conn is not None and self._conn.usable else None

    @property
    def addresses(self) -> builtins.list[str]:
        """The addresses it may use: those given, then leaders the servers named."""
        return builtins.list(self._addresses)

    async def aclose(self) -> None:
        """Close the socket(s) (waiting at most 1 s for the close handshake)."""
        self._closed = True
        conns = builtins.list(self._conns)
        for conn in conns:
            conn.close_requested.set()
        with trio.move_on_after(2):
            for conn in conns:
                await conn.ended.wait()
        self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ operations
    async def upsert(
        self,
        key: str,
        value: bytes | None,
        match_seq: int | Mapping[str, int] | None = None,
        ttl_ms: int | None = None,
        expire_at_ms: int | None = None,
    ) -> Change:
        """Set `key` to `value` (None deletes it) when `match_seq` matches its seq."""
        args: dict[str, Any] = {
            "key": _key(key),
            "value": None if value is None else _value(value),
            "match_seq": encode_match_seq(match_seq),
        }
        if ttl_ms is not None:
            args["ttl_ms"] = ttl_ms
        if expire_at_ms is not None:
            args["expire_at_ms"] = expire_at_ms
        return Change.from_wire(await self._call("upsert", args, write=True, what=f"upsert {key!r}"))

    async def delete(self, key: str, match_seq: int | Mapping[str, int] | None = None) -> Change:
        """Delete `key` when `match_seq` matches; `result` is None when it was deleted."""
        args = {"key": _key(key), "value": None, "match_seq": encode_match_seq(match_seq)}
        return Change.from_wire(await self._call("upsert", args, write=True, what=f"delete {key!r}"))

    async def get(self, key: str, consistency: str = "linearizable") -> SeqV | None:
        args = {"key": _key(key), "consistency": _consistency(consistency)}
        return SeqV.from_wire(await self._call("get", args, write=False, what=f"get {key!r}"))

    async def mget(self, keys: Iterable[str], consistency: str = "linearizable") -> builtins.list[SeqV | None]:
        args = {"keys": [_key(k, "keys") for k in keys], "consistency": _consistency(consistency)}
        result = await self._call("mget", args, write=False)
        if not isinstance(result, builtins.list) or len(result) != len(args["keys"]):
            raise MetaError(f"malformed mget reply: {result!r}")
        return [SeqV.from_wire(v) for v in result]

    async def txn(
        self,
        conditions: Iterable[Mapping[str, Any]] = (),
        if_then: Iterable[Mapping[str, Any]] = (),
        else_then: Iterable[Mapping[str, Any]] = (),
    ) -> TxnReply:
        """One atomic transaction; the conditions and ops are sent as given (contract §5)."""
        args = {
            "conditions": [dict(c) for c in conditions],
            "if_then": [dict(op) for op in if_then],
            "else_then": [dict(op) for op in else_then],
        }
        return TxnReply.from_wire(await self._call("txn", args, write=True, what="txn"))

    async def member_list(self) -> builtins.list[str]:
        """The client addresses the members publish."""
        result = await self._call("member_list", {}, write=False)
        if not isinstance(result, builtins.list) or not all(isinstance(a, str) for a in result):
            raise MetaError(f"malformed member_list reply: {result!r}")
        return result

    async def cluster_status(self) -> dict[str, Any]:
        """The status of the node it is connected to, as `GET /v1/cluster/status`."""
        result = await self._call("cluster_status", {}, write=False)
        if not isinstance(result, dict):
            raise MetaError(f"malformed cluster_status reply: {result!r}")
        return result

    async def list(
        self, prefix: str, limit: int | None = None, consistency: str = "linearizable"
    ) -> builtins.list[tuple[str, SeqV]]:
        """The keys starting with `prefix` in key order, at most `limit` of them."""
        args: dict[str, Any] = {"prefix": _key(prefix, "prefix"), "consistency": _consistency(consistency)}
        if limit is not None:
            args["limit"] = limit
        result = await self._call("list", args, write=False)
        items: builtins.list[tuple[str, SeqV]] = []
        for item in result if isinstance(result, builtins.list) else [None]:
            if not isinstance(item, builtins.list) or len(item) != 2 or not isinstance(item[0], str):
                raise MetaError(f"malformed list reply: {result!r}")
            seqv = SeqV.from_wire(item[1])
            if seqv is None:
                raise MetaError(f"malformed list reply: {result!r}")
            items.append((item[0], seqv))
        return items

    @asynccontextmanager
    async def watch(
        self,
        key: str,
        key_end: str | None = None,
        filter: str = "all",
        initial_flush: bool = False,
        from_seq: int | None = None,
        consistency: str = "linearizable",
    ) -> AsyncIterator[Watch]:
        """Watch `key`, or the range `[key, key_end)`: `async for ev in w` yields a
        `WatchEvent` per change, in order, resuming across lost sockets (docs/guide/client.md).

        `filter` "update" yields only changes with a `current`, "delete" only removals.
        `initial_flush` first yields the current value of every watched key (`init=True`),
        then `w.flushed` is set. `from_seq` starts after that revision (not with
        `initial_flush`). Entering the `async with` returns once the watch is registered
        (with neither option: any change made after it is seen); leaving it cancels it."""
        watch = Watch(self, _key(key), key_end, filter, initial_flush, from_seq, _consistency(consistency))
        try:
            await watch._establish()
            yield watch
        finally:
            with trio.CancelScope(shield=True):
                await watch.aclose()

    # ------------------------------------------------------------------ requests
    async def _call(self, op: str, args: dict[str, Any], *, write: bool, what: str | None = None) -> Any:
        """Send one request and return its `ok`, following the failover rules above.

        The deadline ends the wait for the reply through `_expire_calls`, not a
        CancelScope around it (trio's costs more than the rest of a call's own work,
        docs/architecture/stack.md); the rarer waits (connect, backoff) have one."""
        if self._closed:
            raise MetaError("the client is closed")
        what = what or op
        request = dict(args, op=op)
        deadline = trio.current_time() + self._timeout
        errors: dict[str, str] = {}
        redirects = losses = 0
        backoff = _Backoff()
        stage = "connect"
        conn: _Conn | None = None
        waiter: _Waiter | None = None
        solo = False  # once a batch it was in came back too_large
        while True:
            stage = "connect"
            conn = self._conn
            if conn is None or not conn.usable:
                conn = None
                with trio.move_on_at(deadline):
                    conn = await self._connection(errors)
                if conn is None:
                    break
            elif trio.current_time() >= deadline:  # (after a retry without a wait)
                break
            rid = next(self._ids)
            request["id"] = rid
            message = msgpack.packb(request, use_bin_type=True)
            waiter = _Waiter(deadline)
            waiter.solo = solo
            conn.waiters[rid] = waiter
            if deadline < self._due:
                self._due = deadline
                self._due_moved.set()
            stage = "reply"
            try:
                conn.send_nowait(message, waiter)
                await waiter.done.wait()
            finally:
                conn.waiters.pop(rid, None)
                if conn.retiring and not conn.waiters:
                    conn.close_requested.set()
            if waiter.expired:
                break
            if waiter.unsent:
                # The socket ended before our message went out: the server never
                # saw it, so even a write may be sent again.
                assert waiter.lost is not None
                errors[conn.address] = waiter.lost
                continue
            if waiter.lost is not None:
                if write:
                    raise Timeout(
                        f"{what}: the connection to {conn.address} was lost after the request was sent"
                        f" ({waiter.lost}); the outcome is unknown (it may or may not have been applied)"
                    )
                errors[conn.address] = waiter.lost
                losses += 1
                if losses > 1:  # not on the first: failover should be quick
                    stage = "backoff"
                    if not await backoff.sleep_until(deadline):
                        break
                continue
            reply = waiter.reply
            assert reply is not None
            if "ok" in reply:
                return reply["ok"]
            exc = error_from_wire(reply.get("error"), conn.address)
            if isinstance(exc, TooLarge) and waiter.batched and not solo:
                # The message it shared with others was over the server's limit;
                # nothing of it was done: alone, it may fit.
                solo = True
                continue
            if isinstance(exc, NotLeader) and redirects < MAX_REDIRECTS:
                redirects += 1
                leader = exc.leader if isinstance(exc.leader, str) else None
                if not (leader is not None and leader != conn.address and self._redirect(conn, leader)):
                    stage = "backoff"
                    errors[conn.address] = str(exc)
                    if not await backoff.sleep_until(deadline):
                        break
                continue
            if isinstance(exc, Unavailable) and not write:
                errors[conn.address] = str(exc)
                stage = "backoff"
                if not await backoff.sleep_until(deadline):
                    break
                continue
            raise exc
        # The deadline passed.
        if stage in ("connect", "backoff"):
            raise self._unavailable(errors, what)
        assert conn is not None and waiter is not None
        if waiter.reply is not None:  # it came with the deadline: no more retries
            if "ok" in waiter.reply:
                return waiter.reply["ok"]
            raise error_from_wire(waiter.reply.get("error"), conn.address)
        # A node that does not answer may hang (stopped, partitioned): the next requests
        # go to a fresh socket, starting at the next address.
        if conn.usable:
            if self._conn is conn:
                self._conn = None
                self._cursor = (self._addresses.index(conn.address) + 1) % len(self._addresses)
            conn.retire()
        if write:
            raise Timeout(
                f"{what}: no reply from {conn.address} within {self._timeout:g} s; the outcome is unknown"
                " (it may or may not have been applied)"
            )
        raise Timeout(f"{what}: no reply from {conn.address} within {self._timeout:g} s")

    async def _expire_calls(self) -> None:
        """End the wait of every request whose deadline passed (`_call`). It sleeps
        until `_due`, no later than the earliest deadline of a waiting request, then
        looks at the requests waiting then: one wake-up per `timeout` or so, however
        many requests came and went meanwhile."""
        while True:
            with trio.move_on_at(self._due):
                await self._due_moved.wait()
            self._due_moved = trio.Event()
            now = trio.current_time()
            due = math.inf
            for conn in self._conns:
                for waiter in conn.waiters.values():
                    if waiter.deadline <= now:
                        if not waiter.done.is_set():
                            waiter.expired = True
                            waiter.done.set()
                    elif waiter.deadline < due:
                        due = waiter.deadline
            self._due = due

    def _unavailable(self, errors: dict[str, str], what: str) -> Unavailable:
        # Another request may have been the one connecting: its errors tell as much.
        errors = errors or self._connect_errors
        tried = "; ".join(f"{a}: {e}" for a, e in errors.items()) or "no attempt finished"
        return Unavailable(f"{what}: no metanode answered within {self._timeout:g} s (tried {tried})")

    def _redirect(self, conn: _Conn, leader: str) -> bool:
        """Send the next requests to `leader`; `conn` closes once its requests are done."""
        try:
            split_address(leader)
        except ValueError:
            return False
        if leader not in self._addresses:
            self._addresses.append(leader)
        self._preferred = leader
        if self._conn is conn:
            self._conn = None
        conn.retire()
        return True

    async def _connect_first(self) -> None:
        errors: dict[str, str] = {}
        with trio.move_on_after(self._timeout):
            await self._connection(errors)
            return
        raise self._unavailable(errors, "connect")

    async def _connection(self, errors: dict[str, str]) -> _Conn:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            self._conn = None
            backoff = _Backoff()
            while True:
                for address in self._candidates():
                    try:
                        conn = await self._open(address)
                    except _ConnectFailed as e:
                        errors[address] = self._connect_errors[address] = str(e)
                        if self._preferred == address:
                            self._preferred = None
                        else:
                            self._cursor = (self._addresses.index(address) + 1) % len(self._addresses)
                        continue
                    self._preferred = None
                    self._cursor = self._addresses.index(address)
                    self._connect_errors.clear()
                    self._conn = conn
                    return conn
                await backoff.sleep()

    def _candidates(self) -> builtins.list[str]:
        order = self._addresses[self._cursor :] + self._addresses[: self._cursor]
        if self._preferred is not None:
            order = [self._preferred] + [a for a in order if a != self._preferred]
        return order

    async def _open(self, address: str) -> _Conn:
        """A new socket to `address`, past the handshake when a token is set."""
        if self._closed:
            raise MetaError("the client is closed")
        conn = _Conn(address)
        connect_timeout = min(self._timeout, max(1.0, self._timeout / len(self._addresses)))
        await self._nursery.start(partial(self._run_conn, conn, connect_timeout))  # or _ConnectFailed
        if self._token is None:
            return conn
        rid = next(self._ids)
        waiter = _Waiter()
        conn.waiters[rid] = waiter
        try:
            assert conn.ws is not None
            await conn.ws.send_message(
                msgpack.packb({"id": rid, "op": "handshake", "token": self._token}, use_bin_type=True)
            )
            await waiter.done.wait()
        except ConnectionClosed as e:
            raise _ConnectFailed(f"handshake: {_describe_close(e.reason)}") from None
        finally:
            conn.waiters.pop(rid, None)
        if waiter.lost is not None:
            raise _ConnectFailed(f"handshake: {waiter.lost}")
        assert waiter.reply is not None
        if "ok" not in waiter.reply:
            conn.close_requested.set()
            exc = error_from_wire(waiter.reply.get("error"), address)
            if isinstance(exc, Unauthenticated):
                raise exc
            raise _ConnectFailed(f"handshake: {exc}")
        return conn

    async def _run_conn(
        self, conn: _Conn, connect_timeout: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the socket, then read replies until it ends. A failure before `started`
        is raised to `_open` as `_ConnectFailed`; after it nothing escapes (the waiters
        learn why the socket ended). The TCP stream is closed on every path.

        Not `open_websocket`: it leaks the TCP socket when the connect is cancelled or
        the server drops it during the handshake (and then waits for its timeout)."""
        host, port = split_address(conn.address)
        stream: trio.abc.Stream | None = None
        failure: str | None = None  # why it failed before `started`
        reason = "closed by the client"
        self._conns.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                ws: WebSocketConnection | None = None
                try:
                    with trio.fail_after(connect_timeout):
                        stream = await trio.open_tcp_stream(host, port)
                        if self._tls is not None:
                            stream = await _start_tls(stream, self._tls, host)
                        ws = WebSocketConnection(
                            stream, WSConnection(ConnectionType.CLIENT), host=conn.address, path=PATH,
                            message_queue_size=MESSAGE_QUEUE_SIZE, max_message_size=MAX_REPLY_SIZE,
                            receive_buffer_size=None,
                        )  # fmt: skip
                        # Replies are dispatched in trio-websocket's reader task (a task
                        # switch less per reply than through `get_message`).
                        wsfast.deliver_to(ws, partial(self._received, conn))
                        nursery.start_soon(self._ws_reader, conn, ws)
                        await _wait_any(ws._open_handshake, conn.reader_done)
                    if not ws._open_handshake.is_set():
                        failure = _describe_connect_error(conn.reader_error, connect_timeout)
                except trio.TooSlowError:
                    failure = f"no connection within {connect_timeout:g} s"
                except OSError as e:
                    failure = _describe_connect_error(e, connect_timeout)
                if failure is not None or ws is None:
                    nursery.cancel_scope.cancel()
                else:
                    conn.ws = ws
                    wsfast.adopt(ws, nursery)  # for `_Conn.send_nowait`
                    task_status.started()
                    nursery.start_soon(self._closer, conn, ws, nursery.cancel_scope)
                    nursery.start_soon(self._sender, conn, ws)
                    try:
                        while True:  # (with the sink: only the end comes here)
                            self._dispatch(conn, await ws.get_message())
                    except ConnectionClosed as e:
                        if not conn.close_requested.is_set():
                            reason = conn.lost or _describe_close(e.reason)
                    nursery.cancel_scope.cancel()
        except Exception as e:  # trio-websocket's own; never seen
            if conn.ws is None:
                failure = f"{type(e).__name__}: {e}"
            reason = f"{type(e).__name__}: {e}"
        finally:
            self._end_conn(conn, failure or reason)
            if stream is not None:
                # (bounded: a TLS stream sends its close_notify; cancelled, it just closes)
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.aclose()
        if failure is not None:
            raise _ConnectFailed(failure)

    async def _ws_reader(self, conn: _Conn, ws: WebSocketConnection) -> None:
        try:
            await ws._reader_task()
        except Exception as e:  # ConnectionRejected during the handshake, and the like
            conn.reader_error = e
            if ws.closed is None:
                conn.lost = conn.lost or f"{type(e).__name__}: {e}"
        finally:
            conn.reader_done.set()

    async def _sender(self, conn: _Conn, ws: WebSocketConnection) -> None:
        """Send what callers queued, everything since the last send as one message (a
        msgpack array of the requests, each packed once), up to SEND_BATCH_BYTES."""
        while True:
            await conn.outbox_ready.wait()
            conn.outbox_ready = trio.Event()
            while conn.outbox:
                take = _fit(conn.outbox, SEND_BATCH_BYTES - 5)  # 5: the array header at most
                batch = conn.outbox[:take]
                if len(batch) > 1:
                    for _, waiter in batch:
                        waiter.batched = True
                del conn.outbox[:take]
                data = batch[0][0] if len(batch) == 1 else _array_header(len(batch)) + b"".join(p for p, _ in batch)
                try:
                    await wsfast.send_message(ws, data)
                except ConnectionClosed as e:
                    # A message is written whole or not at all (a failed write breaks
                    # the socket before its end): the server never saw these.
                    reason = conn.lost or _describe_close(e.reason)
                    for _, waiter in batch + conn.outbox:
                        waiter.unsent = True
                        waiter.lost = reason
                        waiter.done.set()
                    conn.outbox.clear()
                    conn.close_requested.set()
                    return

    async def _closer(self, conn: _Conn, ws: WebSocketConnection, reader: trio.CancelScope) -> None:
        await conn.close_requested.wait()
        with trio.move_on_after(1):
            await ws.aclose()
        reader.cancel()

    async def _received(self, conn: _Conn, raw: bytes | str) -> None:
        self._dispatch(conn, raw)

    def _dispatch(self, conn: _Conn, raw: bytes | str) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=False) if isinstance(raw, bytes) else None
        except (ValueError, msgpack.UnpackException):
            msg = None
        if isinstance(msg, list):  # replies sent together
            for one in msg:
                self._dispatch_one(conn, one, raw)
        else:
            self._dispatch_one(conn, msg, raw)

    def _dispatch_one(self, conn: _Conn, msg: Any, raw: bytes | str) -> None:
        rid = msg.get("id") if isinstance(msg, dict) else None
        stream = conn.streams.get(rid) if _is_int(rid) else None
        if stream is not None:
            assert isinstance(msg, dict)
            if not stream.push(msg):
                del conn.streams[rid]
            return
        waiter = conn.waiters.pop(rid, None) if _is_int(rid) else None
        if waiter is None:
            # A reply after its request gave up, or a reply without an id (we never
            # send what the server cannot parse).
            if rid is None:
                log.warning("unmatched message from %s: %.200r", conn.address, msg if msg is not None else raw)
            return
        assert isinstance(msg, dict)
        waiter.reply = msg
        waiter.done.set()

    def _end_conn(self, conn: _Conn, reason: str) -> None:
        if conn.lost is None:
            conn.lost = reason
        for _, waiter in conn.outbox:  # never sent: the server never saw them
            waiter.unsent = True
        conn.outbox.clear()
        waiters, conn.waiters = conn.waiters, {}
        for waiter in waiters.values():
            waiter.lost = reason
            waiter.done.set()
        streams, conn.streams = conn.streams, {}
        for stream in streams.values():
            stream.finish("lost", reason)
        self._conns.discard(conn)
        if self._conn is conn:
            self._conn = None
            if not conn.close_requested.is_set() and conn.address in self._addresses:
                # It broke under us: the next connection starts at the next address.
                self._cursor = (self._addresses.index(conn.address) + 1) % len(self._addresses)
        conn.ended.set()


# ---------------------------------------------------------------------- watches
@attrs.frozen
class WatchEvent:
    """One change of a watched key: `prev`/`current` are None for absent; `seq` is the
    change's revision (increasing, shared by all keys). `init` marks the initial flush's
    current values (`prev` None; `seq` as the server sent it, not a resume point)."""

    key: str
    prev: SeqV | None
    current: SeqV | None
    seq: int
    init: bool = False


class _Stream:
    """What the reader routed to one watch request on one socket."""

    __slots__ = ("end", "items", "marker", "wakeup")

    def __init__(self) -> None:
        self.items: deque[dict] = deque()
        self.end: tuple[str, Any] | None = None  # ("lost"|"error"|"ok"|"overflow"|"malformed", detail)
        self.wakeup = trio.Event()
        self.marker = trio.Event()  # the initial flush's marker was received

    def push(self, msg: dict) -> bool:
        """Take one message; False once the stream is over (the route is dropped)."""
        if self.end is not None:
            return False
        if "event" in msg:
            if not msg.get("init") and len(self.items) >= WATCH_BUFFER:
                self.finish("overflow", None)
                return False
            self.items.append(msg)
            if msg["event"] is None:
                self.marker.set()
            self.wakeup.set()
            return True
        if "error" in msg:
            self.finish("error", msg["error"])
        elif "ok" in msg:
            self.finish("ok", None)
        else:
            self.finish("malformed", msg)
        return False

    def finish(self, kind: str, detail: Any) -> None:
        if self.end is None:
            self.end = (kind, detail)
        self.wakeup.set()
        self.marker.set()


class Watch:
    """The async iterator of `MetaClient.watch`. It never ends by itself: it raises
    `HistoryCompacted`, `Unavailable` (could not resume within the client's timeout),
    or another `MetaError` the server sent for the watch.

    - `flushed`: a `trio.Event` set once the caller has been given every initial-flush
      event (set at the start when `initial_flush` is false); `flush_seq` the revision
      the flush was taken at.
    - `last_seq`: the revision a resume starts after (the last live event yielded, or
      the flush's revision), None while unknown."""

    def __init__(
        self, client: MetaClient, key: str, key_end: str | None, filter: str, initial_flush: bool,
        from_seq: int | None, consistency: str,
    ) -> None:  # fmt: skip
        if key_end is not None:
            _key(key_end, "key_end")
        if filter not in WATCH_FILTERS:
            raise ValueError(f'filter must be "all", "update" or "delete", got {filter!r}')
        if from_seq is not None:
            if not _is_int(from_seq) or from_seq < 0:
                raise ValueError(f"from_seq must be a non-negative int, got {from_seq!r}")
            if initial_flush:
                raise ValueError("from_seq and initial_flush exclude each other")
        self._client = client
        self._args: dict[str, Any] = {"key": key, "filter": filter, "consistency": consistency}
        if key_end is not None:
            self._args["key_end"] = key_end
        self.what = f"watch {key!r}" + (f"..{key_end!r}" if key_end is not None else "")
        # Without initial_flush or from_seq the client asks for a flush anyway and
        # drops its values: its marker gives the revision to resume from.
        self._user_flush = initial_flush
        self.last_seq: int | None = from_seq
        self.flush_seq: int | None = None
        self.flushed = trio.Event()
        if not initial_flush:
            self.flushed.set()
        self._yielded_init = False
        self._stream: _Stream | None = None
        self._conn: _Conn | None = None
        self._rid = 0
        self._flushing = False  # the current request asked for a flush
        self._errors: dict[str, str] = {}
        self._failing_since: float | None = None
        self._backoff = _Backoff()
        self._done: BaseException | None = None
        self._closed = False

    @property
    def address(self) -> str | None:
        """The address of the node the watch is on now."""
        return self._conn.address if self._conn is not None and self._stream is not None else None

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._closed:
            raise StopAsyncIteration
        if self._done is not None:
            raise self._done
        try:
            while True:
                if self._stream is None:
                    await self._start()
                stream = self._stream
                assert stream is not None
                if stream.items:
                    event = self._take(stream.items.popleft())
                    if event is not None:
                        return event
                elif stream.end is not None:
                    await self._ended(stream)
                else:
                    stream.wakeup = trio.Event()
                    await stream.wakeup.wait()
        except MetaError as e:
            self._done = e
            await self._cancel_stream()
            raise

    async def _establish(self) -> None:
        """Register the watch; with a flush, until its marker is in (or it failed)."""
        try:
            while True:
                if self._stream is None:
                    await self._start()
                stream = self._stream
                assert stream is not None
                if not self._flushing:
                    return
                await stream.marker.wait()
                if any(m.get("event") is None for m in stream.items):
                    if not self._user_flush:  # drop the client's own flush: its revision starts
                        while self._flushing:
                            self._take(stream.items.popleft())
                    return
                await self._ended(stream)
        except MetaError as e:
            self._done = e
            raise

    def _take(self, msg: dict) -> WatchEvent | None:
        """The event to yield for one message, if any; keeps the resume point."""
        ev = msg["event"]
        if ev is None:  # the flush marker
            rev = msg.get("seq")
            if not _is_int(rev):
                raise MetaError(f"{self.what}: malformed flush marker: {msg!r}")
            self._flushing = False
            self.flush_seq = rev
            if self.last_seq is None or rev > self.last_seq:
                self.last_seq = rev
            self._progress()
            self.flushed.set()
            return None
        try:
            key, seq = ev["key"], ev["seq"]
            prev, current = SeqV.from_wire(ev["prev"]), SeqV.from_wire(ev["current"])
        except (KeyError, TypeError):
            raise MetaError(f"{self.what}: malformed event: {msg!r}") from None
        if not isinstance(key, str) or not _is_int(seq):
            raise MetaError(f"{self.what}: malformed event: {msg!r}")
        if msg.get("init"):
            if not self._user_flush:
                return None
            self._yielded_init = True
            return WatchEvent(key, prev, current, seq, True)
        if self.last_seq is not None and seq <= self.last_seq:
            return None  # already yielded (never expected: the server resumes after from_seq)
        self.last_seq = seq
        self._progress()
        return WatchEvent(key, prev, current, seq, False)

    def _progress(self) -> None:
        self._failing_since = None
        self._errors.clear()
        self._backoff = _Backoff()

    async def _start(self) -> None:
        """Send the watch (a resume when a revision is known) on the client's socket."""
        client = self._client
        if client._closed:
            raise MetaError("the client is closed")
        request = dict(self._args, op="watch")
        if self.last_seq is not None:
            request.update(initial_flush=False, from_seq=self.last_seq)
        else:
            request["initial_flush"] = True
        if self._failing_since is None:
            self._failing_since = trio.current_time()
        deadline = self._failing_since + client._timeout
        with trio.move_on_at(deadline):
            while True:
                conn = await client._connection(self._errors)
                rid = next(client._ids)
                request["id"] = rid
                stream = _Stream()
                conn.streams[rid] = stream
                sent = False
                try:
                    assert conn.ws is not None
                    await conn.ws.send_message(msgpack.packb(request, use_bin_type=True))
                    sent = True
                except ConnectionClosed as e:
                    conn.streams.pop(rid, None)
                    self._errors[conn.address] = conn.lost or _describe_close(e.reason)
                    conn.close_requested.set()
                    continue
                finally:
                    if not sent:
                        conn.streams.pop(rid, None)
                        conn.close_requested.set()  # a partial frame may be on the wire
                self._stream, self._conn, self._rid = stream, conn, rid
                self._flushing = bool(request["initial_flush"])
                return
        raise client._unavailable(self._errors, self.what)

    async def _ended(self, stream: _Stream) -> None:
        """The stream ended before the caller left: resume, or raise why not."""
        assert stream.end is not None and self._conn is not None
        kind, detail = stream.end
        conn = self._conn
        self._stream = None
        if self._failing_since is None:
            self._failing_since = trio.current_time()
        if kind == "error":
            exc = error_from_wire(detail, conn.address)
            if isinstance(exc, BadRequest) and "compacted" in str(exc):
                raise HistoryCompacted(
                    f"{self.what}: cannot resume after revision {self.last_seq}: {exc}; the server no"
                    " longer has the changes since then: watch again with initial_flush=True"
                )
            if isinstance(exc, NotLeader):
                leader = exc.leader if isinstance(exc.leader, str) else None
                if leader is None or leader == conn.address or not self._client._redirect(conn, leader):
                    await self._backoff.sleep()
            elif isinstance(exc, Unavailable):
                # Too slow, or the node's state was replaced by a snapshot, or no leader:
                # resume (on the same node when it still serves).
                if self._errors.get(conn.address):
                    await self._backoff.sleep()
            else:
                raise exc
            self._errors[conn.address] = str(exc)
        elif kind == "overflow":
            log.warning("%s: more than %d events unread; resuming after revision %s", self.what, WATCH_BUFFER, self.last_seq)
            await self._send_cancel(conn, self._rid)
        else:  # lost, or ended by the server ("ok") or garbled: another socket
            reason = detail if kind == "lost" else f"the stream ended ({kind}: {detail!r:.100})"
            if kind != "lost":
                conn.close_requested.set()
            if conn.address in self._errors:
                await self._backoff.sleep()
            self._errors[conn.address] = str(reason)
        if self._flushing and self._yielded_init:
            raise Unavailable(
                f"{self.what}: the connection to {conn.address} was lost during the initial flush"
                f" ({self._errors.get(conn.address)}); watch again"
            )
        if trio.current_time() - self._failing_since > self._client._timeout:
            raise self._client._unavailable(self._errors, self.what)

    async def _send_cancel(self, conn: _Conn, rid: int) -> None:
        conn.streams.pop(rid, None)
        if not conn.usable and (conn.lost is not None or conn.close_requested.is_set()):
            return
        sent = False
        with trio.move_on_after(1):
            try:
                assert conn.ws is not None
                await conn.ws.send_message(msgpack.packb({"id": rid, "op": "cancel"}, use_bin_type=True))
                sent = True
            except ConnectionClosed:
                sent = True
        if not sent:
            conn.close_requested.set()

    async def _cancel_stream(self) -> None:
        stream, conn = self._stream, self._conn
        self._stream = None
        if stream is not None and conn is not None and stream.end is None:
            with trio.CancelScope(shield=True):
                await self._send_cancel(conn, self._rid)

    async def aclose(self) -> None:
        """Cancel the watch on the server (when its socket is up); the iterator ends."""
        if self._closed:
            return
        self._closed = True
        await self._cancel_stream()


class _ConnectFailed(Exception):
    pass


__all__ = ["Change", "MetaClient", "SeqV", "TxnReply", "Watch", "WatchEvent", "encode_match_seq"]
