"""The client API (contract §5): WebSocket at `/v1` on `grpc_api_address`, msgpack messages.

Each binary message is one request map `{"id": n, "op": NAME, ...}` or an array of
them (a batch); each reply is `{"id": n, "ok": RESULT}` or `{"id": n, "error": {code,
message, leader}}`, sent as one map or an array of replies. A batch's writes reach the
node as one batch (one log append), its linearizable reads share one read barrier,
and each group's replies leave as one message; messages on one socket run
concurrently.
The wire shapes are documented in docs/reference/client-protocol.md.

Errors are translated once, here: a `ClientError` becomes its code; a malformed
message is `bad_request`; an oversized one `too_large` (the socket stays usable up to
twice the limit; beyond that trio-websocket closes it with 1009); anything else is
logged and answered `internal`. On shutdown every socket is closed with code 1001.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

import msgpack
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from metanode import __version__, wsfast
from metanode.config import parse_address
from metanode.api.reqstats import KIND_OF_OP, stats_for
from metanode.errors import BadRequest, ClientError, TooLarge, Unauthenticated
from metanode.metrics import metrics_for
from metanode.api.export_stream import stream_export
from metanode.trio_util import InFlight, single_errors
from metanode.node.watch import WatchHub
from metanode.sm import (
    Change,
    Command,
    KeyChange,
    KVStateMachine,
    MatchSeq,
    SeqV,
    Txn,
    TxnCondition,
    TxnDelete,
    TxnDeleteByPrefix,
    TxnDeleteByPrefixResponse,
    TxnDeleteResponse,
    TxnGet,
    TxnGetResponse,
    TxnOp,
    TxnPut,
    TxnPutResponse,
    TxnReply,
    TxnResponse,
    Upsert,
)

log = logging.getLogger("metanode.api")

PATH = "/v1"
MAX_IN_FLIGHT = 256  # requests served at once per socket
MAX_CONTAINER_LEN = 1_000_000  # msgpack arrays/maps in one request: bounds decoding
INTERNAL = {"code": "internal", "message": "internal error", "leader": None}
SHUTDOWN_GRACE_S = 2.0


class ClientNode(Protocol):
    """What the client API needs from a node."""

    sm: KVStateMachine

    async def client_write(self, cmd: Command) -> Any: ...
    async def begin_client_writes(
        self, cmds: list[Command], on_settled: Callable[[list[Any]], None] | None = None
    ) -> Any: ...
    async def client_write_batch(
        self, cmds: list[Command], on_settled: Callable[[list[Any]], None] | None = None, begun: Any = None
    ) -> list[Any]: ...
    def abandon_client_writes(self, begun: Any) -> None: ...
    async def client_read_barrier(self) -> None: ...
    def client_addresses(self) -> list[str]: ...
    def cluster_status(self) -> dict: ...
    def address_of(self, node_id: int) -> str | None: ...
    def wait_s(self) -> float: ...
    async def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None: ...

    @property
    def watch_hub(self) -> WatchHub: ...


# ---------------------------------------------------------------------- wire shapes
def seqv_out(v: SeqV | None) -> dict | None:
    if v is None:
        return None
    meta = {"expire_at_ms": v.expire_at_ms} if v.expire_at_ms is not None else None
    return {"seq": v.seq, "data": v.data, "meta": meta}


def change_out(c: Change) -> dict:
    return {"prev": seqv_out(c.prev), "result": seqv_out(c.result)}


def _arg(req: dict, name: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in req or (optional and req[name] is None):
        if optional:
            return None
        raise BadRequest(f"{req.get('op')}: missing argument {name!r}")
    value = req[name]
    # bool is an int in Python: refuse True where an int is expected.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise BadRequest(f"{req.get('op')}: argument {name!r} has the wrong type ({type(value).__name__})")
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def match_seq_in(value: Any) -> MatchSeq | None:
    if value is None:
        return None
    if isinstance(value, dict) and len(value) == 1:
        (kind, n), = value.items()
        if kind in ("exact", "ge") and isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return MatchSeq(exact=n) if kind == "exact" else MatchSeq(ge=n)
    raise BadRequest(f'match_seq must be null, {{"exact": n}} or {{"ge": n}}, got {value!r}')


def _event(rid: int, change: KeyChange) -> dict:
    return {
        "id": rid,
        "event": {"key": change.key, "prev": seqv_out(change.prev), "current": seqv_out(change.current),
                  "seq": change.rev},
        "init": False,
    }


def txn_op_in(value: Any, where: str) -> TxnOp:
    """`{"put": {...}}`, `{"get": {key}}`, `{"delete": {key, match_seq?}}` or
    `{"delete_by_prefix": {prefix}}` (contract §5)."""
    if not isinstance(value, dict) or len(value) != 1:
        raise BadRequest(f"txn {where}: an op is a map with one key: put, get, delete or delete_by_prefix")
    (kind, args), = value.items()
    if not isinstance(args, dict):
        raise BadRequest(f"txn {where}: the arguments of {kind!r} must be a map")
    args = dict(args, op=f"txn {where} {kind}")
    if kind == "put":
        return TxnPut(
            _arg(args, "key", str), _arg(args, "value", bytes), match_seq_in(args.get("match_seq")),
            _arg(args, "ttl_ms", int, optional=True), _arg(args, "expire_at_ms", int, optional=True),
        )
    if kind == "get":
        return TxnGet(_arg(args, "key", str))
    if kind == "delete":
        return TxnDelete(_arg(args, "key", str), match_seq_in(args.get("match_seq")))
    if kind == "delete_by_prefix":
        return TxnDeleteByPrefix(_arg(args, "prefix", str))
    raise BadRequest(f"txn {where}: unknown op {kind!r}")


def txn_condition_in(value: Any, where: str) -> TxnCondition:
    """`{"key", "target": "seq"|"value", "op": "=="|..., "operand": int|bytes}`; the
    state machine validates target and op (and says which is wrong)."""
    if not isinstance(value, dict):
        raise BadRequest(f"txn {where}: a condition is a map {{key, target, op, operand}}")
    key = value.get("key")
    if not isinstance(key, str):
        raise BadRequest(f"txn {where}: 'key' must be a string")
    operand = value.get("operand")
    if not isinstance(operand, (int, bytes)) or isinstance(operand, bool):
        raise BadRequest(f"txn {where}: 'operand' must be an int (seq) or bytes (value)")
    return TxnCondition(key, value.get("target"), value.get("op"), operand)  # type: ignore[arg-type]


def txn_response_out(r: TxnResponse) -> dict:
    match r:
        case TxnPutResponse():
            return {"put": {"key": r.key, "prev": seqv_out(r.prev), "result": seqv_out(r.result)}}
        case TxnGetResponse():
            return {"get": {"key": r.key, "value": seqv_out(r.value)}}
        case TxnDeleteResponse():
            return {"delete": {"key": r.key, "prev": seqv_out(r.prev), "result": seqv_out(r.result)}}
        case TxnDeleteByPrefixResponse():
            return {"delete_by_prefix": {"prefix": r.prefix, "count": r.count}}
    raise TypeError(f"unknown txn response {r!r}")


def upsert_in(req: dict) -> Upsert:
    cmd = Upsert(
        _arg(req, "key", str),
        _arg(req, "value", (bytes, type(None))),
        match_seq_in(req.get("match_seq")),
        _arg(req, "ttl_ms", int, optional=True),
        _arg(req, "expire_at_ms", int, optional=True),
    )
    try:
        cmd.validate()
    except ValueError as e:
        raise BadRequest(f"upsert: {e}") from None
    return cmd


def txn_in(req: dict) -> Txn:
    def items(name: str) -> list:
        value = req.get(name, [])
        if not isinstance(value, list):
            raise BadRequest(f"txn: {name} must be a list")
        return value

    cmd = Txn(
        tuple(txn_condition_in(c, f"conditions[{i}]") for i, c in enumerate(items("conditions"))),
        tuple(txn_op_in(o, f"if_then[{i}]") for i, o in enumerate(items("if_then"))),
        tuple(txn_op_in(o, f"else_then[{i}]") for i, o in enumerate(items("else_then"))),
    )
    try:
        cmd.validate()
    except ValueError as e:
        raise BadRequest(f"txn: {e}") from None
    return cmd


WRITE_OPS: dict[str, Callable[[dict], Command]] = {"upsert": upsert_in, "txn": txn_in}
READ_OPS = frozenset(("get", "mget", "list"))


def _consistency(req: dict) -> Any:
    return req.get("consistency", "linearizable")


class _AllTooLarge(TooLarge):
    """A message over the limit: each of its requests is answered too_large."""

    def __init__(self, reqs: list[Any], error: TooLarge) -> None:
        super().__init__(str(error))
        self.reqs = reqs


def _valid_id(rid: Any) -> bool:
    return isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0


def _strings(values: Any, name: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"{name} must be a list of strings")
    return values


def _pack_replies(replies: list[dict]) -> bytes:
    """Replies ready together, as one message: one map, or an array of them."""
    return msgpack.packb(replies[0] if len(replies) == 1 else replies, use_bin_type=True)


def _all_writes(reqs: list[Any]) -> list[tuple[int, str, Command]] | None:
    """(id, op, command) of each request when all are well-formed writes, else None."""
    writes = []
    for req in reqs:
        if not isinstance(req, dict) or not _valid_id(rid := req.get("id")):
            return None
        name = req.get("op")
        if not isinstance(name, str) or name not in WRITE_OPS:
            return None
        try:
            writes.append((rid, name, WRITE_OPS[name](req)))
        except Exception:  # answered by `_serve_batch` (bad_request, or internal)
            return None
    return writes


class _WriteGroup:
    """One message's writes; their replies leave once: from the task that applied
    the last of them (`answer_now`, the leader's own writes), else from the serving
    task."""

    __slots__ = ("session", "writes", "started", "answered")

    def __init__(self, session: ClientSession, writes: list[tuple[int, str, Command]]) -> None:
        self.session = session
        self.writes = writes
        self.started = time.perf_counter()
        self.answered = False

    def answer_now(self, outcomes: list[Any]) -> None:
        s = self.session
        replies = s._write_replies(self.writes, outcomes)
        data = _pack_replies(replies)
        if wsfast.send_now(s.ws, data):
            self.answered = True
            s.metrics.sent(replies, len(data))
            s._record_writes(self.writes, outcomes, self.started)


# ---------------------------------------------------------------------- operations
class ClientSession:
    """One WebSocket: concurrent requests, one reply each."""

    def __init__(
        self, node: ClientNode, ws: WebSocketConnection, max_message_size: int, counter: InFlight,
        token: str | None = None,
    ) -> None:
        self.node = node
        self.ws = ws
        self.max_message_size = max_message_size
        self.in_flight = 0  # requests received and not yet answered
        self._room = trio.Event()
        self._nursery: trio.Nursery
        self.counter = counter
        self.watches: dict[int, trio.CancelScope] = {}
        self.token = token
        self.authenticated = token is None
        self._refusal: Unauthenticated | None = None  # why the socket is refused
        self._closed = False  # the session ended: messages still handed over are dropped
        self._taking = trio.StrictFIFOLock()  # one message handed over at a time, in order
        self.stats = stats_for(node)  # counts and latencies for the dashboard
        self.metrics = metrics_for(node)  # Prometheus counters (metanode/metrics.py)
        self.ops: dict[str, Callable[[dict], Any]] = {
            "handshake": self.op_handshake,
            "get": self.op_get,
            "mget": self.op_mget,
            "list": self.op_list,
            "member_list": self.op_member_list,
            "cluster_status": self.op_cluster_status,
            "watch": self._watch,  # streams: dispatched with its id by _serve
        }

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                # Replies may leave from the task that applied their writes (plain TCP).
                wsfast.adopt(self.ws, nursery)
                # Messages come to `_received` from the connection's reader task.
                for message in wsfast.deliver_to(self.ws, self._received):
                    await self._received(message)
                with contextlib.suppress(ConnectionClosed):
                    while True:  # (with the sink, only the end comes here)
                        await self._received(await self.ws.get_message())
            finally:
                # Before the nursery closes: the reader task may still hand over a
                # message (one sent before the client saw our close).
                self._closed = True
                self._room.set()
                nursery.cancel_scope.cancel()

    async def _received(self, message: bytes | str) -> None:
        """One message, in the connection's reader task (or `run`, for those queued
        before): one at a time, in arrival order; nothing may escape into the reader."""
        lock = self._taking
        try:
            lock.acquire_nowait()  # (free but for `run` handling a queued one: no pass lost)
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._take(message)
        except Exception:
            log.exception("client message dropped: it could not be handed to a serving task")
        finally:
            lock.release()

    async def _take(self, message: bytes | str) -> None:
        # Backpressure: beyond MAX_IN_FLIGHT requests in flight on this socket we stop
        # reading and the client's sends block (TCP), instead of holding unbounded
        # work and replies. Counted here, before the next message is taken.
        while self.in_flight >= MAX_IN_FLIGHT and not self._closed:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        if self._closed or self._refusal is not None or self.ws._close_reason is not None:
            return  # the session ended, the socket is closing (1001 at shutdown), or refused (1008)
        reqs: list[Any] | ClientError
        try:
            reqs = self._parse(message)
        except ClientError as e:
            reqs = e  # answered by `serve`
        if isinstance(reqs, ClientError):
            n = 0
        else:
            if not self.authenticated:
                self._check_token(reqs)
            n = len(reqs)
        self.in_flight += n
        self.metrics.req_inflights.inc(n)
        self.counter.add()
        group: tuple[_WriteGroup, Any] | None = None
        try:
            writes = None if isinstance(reqs, ClientError) or not self.authenticated else _all_writes(reqs)
            if writes is not None:
                group = await self._begin(writes)
            if not self._closed:  # (it may have ended meanwhile: then nobody serves it)
                self._nursery.start_soon(self.serve, message, reqs, group)
                return
        except BaseException:
            self._abandon(group, n)
            raise
        self._abandon(group, n)

    def _abandon(self, group: tuple[_WriteGroup, Any] | None, n: int) -> None:
        """A message counted by `_take` that no task will serve."""
        if group is not None and group[1] is not None:
            self.node.abandon_client_writes(group[1])  # proposed: its outcome is dropped
        self._done(n)
        self.counter.done()

    async def _begin(self, writes: list[tuple[int, str, Command]]) -> tuple[_WriteGroup, Any]:
        """A message of writes only: on the leader, proposed here, in the reader task
        (a pass of the event loop before its serving task would); its serving task
        waits for them (or, not begun, serves them as usual)."""
        group = _WriteGroup(self, writes)
        try:
            return group, await self.node.begin_client_writes([cmd for _, _, cmd in writes], group.answer_now)
        except Exception:  # not proposed (the event never reached the core): served as usual
            log.exception("client writes: proposing them from the reader task failed")
            return group, None

    def _check_token(self, reqs: list[Any]) -> None:
        """With a token and no valid handshake yet, the next message (parsed: one that
        does not parse decides nothing, it is answered `bad_request` or `too_large`)
        decides, here in the order messages come (tasks started together run in any
        order): a valid handshake as its first well-formed request authenticates the
        socket; anything else refuses it (its serving task answers `unauthenticated`
        and closes the socket; later messages are dropped)."""
        for req in reqs:
            if not isinstance(req, dict) or not _valid_id(req.get("id")):
                continue  # answered bad_request: the next request decides
            try:
                self._authenticate(req.get("op"), req)
            except Unauthenticated as e:
                self._refusal = e
            return

    def _done(self, n: int) -> None:
        self.in_flight -= n
        self.metrics.req_inflights.dec(n)
        if self.in_flight < MAX_IN_FLIGHT:
            self._room.set()

    async def serve(
        self, message: bytes | str, reqs: list[Any] | ClientError, writes: tuple[_WriteGroup, Any] | None = None
    ) -> None:
        """One message, counted by `_take` (in `in_flight` and the counter): a request
        map, or an array of them (a batch); `reqs` the message parsed, or why it did
        not parse. Its writes go to the node as one batch (one log append), its
        linearizable reads share one read barrier, and each group's replies leave as
        one message. `writes`: all of them, as `_begin` left them."""
        try:
            self.metrics.received(len(message))
            if isinstance(reqs, _AllTooLarge):
                ids = [r.get("id") if isinstance(r, dict) else None for r in reqs.reqs] or [None]
                await self._send_replies([{"id": rid, "error": self._error(reqs)} for rid in ids])
            elif isinstance(reqs, ClientError):
                await self._send_replies([{"id": None, "error": self._error(reqs)}])
            elif writes is not None:
                await self._serve_writes(*writes)
            else:
                await self._serve_batch(reqs)
        finally:
            self._done(0 if isinstance(reqs, ClientError) else len(reqs))
            self.counter.done()

    def _parse(self, message: bytes | str) -> list[Any]:
        if isinstance(message, str):
            raise BadRequest("messages must be binary msgpack, not text")
        try:
            msg = msgpack.unpackb(
                message, raw=False, strict_map_key=False,
                max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise BadRequest(f"malformed msgpack: {type(e).__name__} {e}".rstrip()) from None
        reqs = msg if isinstance(msg, list) else [msg]
        if len(message) > self.max_message_size:
            # Every request of it gets too_large (with its id, when it has one).
            raise _AllTooLarge(reqs, TooLarge(
                f"message of {len(message)} bytes is over the limit of {self.max_message_size}"
            ))
        if isinstance(msg, list) and not msg:
            raise BadRequest("an empty batch")
        return reqs

    async def _serve_batch(self, reqs: list[Any]) -> None:
        immediate: list[dict] = []
        writes: list[tuple[int, str, Command]] = []
        reads: list[tuple[int, str, dict]] = []
        for req in reqs:
            rid = req.get("id") if isinstance(req, dict) else None
            try:
                if not isinstance(req, dict):
                    raise BadRequest("a request must be a msgpack map")
                if not _valid_id(rid):
                    raise BadRequest("a request needs a non-negative integer 'id'")
                name = req.get("op")
                if not self.authenticated:  # refused by `_check_token`
                    raise self._refusal or Unauthenticated("the first request must be a handshake")
                if not isinstance(name, str):
                    raise BadRequest(f"unknown op {name!r}")
                if name == "cancel":
                    self._cancel(rid)
                    continue  # the watch's stream ends with its own reply
                if name == "watch":
                    self._stream_started()
                    self._nursery.start_soon(self._serve_watch, rid, req)
                    continue
                if name == "export":  # an online backup, streamed (metanode/api/export_stream.py)
                    self._stream_started()
                    self._nursery.start_soon(self._serve_export, rid, req)
                    continue
                if name in WRITE_OPS:
                    writes.append((rid, name, WRITE_OPS[name](req)))
                elif name in READ_OPS and _consistency(req) == "linearizable":
                    reads.append((rid, name, req))
                else:
                    op = self.ops.get(name) if isinstance(name, str) else None
                    if op is None:
                        raise BadRequest(f"unknown op {req.get('op')!r}")
                    started = time.perf_counter()
                    result = await op(req)
                    self._record(name, started, True)
                    immediate.append({"id": rid, "ok": result})
            except Unauthenticated as e:
                # The first request must be a valid handshake: anything else gets
                # this, and the socket closes.
                with contextlib.suppress(ConnectionClosed):
                    await self._send_replies(immediate + [{"id": rid, "error": self._error(e)}])
                    await self.ws.aclose(1008, "unauthenticated")
                return
            except ClientError as e:
                immediate.append({"id": rid, "error": self._error(e)})
            except Exception:
                log.exception("client request failed")
                immediate.append({"id": rid, "error": INTERNAL})
        if immediate:
            await self._send_replies(immediate)
        if writes and reads:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_writes, _WriteGroup(self, writes))
                nursery.start_soon(self._serve_reads, reads)
        elif writes:
            await self._serve_writes(_WriteGroup(self, writes))
        elif reads:
            await self._serve_reads(reads)

    async def _serve_writes(self, group: _WriteGroup, begun: Any = None) -> None:
        writes = group.writes
        try:
            outcomes = await self.node.client_write_batch([cmd for _, _, cmd in writes], group.answer_now, begun)
        except ClientError as e:
            outcomes = [e] * len(writes)
        except Exception:
            log.exception("client writes failed")
            if not group.answered:
                await self._send_replies([{"id": rid, "error": INTERNAL} for rid, _, _ in writes])
            return
        if not group.answered:
            self._record_writes(writes, outcomes, group.started)
            await self._send_replies(self._write_replies(writes, outcomes))

    def _record_writes(self, writes: list[tuple[int, str, Command]], outcomes: list[Any], started: float) -> None:
        """The writes of one message, answered together: recorded by op, at once."""
        seconds = time.perf_counter() - started
        ops = Counter(name for _, name, _ in writes)
        failed = Counter(name for (_, name, _), o in zip(writes, outcomes) if isinstance(o, BaseException))
        for name, n in ops.items():
            self._record_n(name, seconds, n, failed[name])

    def _write_replies(self, writes: list[tuple[int, str, Command]], outcomes: list[Any]) -> list[dict]:
        replies = []
        for (rid, name, _), outcome in zip(writes, outcomes):
            try:
                if isinstance(outcome, ClientError):
                    replies.append({"id": rid, "error": self._error(outcome)})
                elif name == "txn":
                    assert isinstance(outcome, TxnReply), outcome
                    replies.append({"id": rid, "ok": {
                        "success": outcome.success, "responses": [txn_response_out(r) for r in outcome.responses],
                    }})
                else:
                    replies.append({"id": rid, "ok": change_out(outcome)})
            except Exception:  # our bug: this request gets `internal`, the others their replies
                log.exception("client write %s: cannot build its reply from %r", name, outcome)
                replies.append({"id": rid, "error": INTERNAL})
        return replies

    async def _serve_reads(self, reads: list[tuple[int, str, dict]]) -> None:
        started = time.perf_counter()
        barrier: ClientError | None = None
        try:
            await self.node.client_read_barrier()  # one ReadIndex round for all of them
        except ClientError as e:
            barrier = e
        replies = []
        for rid, name, req in reads:
            try:
                if barrier is not None:
                    raise barrier
                replies.append({"id": rid, "ok": await self.ops[name](dict(req, consistency="local"))})
                self._record(name, started, True)
            except ClientError as e:
                self._record(name, started, False)
                replies.append({"id": rid, "error": self._error(e)})
            except Exception:  # our bug: this request gets `internal`, the others their replies
                log.exception("client read %s failed", name)
                self._record(name, started, False)
                replies.append({"id": rid, "error": INTERNAL})
        await self._send_replies(replies)

    def _stream_started(self) -> None:
        """A watch or an export holds a slot of MAX_IN_FLIGHT until its stream ends."""
        self.in_flight += 1
        self.metrics.req_inflights.inc(1)

    async def _serve_watch(self, rid: int, req: dict) -> None:
        try:
            await self._serve_watch_stream(rid, req)
        finally:
            self._done(1)

    async def _serve_watch_stream(self, rid: int, req: dict) -> None:
        try:
            await self._watch(rid, req)
            reply: dict = {"id": rid, "ok": None}
        except ClientError as e:
            reply = {"id": rid, "error": self._error(e)}
        except Exception:
            log.exception("client watch failed")
            reply = {"id": rid, "error": INTERNAL}
        await self._send_replies([reply])

    async def _serve_export(self, rid: int, req: dict) -> None:
        try:
            await self._serve_export_stream(rid, req)
        finally:
            self._done(1)

    async def _serve_export_stream(self, rid: int, req: dict) -> None:
        try:
            await self._read(req)
            reply: dict = {"id": rid, "ok": await stream_export(self.node, rid, self._send)}
        except ClientError as e:
            reply = {"id": rid, "error": self._error(e)}
        except Exception:
            log.exception("client export failed")
            reply = {"id": rid, "error": INTERNAL}
        await self._send_replies([reply])

    def _record(self, name: str, started: float, ok: bool) -> None:
        self._record_n(name, time.perf_counter() - started, 1, 0 if ok else 1)

    def _record_n(self, name: str, seconds: float, n: int, failed: int) -> None:
        """`n` requests of op `name` answered after `seconds`, `failed` of them errors."""
        if self.stats is not None and name in KIND_OF_OP:
            self.stats.record_many(KIND_OF_OP[name], seconds, n, failed)
        self.metrics.requests_done(name, seconds, n, failed)

    async def _send_replies(self, replies: list[dict]) -> None:
        """Replies ready together leave as one message (one map, or an array)."""
        try:
            data = _pack_replies(replies)
            await wsfast.send_message(self.ws, data)
            self.metrics.sent(replies, len(data))
        except ConnectionClosed:
            pass

    def _authenticate(self, name: Any, req: dict) -> None:
        token = self.token
        if token is None:
            self.authenticated = True
            return
        given = req.get("token") if name == "handshake" else None
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthenticated(
                "the first request must be a handshake with a valid token"
                if name != "handshake" else "invalid token"
            )
        self.authenticated = True

    def _cancel(self, rid: int) -> None:
        scope = self.watches.get(rid)
        if scope is None:
            raise BadRequest(f"cancel: no watch in progress with id {rid}")
        scope.cancel()

    async def _send(self, message: dict) -> None:
        """One message of a stream (a watch, an export). Shielded: a cancel (a watch's
        `cancel`) landing in a frame half written would corrupt the socket for every
        later message. A peer that stops reading holds it until its socket closes."""
        data = msgpack.packb(message, use_bin_type=True)
        with trio.CancelScope(shield=True):
            await wsfast.send_message(self.ws, data)
        self.metrics.sent([message], len(data))

    async def _watch(self, rid: int, req: dict) -> None:
        """Stream the changes of a key or range (see the protocol reference); returns
        (None: the stream's last reply) when cancelled."""
        if rid in self.watches:
            raise BadRequest(f"watch: id {rid} is already a watch in progress")
        key = _arg(req, "key", str)
        key_end = _arg(req, "key_end", str, optional=True)
        filter_ = req.get("filter", "all")
        initial_flush = _arg(req, "initial_flush", bool, optional=True) or False
        from_seq = _arg(req, "from_seq", int, optional=True)
        if from_seq is not None and (from_seq < 0 or initial_flush):
            raise BadRequest("watch: from_seq must be >= 0 and cannot be combined with initial_flush")
        await self._read(req)
        node, hub = self.node, self.node.watch_hub
        if from_seq is not None and node.sm.rev < from_seq:
            await node.wait_for(lambda: node.sm.rev >= from_seq, node.wait_s(), "catching up for a watch")
        # One step from here to `subscribe`: no change can fall in between.
        watcher = hub.subscribe(key, key_end, filter_)
        try:
            backlog = hub.since(from_seq, watcher) if from_seq is not None else []
            if initial_flush:
                current = node.sm.range(key, key_end) if key_end is not None else (
                    [(key, v)] if (v := node.sm.get(key)) is not None else []
                )
                flushed_at = node.sm.rev
            with trio.CancelScope() as scope:
                self.watches[rid] = scope
                if initial_flush:
                    for k, v in current:
                        await self._send({"id": rid, "event": {"key": k, "prev": None, "current": seqv_out(v),
                                                               "seq": flushed_at}, "init": True})
                    await self._send({"id": rid, "event": None, "init": True, "seq": flushed_at})
                for change in backlog:
                    await self._send(_event(rid, change))
                async for change in watcher.events:
                    await self._send(_event(rid, change))
                if watcher.error is not None:
                    raise watcher.error
        finally:
            self.watches.pop(rid, None)
            watcher.close()
        return None

    def _error(self, e: ClientError) -> dict:
        leader = getattr(e, "leader", None)
        if isinstance(leader, int):
            leader = self.node.address_of(leader)
        return {"code": e.code, "message": str(e), "leader": leader if isinstance(leader, str) else None}

    async def _read(self, req: dict) -> None:
        consistency = req.get("consistency", "linearizable")
        if consistency == "linearizable":
            await self.node.client_read_barrier()
        elif consistency != "local":
            raise BadRequest(f'consistency must be "linearizable" or "local", got {consistency!r}')

    async def op_handshake(self, req: dict) -> dict:
        return {"server": "metanode", "version": __version__}

    async def op_get(self, req: dict) -> dict | None:
        key = _arg(req, "key", str)
        await self._read(req)
        self.metrics.stream_items("get", 1)
        return seqv_out(self.node.sm.get(key))

    async def op_mget(self, req: dict) -> list:
        keys = _strings(req.get("keys"), "keys")
        await self._read(req)
        self.metrics.stream_items("mget", len(keys))
        return [seqv_out(v) for v in self.node.sm.mget(keys)]

    async def op_list(self, req: dict) -> list:
        prefix = _arg(req, "prefix", str)
        limit = _arg(req, "limit", int, optional=True)
        if limit is not None and limit < 0:
            raise BadRequest("list: limit must be >= 0")
        await self._read(req)
        items = [[k, seqv_out(v)] for k, v in self.node.sm.list(prefix, limit)]
        self.metrics.stream_items("list", len(items))
        return items

    async def op_member_list(self, req: dict) -> list[str]:
        return self.node.client_addresses()

    async def op_cluster_status(self, req: dict) -> dict:
        return self.node.cluster_status()


async def serve_client_api(
    node: ClientNode,
    address: str,
    *,
    max_message_size: int,
    shutdown: trio.Event,
    closed: trio.Event | None = None,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the client API on `address` until `shutdown` is set; then let requests in
    flight answer (up to SHUTDOWN_GRACE_S), close every socket with 1001, set `closed`
    and return. `task_status.started("host:port")` once listening; a port in use
    raises OSError (itself, not in an exception group). `closed` is set on the way out
    however it ends, cancelled too, so a shutdown never waits for it in vain. With
    `ssl_context` the port speaks TLS only (``wss://``): a plaintext client fails its
    handshake and is dropped, harming no other."""
    host, port = parse_address(address)
    sockets: set[WebSocketConnection] = set()
    counter = InFlight()

    async def handler(request: WebSocketRequest) -> None:
        if request.path != PATH:
            await request.reject(404, body=f"the client API is at {PATH}".encode())
            return
        ws = await request.accept()
        sockets.add(ws)
        try:
            await ClientSession(node, ws, max_message_size, counter, token).run()
        finally:
            sockets.discard(ws)

    try:
        async with single_errors(), trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    serve_websocket, handler, host, port, ssl_context, handler_nursery=nursery,
                    max_message_size=2 * max_message_size + (1 << 20), message_queue_size=64,
                    receive_buffer_size=None,
                )
            )
            bound = server.port
            scheme = "ws" if ssl_context is None else "wss"  # wss: TLS only (docs/operations/security.md)
            log.info("client API listening on %s://%s:%d%s", scheme, host, bound, PATH)
            task_status.started(f"{host}:{bound}")
            await shutdown.wait()
            # contract §1: finish in-flight replies (bounded), then close every socket (1001).
            with trio.move_on_after(SHUTDOWN_GRACE_S):
                await counter.wait_idle()
            await _close_all(sockets)
            nursery.cancel_scope.cancel()
    finally:
        if closed is not None:
            closed.set()


async def _close_all(sockets: Iterable[WebSocketConnection]) -> None:
    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            for ws in list(sockets):
                nursery.start_soon(partial(ws.aclose, 1001, "server shutting down"))


__all__ = ["ClientNode", "ClientSession", "serve_client_api"]
