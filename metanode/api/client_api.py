"""The client API (contract §5): WebSocket at `/v1` on `grpc_api_address`, msgpack messages.

Each binary message is one request map `{"id": n, "op": NAME, ...}`; each reply is
`{"id": n, "ok": RESULT}` or `{"id": n, "error": {code, message, leader}}`. Requests on
one socket run concurrently (each in its own task); replies go out as they finish.
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
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

import msgpack
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from metanode import __version__
from metanode.config import parse_address
from metanode.api.reqstats import KIND_OF_OP, stats_for
from metanode.errors import BadRequest, ClientError, TooLarge, Unauthenticated
from metanode.metrics import metrics_for
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
SHUTDOWN_GRACE_S = 2.0


class ClientNode(Protocol):
    """What the client API needs from a node."""

    sm: KVStateMachine

    async def client_write(self, cmd: Command) -> Any: ...
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


def _strings(values: Any, name: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"{name} must be a list of strings")
    return values


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
        self.in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        self.counter = counter
        self.watches: dict[int, trio.CancelScope] = {}
        self.token = token
        self.authenticated = token is None
        self.stats = stats_for(node)  # counts and latencies for the dashboard
        self.metrics = metrics_for(node)  # Prometheus counters (metanode/metrics.py)
        self.ops: dict[str, Callable[[dict], Any]] = {
            "handshake": self.op_handshake,
            "upsert": self.op_upsert,
            "txn": self.op_txn,
            "get": self.op_get,
            "mget": self.op_mget,
            "list": self.op_list,
            "member_list": self.op_member_list,
            "cluster_status": self.op_cluster_status,
            "watch": self._watch,  # streams: dispatched with its id by _serve
        }

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                # Backpressure: at most MAX_IN_FLIGHT requests per socket; beyond that
                # we stop reading and the client's sends block (trio-websocket's
                # queue, then TCP), instead of holding unbounded tasks and replies.
                await self.in_flight.acquire()
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    self.in_flight.release()
                    break
                nursery.start_soon(self.serve, message)
            nursery.cancel_scope.cancel()

    async def serve(self, message: bytes | str) -> None:
        try:
            with self.counter:
                self.metrics.received(len(message))
                self.metrics.req_inflights.inc()
                try:
                    await self._serve(message)
                finally:
                    self.metrics.req_inflights.dec()
        finally:
            self.in_flight.release()

    async def _serve(self, message: bytes | str) -> None:
        rid: Any = None
        try:
            if isinstance(message, str):
                raise BadRequest("messages must be binary msgpack, not text")
            try:
                req = msgpack.unpackb(
                    message, raw=False, strict_map_key=False,
                    max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
                )
            except (ValueError, TypeError, msgpack.UnpackException) as e:
                raise BadRequest(f"malformed msgpack: {type(e).__name__} {e}".rstrip()) from None
            if isinstance(req, dict):
                rid = req.get("id")
            if len(message) > self.max_message_size:
                raise TooLarge(f"message of {len(message)} bytes is over the limit of {self.max_message_size}")
            if not isinstance(req, dict):
                raise BadRequest("a request must be a msgpack map")
            if not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
                raise BadRequest("a request needs a non-negative integer 'id'")
            name = req.get("op")
            if not self.authenticated:
                self._authenticate(name, req)
                if name == "handshake":
                    result = await self.op_handshake(req)
                    reply: dict = {"id": rid, "ok": result}
                    await self._send(reply)
                    return
            if name == "cancel":
                self._cancel(rid)
                return  # the watch's stream ends with its own reply
            op = self.ops.get(name) if isinstance(name, str) else None
            if op is None:
                raise BadRequest(f"unknown op {req.get('op')!r}")
            if name == "watch":
                result = await self._watch(rid, req)
            elif self.stats is not None and name in KIND_OF_OP:
                started = time.perf_counter()
                ok = False
                try:
                    result = await op(req)
                    ok = True
                finally:
                    self.stats.record(KIND_OF_OP[name], time.perf_counter() - started, ok)
                    self.metrics.request_done(name, time.perf_counter() - started, ok)
            else:
                result = await op(req)
            reply = {"id": rid, "ok": result}
        except Unauthenticated as e:
            # contract §5: anything but a valid handshake first gets this and the socket closes.
            with contextlib.suppress(ConnectionClosed):
                await self._send({"id": rid, "error": self._error(e)})
                await self.ws.aclose(1008, "unauthenticated")
            return
        except ClientError as e:
            reply = {"id": rid, "error": self._error(e)}
        except Exception:
            log.exception("client request failed")
            reply = {"id": rid, "error": {"code": "internal", "message": "internal error", "leader": None}}
        try:
            data = msgpack.packb(reply, use_bin_type=True)
            await self.ws.send_message(data)
            self.metrics.sent([reply], len(data))
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
        data = msgpack.packb(message, use_bin_type=True)
        await self.ws.send_message(data)
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

    async def op_upsert(self, req: dict) -> dict:
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
        return change_out(await self.node.client_write(cmd))

    async def op_txn(self, req: dict) -> dict:
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
        reply = await self.node.client_write(cmd)
        assert isinstance(reply, TxnReply)
        return {"success": reply.success, "responses": [txn_response_out(r) for r in reply.responses]}

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
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the client API on `address` until `shutdown` is set; then let requests in
    flight answer (up to SHUTDOWN_GRACE_S), close every socket with 1001, set `closed`
    and return. `task_status.started("host:port")` once listening; a port in use
    raises OSError (itself, not in an exception group). `closed` is set on the way out
    however it ends, cancelled too, so a shutdown never waits for it in vain."""
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
                    serve_websocket, handler, host, port, None, handler_nursery=nursery,
                    max_message_size=2 * max_message_size + (1 << 20), message_queue_size=64,
                    receive_buffer_size=None,
                )
            )
            bound = server.port
            log.info("client API listening on ws://%s:%d%s", host, bound, PATH)
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
