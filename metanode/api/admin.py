"""The admin HTTP API (contract §4): Quart-Trio on Hypercorn.

`create_app(node, token=...)` builds the app; `serve_admin(node, address, ...)` binds
``admin_api_address`` and serves it until its `shutdown` event is set. The app sees the
node only through `AdminNode`, so it is tested against a fake.

Routes (all ``GET``; JSON bodies are ``application/json``, keys in the node's order):

* ``/v1/health`` -> ``{"status":"pass"}`` once the node is ready (it knows a leader and
  applied what that leader had committed: metanode/node/ready.py), else 503
  ``{"status":"fail","reason":...}``
* ``/v1/config`` -> the effective config, secrets already redacted by the node
* ``/v1/cluster/nodes`` -> ``[{"name":"1","endpoint":{"addr":..,"port":..},
  "grpc_api_advertise_address":..}, ...]`` as the tutorial shows
* ``/v1/cluster/status`` -> the node's status dict as is
* ``/v1/metrics`` and ``/metrics`` -> Prometheus exposition (format by ``Accept``) of
  databend-meta's metrics and metanode's own (metanode/metrics.py)
* ``/v1/ctrl/trigger_snapshot`` -> ``null`` once the snapshot is built
* ``/v1/ctrl/trigger_transfer_leader[?to=ID]`` -> ``{"from","to","voter_ids"}``
* ``/`` -> the live cluster dashboard (HTML; its files under ``/dashboard/``) and
  ``/v1/dashboard/stats[?since=MS]`` -> what the page shows (`metanode.api.dashboard`)

Errors are JSON ``{"error": message}``: unknown route 404, wrong method 405, a bad
parameter 400, a missing or wrong token on ``/v1/ctrl/*`` 401 (when a token is
configured), and a `ClientError` from the node its natural status (`NotLeader` 404 with
``"leader"``, `BadRequest` 400, `Unavailable` 503, `Timeout` 504, ...). Anything else is
logged with its traceback and answered 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, Protocol, TypeVar

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from metanode.api.dashboard import ASSETS, CONTENT_SECURITY_POLICY, Dashboard, load_assets, parse_since
from metanode.config import format_address, parse_address
from metanode.metrics import metrics_for
from metanode.errors import (
    BadRequest,
    ClientError,
    NotLeader,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("metanode.admin")

JSON_CONTENT_TYPE = "application/json"

#: How long in-flight requests may run after `shutdown` is set before they are cut.
GRACEFUL_TIMEOUT = 2.0

#: How long an idle keep-alive connection stays open.
KEEP_ALIVE_TIMEOUT = 5.0

#: HTTP status of each `ClientError` class (the most specific class wins).
STATUS_OF_ERROR: dict[type[ClientError], int] = {
    NotLeader: 404,  # contract §4: "not leader: 404 with the current leader"
    BadRequest: 400,
    Unauthenticated: 401,
    TooLarge: 413,
    Unavailable: 503,
    Timeout: 504,
}

class AdminNode(Protocol):
    """What the admin app needs from a node."""

    def config_json(self) -> dict:
        """The effective config, secrets already redacted."""
        ...

    def cluster_nodes(self) -> list[dict]:
        """Node records from the local committed state, ordered by id."""
        ...

    def cluster_status(self) -> dict:
        """contract §4 ``/v1/cluster/status``, already shaped."""
        ...

    def metrics(self) -> dict[str, float]:
        """The ``metanode_*`` gauges: metric name -> value (the ``metasrv_*`` metrics
        are read from the node by `metanode.metrics.NodeMetrics.update`)."""
        ...

    async def trigger_snapshot(self) -> None:
        """Build a snapshot now; return once it is built."""
        ...

    async def transfer_leader(self, to: int | None) -> dict:
        """Move leadership to `to` (or a voter of the node's choice): ``{"from", "to",
        "voter_ids"}``. `NotLeader` when not the leader, `BadRequest` for a bad target."""
        ...


# ------------------------------------------------------------------------- responses


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`value` as compact JSON, keys in their given order (Quart's jsonify sorts them)."""
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return Response(body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


def error_response(message: str, status: int, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


def status_of(exc: ClientError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF_ERROR:
            return STATUS_OF_ERROR[cls]  # type: ignore[index]
    return 500


def client_error_response(exc: ClientError) -> Response:
    message = str(exc) or exc.code
    if isinstance(exc, NotLeader):
        return error_response(message, 404, leader=exc.leader)
    return error_response(message, status_of(exc))


# ---------------------------------------------------------------------------- metrics


async def render_metrics(node: AdminNode, accept: str | None, health: HealthCheck) -> tuple[bytes, str]:
    """One scrape: the node's `NodeMetrics` (metanode/metrics.py) updated from its
    state now, as Prometheus text (or OpenMetrics when `accept` asks), and its
    content type."""
    metrics = metrics_for(node)
    metrics.update(node, healthy=(await health()) is None)
    return metrics.render(accept)


# -------------------------------------------------------------------------------- app

_Handler = TypeVar("_Handler", bound=Callable[..., Coroutine[Any, Any, Any]])


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def parse_node_id(name: str, values: list[str]) -> int | None:
    """An optional node id query parameter (an integer >= 0); `BadRequest` naming it if not."""
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name!r} given {len(values)} times; give it once")
    text = values[0]
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(
            f"query parameter {name!r} must be a node id (an integer >= 0), got {text!r}"
        )
    return int(text)


HealthCheck = Callable[[], Coroutine[Any, Any, "str | None"]]


def node_health(node: Any) -> HealthCheck:
    """The readiness rule of a running node (metanode/node/ready.py) as a health check:
    None when ready, else the reason."""

    async def check() -> str | None:
        from metanode.node.ready import readiness_of

        return await readiness_of(node).check()

    return check


def create_app(
    node: AdminNode, *, token: str | None, dashboard: Dashboard | None = None,
    health: HealthCheck | None = None,
) -> QuartTrio:
    """The admin app over `node`. With `token` set, ``/v1/ctrl/*`` require
    ``Authorization: Bearer <token>``; read routes never do. `dashboard` keeps the
    page's history (`serve_admin` runs its sampler); by default a fresh one that only
    samples when the page asks. `health` answers None when ready, else the reason
    (default: `node_health(node)`)."""
    check_health = health if health is not None else node_health(node)
    if token is not None and not token:
        raise ValueError("admin_api_token must not be empty (leave it unset for no token)")
    expected = token.encode("utf-8") if token is not None else None
    board = dashboard if dashboard is not None else Dashboard(node)
    assets = load_assets()

    # No static folder: Quart's default would serve files from "<cwd>/static".
    app = QuartTrio("metanode.admin", static_folder=None)
    # Quart's `app.logger` would start a QueueListener thread on first use when the
    # logger has no handler: every error path below logs to `log` instead.

    def mutating(handler: _Handler) -> _Handler:
        @wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if expected is not None:
                given = _bearer_token(request.headers.get("Authorization"))
                if given is None:
                    return _unauthorized(
                        "missing token: send 'Authorization: Bearer <admin_api_token>'"
                    )
                # Header values arrive latin-1 decoded: compare the raw bytes.
                try:
                    given_bytes = given.encode("latin-1")
                except UnicodeEncodeError:
                    given_bytes = given.encode("utf-8")
                if not hmac.compare_digest(given_bytes, expected):
                    return _unauthorized("invalid admin API token")
            return await handler(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    @app.get("/v1/health")
    async def health_route() -> Response:
        reason = await check_health()
        if reason is None:
            return json_response({"status": "pass"})
        return json_response({"status": "fail", "reason": reason}, 503)

    @app.get("/v1/config")
    async def config() -> Response:
        return json_response(node.config_json())

    @app.get("/v1/cluster/nodes")
    async def cluster_nodes() -> Response:
        return json_response(node.cluster_nodes())

    @app.get("/v1/cluster/status")
    async def cluster_status() -> Response:
        return json_response(node.cluster_status())

    @app.get("/v1/metrics")
    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = await render_metrics(node, request.headers.get("Accept"), check_health)
        return Response(body, status=200, content_type=content_type)

    def asset(name: str) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if name == "index.html":
            headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return Response(assets[name], status=200, content_type=ASSETS[name], headers=headers)

    @app.get("/")
    async def dashboard_page() -> Response:
        return asset("index.html")

    @app.get("/dashboard/<name>")
    async def dashboard_asset(name: str) -> Response:
        if name not in ASSETS or name == "index.html":
            raise NotFound()
        return asset(name)

    @app.get("/v1/dashboard/stats")
    async def dashboard_stats() -> Response:
        since = parse_since(request.args.getlist("since"))
        return json_response(board.view(since), headers={"Cache-Control": "no-store"})

    @app.get("/v1/ctrl/trigger_snapshot")
    @mutating
    async def trigger_snapshot() -> Response:
        await node.trigger_snapshot()
        return json_response(None)

    @app.get("/v1/ctrl/trigger_transfer_leader")
    @mutating
    async def trigger_transfer_leader() -> Response:
        to = parse_node_id("to", request.args.getlist("to"))
        return json_response(await node.transfer_leader(to))

    @app.errorhandler(ClientError)
    async def on_client_error(exc: ClientError) -> Response:
        return client_error_response(exc)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if isinstance(exc, NotFound):
            return error_response(f"not found: {request.path}", 404)
        if isinstance(exc, MethodNotAllowed):
            allowed = sorted(exc.valid_methods or [])
            message = f"method {request.method} not allowed on {request.path}"
            response = error_response(f"{message}; allowed: {', '.join(allowed)}", 405)
            response.headers["Allow"] = ", ".join(allowed)
            return response
        return error_response(exc.description or exc.name, status)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.error("admin API: %s %s failed", request.method, request.path, exc_info=exc)
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500)

    return app


def _unauthorized(message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="metanode"'}
    return json_response({"error": message}, 401, headers=headers)


# ---------------------------------------------------------------------------- serving


async def bind_socket(address: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: the OS picks). `ValueError` for a
    malformed address; `OSError` naming the address when it cannot be bound."""
    host, port = parse_address(address)
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind {address}: cannot resolve {host!r}: {exc}") from exc
    # Prefer IPv4 for names like "localhost", as hypercorn and databend-meta bind it.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind {address}: {exc.strerror or exc}") from exc
    return sock


def hypercorn_config(*, certfile: str | None = None, keyfile: str | None = None) -> HypercornConfig:
    cfg = HypercornConfig()
    cfg.include_server_header = False
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("metanode.admin.hypercorn")
    cfg.graceful_timeout = GRACEFUL_TIMEOUT
    cfg.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    if certfile is not None or keyfile is not None:
        if certfile is None or keyfile is None:
            raise ValueError("admin TLS needs both admin_tls_server_cert and admin_tls_server_key")
        cfg.certfile = certfile
        cfg.keyfile = keyfile
    return cfg


def shield_sends(app: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, None]]:
    """The ASGI `app` with every ``send`` shielded from cancellation.

    quart-trio cancels a request's nursery as soon as hypercorn reports the disconnect
    that ends a response, while the same ``send`` is still inside hypercorn's h11
    protocol re-arming the connection's keep-alive idle timer. The timer never starts,
    so an idle keep-alive connection is neither closed after ``keep_alive_timeout`` nor
    on shutdown, and every shutdown waits out ``graceful_timeout`` while a scraper holds
    one. Hypercorn already shields the socket write itself, so this blocks no longer.
    """

    async def asgi(scope: Any, receive: Any, send: Callable[[Any], Any]) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await app(scope, receive, shielded_send)

    return asgi


class _StartedAs:
    """A task status that reports our "host:port" instead of hypercorn's URL list."""

    def __init__(self, outer: trio.TaskStatus[str], bound: str) -> None:
        self.outer = outer
        self.bound = bound

    def started(self, value: object = None) -> None:
        self.outer.started(self.bound)


def _peer_client_tls(config: Any) -> Any:
    """The TLS context for peers' client APIs (metanode.tls), None without TLS."""
    if getattr(config, "grpc_tls_server_cert", None) is None:
        return None
    from metanode.tls import peer_client_api_context

    return peer_client_api_context(config)


async def serve_admin(
    node: AdminNode,
    address: str,
    *,
    token: str | None,
    shutdown: trio.Event,
    certfile: str | None = None,
    keyfile: str | None = None,
    health: HealthCheck | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on `address` until `shutdown` is set (`health`: see
    `create_app`).

    ``task_status.started("host:port")`` (the bound address, so port 0 works) once
    listening. After `shutdown` is set, new connections are refused, idle keep-alive
    connections closed, and in-flight requests get `GRACEFUL_TIMEOUT` seconds to finish;
    then it returns. A port in use or an unresolvable host raises `OSError` naming the
    address before `started`; a malformed address raises `ValueError`.

    The socket is bound here, not by hypercorn: its own bind failure surfaces wrapped in
    exception groups after its lifespan task started, and it never closes the sockets it
    creates (a ResourceWarning at garbage collection).
    """
    # The dashboard asks peers for their status over the client API: with this
    # node's client token, as the members of one cluster share it.
    node_config = getattr(node, "config", None)
    board = Dashboard(
        node, client_token=getattr(node_config, "grpc_api_token", None),
        client_tls=_peer_client_tls(node_config),
    )
    app = create_app(node, token=token, dashboard=board, health=health)
    cfg = hypercorn_config(certfile=certfile, keyfile=keyfile)
    sock = await bind_socket(address)
    try:
        host, port = sock.getsockname()[:2]
        bound = format_address(host, port)
        tls = cfg.ssl_enabled
        sockets = Sockets(
            secure_sockets=[sock] if tls else [],
            insecure_sockets=[] if tls else [sock],
            quic_sockets=[],
        )
        log.info("admin API listening on %s://%s", "https" if tls else "http", bound)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(board.run)  # the dashboard's sampler, for as long as we serve
            await worker_serve(
                wrap_app(shield_sends(app), cfg.wsgi_max_body_size, "asgi"),
                cfg,
                sockets=sockets,
                shutdown_trigger=shutdown.wait,
                task_status=_StartedAs(task_status, bound),  # type: ignore[arg-type]
            )
            nursery.cancel_scope.cancel()
        log.info("admin API on %s stopped", bound)
    finally:
        sock.close()
