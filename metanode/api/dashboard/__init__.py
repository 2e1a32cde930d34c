"""The live cluster dashboard on the admin port (contract §4 ``GET /``, beyond databend-meta).

``GET /`` is one static page (``index.html``, ``app.js``, ``style.css`` in this
package: no build step, nothing fetched from elsewhere, a Content-Security-Policy that
forbids it). Once a second the page asks the node that served it for
``GET /v1/dashboard/stats``, which `Dashboard.view` answers from what this node knows:

* ``status``: its own ``/v1/cluster/status``, as that route returns it (the page
  reads both its current shape and databend-meta's MetaNodeStatus);
* ``peers``: the same status of every other member, asked over the client API
  (``cluster_status``) at the member's published ``grpc_api_advertise_address``
  while a page is watching (`PEER_IDLE_S`), with the error when it does not answer;
  members that publish no address are shown from this node's view only;
* ``links``: whether this node's raft connection to each peer is up, and on the
  leader each follower's replication state (probe, replicate, snapshot);
* ``series``: one point a second for the last `HISTORY` seconds: log entries applied
  per second (the cluster's write rate, as every member applies every entry), KV
  sequence numbers per second, and the client requests this node's client API served
  (`metanode.api.reqstats`) with their p50/p99 latency;
* ``events``: leader changes, membership changes and its raft links to members going
  down or up this node observed (sampled every `SAMPLE_S`) since its admin API started.

Nothing is estimated: a number the node does not have is null and the page says so.
"""

from __future__ import annotations

import collections
import importlib.resources
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import trio

from metanode.api.reqstats import RequestStats, stats_for
from metanode.errors import BadRequest

log = logging.getLogger("metanode.admin.dashboard")

#: Seconds between two looks at the node's status (events are found at this grain).
SAMPLE_S = 0.25
#: Seconds between two points of the series.
POINT_S = 1.0
#: Points kept (seconds of history).
HISTORY = 300
#: Events kept.
MAX_EVENTS = 100
#: A raft link must stay up (or down) this long to make an event.
LINK_STEADY_S = 1.0
#: Peers are polled while a page asked for stats in the last this many seconds.
PEER_IDLE_S = 30.0
#: Seconds between two polls of one peer, and the timeout of one poll.
PEER_POLL_S = 1.0
PEER_TIMEOUT_S = 1.5

#: The page's files: name -> content type. Nothing else is served.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: The page loads only its own files and talks only to the node that served it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def load_assets() -> dict[str, bytes]:
    """The page's files, read once from the installed package."""
    root = importlib.resources.files(__name__)
    return {name: root.joinpath(name).read_bytes() for name in ASSETS}


# --------------------------------------------------------------- status, either shape


def node_id_of(value: Any) -> int | None:
    """A member id from an int, a Node record ``{"name": "2", ...}`` or ``{"id": 2}``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("id"), int):
            return value["id"]
        name = value.get("name")
        if isinstance(name, str) and name.isascii() and name.isdigit():
            return int(name)
    return None


def member_ids(values: Any) -> list[int]:
    if not isinstance(values, list):
        return []
    ids = (node_id_of(v) for v in values)
    return sorted(i for i in ids if i is not None)


def index_of(log_id: Any) -> int | None:
    """The index of a log id ``{"index": I, ...}`` or a bare int; None for null."""
    if isinstance(log_id, bool):
        return None
    if isinstance(log_id, int):
        return log_id
    if isinstance(log_id, dict) and isinstance(log_id.get("index"), int):
        return log_id["index"]
    return None


class _Observed:
    """What one status says, as the sampler compares it."""

    __slots__ = ("term", "leader", "voters", "learners", "applied", "last_seq", "snapshot", "purged")

    def __init__(self, status: dict) -> None:
        term = status.get("current_term")
        self.term = term if isinstance(term, int) else None
        self.leader = node_id_of(status.get("leader"))
        self.voters = tuple(member_ids(status.get("voters")))
        self.learners = tuple(member_ids(status.get("non_voters")))
        self.applied = index_of(status.get("last_applied"))
        last_seq = status.get("last_seq")
        self.last_seq = last_seq if isinstance(last_seq, int) else None
        self.snapshot = index_of(status.get("snapshot_last_log_id"))
        self.purged = index_of(status.get("purged"))


def _ids(ids: tuple[int, ...]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def _rate(now: int | None, before: int | None, dt: float) -> float | None:
    if now is None or before is None or dt <= 0 or now < before:
        return None
    return round((now - before) / dt, 2)


# ------------------------------------------------------------------------ the sampler


class Dashboard:
    """The dashboard's memory of one node: its series, its events, its peers' status.

    `observe` looks at the node (cheap; called every `SAMPLE_S` by `run` and on each
    stats request); `view` is the ``/v1/dashboard/stats`` body. `run` is the sampler
    task `serve_admin` runs beside the server; without it (an app built alone) the
    page's own polls drive `observe` and no peer is polled.
    """

    def __init__(
        self,
        node: Any,
        *,
        client_token: str | None = None,
        client_tls: ssl.SSLContext | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.node = node
        self.client_token = client_token
        self.client_tls = client_tls  # peers' client APIs are wss:// when ours is
        self.wall_ms = wall_ms
        self.requests: RequestStats | None = stats_for(node)
        self.series: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self.events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)
        self.peers: dict[int, dict] = {}
        self._last: _Observed | None = None
        self._point_at: float | None = None  # trio clock of the last point
        self._point_base: _Observed | None = None
        self._viewed_at: float | None = None
        self._pollers: dict[tuple[int, str], trio.CancelScope] = {}
        # peer -> (steady link state, (new state, since: trio clock, wall ms) | None)
        self._link_state: dict[int, tuple[bool | None, tuple[bool, float, int] | None]] = {}
        self._nursery: trio.Nursery | None = None
        self.started_ms = wall_ms()

    # -------------------------------------------------------------- observing
    def _event(self, kind: str, text: str, obs: _Observed) -> None:
        self.events.append(
            {"t": self.wall_ms(), "kind": kind, "text": text, "term": obs.term, "leader": obs.leader}
        )

    def observe(self) -> dict | None:
        """Look at the node once: record events, maybe a point; its status (None if
        the node failed to give one)."""
        try:
            status = self.node.cluster_status()
        except Exception as exc:  # the route reports it; the sampler keeps going
            log.debug("dashboard: status failed: %s", exc)
            return None
        obs = _Observed(status)
        prev = self._last
        if prev is None:
            self._event("start", "dashboard sampling started; "
                        + (f"node {obs.leader} leads" if obs.leader is not None else "no leader")
                        + (f" at term {obs.term}" if obs.term is not None else ""), obs)
        else:
            if (obs.leader, obs.term) != (prev.leader, prev.term):
                if obs.leader is None:
                    self._event("leader", f"no leader at term {obs.term}", obs)
                elif obs.leader != prev.leader:
                    self._event("leader", f"node {obs.leader} became leader at term {obs.term}", obs)
                else:
                    self._event("leader", f"node {obs.leader} leads again at term {obs.term}", obs)
            if obs.voters != prev.voters:
                self._event("membership", f"voters {_ids(prev.voters)} \u2192 {_ids(obs.voters)}", obs)
            if obs.learners != prev.learners:
                self._event("membership", f"learners {_ids(prev.learners)} \u2192 {_ids(obs.learners)}", obs)
        self._watch_links(obs)
        self._last = obs
        now = trio.current_time()
        if self._point_at is None:
            self._point_at, self._point_base = now, obs
            if self.requests is not None:
                self.requests.take()  # start the first period here
        elif now - self._point_at >= POINT_S * 0.95:
            self._add_point(now, obs)
        return status

    def _add_point(self, now: float, obs: _Observed) -> None:
        assert self._point_at is not None and self._point_base is not None
        dt = now - self._point_at
        base = self._point_base
        requests = self.requests.take() if self.requests is not None else None
        point: dict[str, Any] = {
            "t": self.wall_ms(),
            "dt": round(dt, 3),
            "applied": obs.applied,
            "applied_per_s": _rate(obs.applied, base.applied, dt),
            "seq_per_s": _rate(obs.last_seq, base.last_seq, dt),
        }
        for kind in ("write", "read"):
            r = requests.get(kind) if requests is not None else None
            point[f"{kind}s_per_s"] = round(r["count"] / dt, 2) if r is not None else None
            point[f"{kind}_errors"] = r["errors"] if r is not None else None
            point[f"{kind}_p50_ms"] = r["p50_ms"] if r is not None else None
            point[f"{kind}_p99_ms"] = r["p99_ms"] if r is not None else None
        self.series.append(point)
        self._point_at, self._point_base = now, obs

    def _watch_links(self, obs: _Observed) -> None:
        """A ``member`` event when this node's raft link to a member goes down or
        comes back and stays so for `LINK_STEADY_S` (a reconnect is no event)."""
        now = trio.current_time()
        members = set(obs.voters) | set(obs.learners)
        for key, info in self.links().items():
            connected = info.get("connected")
            peer = int(key)
            if not isinstance(connected, bool) or peer not in members:
                continue
            steady, pending = self._link_state.get(peer, (None, None))
            if steady is None:
                self._link_state[peer] = (connected, None)
            elif connected == steady:
                self._link_state[peer] = (steady, None)
            elif pending is None or pending[0] != connected:
                self._link_state[peer] = (steady, (connected, now, self.wall_ms()))
            elif now - pending[1] >= LINK_STEADY_S:
                self._link_state[peer] = (connected, None)
                text = (f"raft link to node {peer} up again" if connected
                        else f"raft link to node {peer} down: node {peer} unreachable")
                self.events.append(
                    {"t": pending[2], "kind": "member", "text": text, "term": obs.term, "leader": obs.leader,
                     "node": peer, "up": connected}
                )

    # ----------------------------------------------------------------- the view
    def links(self) -> dict[str, dict]:
        """This node's raft links and, on the leader, each follower's replication
        state; empty for a node object without them."""
        out: dict[str, dict] = {}
        for peer, link in dict(getattr(self.node, "_links", None) or {}).items():
            connected = getattr(link, "connected", None)
            if isinstance(connected, bool):
                out[str(peer)] = {"connected": connected}
        core = getattr(self.node, "core", None)
        if getattr(core, "is_leader", False):
            for peer, progress in dict(getattr(core, "progress", None) or {}).items():
                state = getattr(getattr(progress, "state", None), "value", None)
                if isinstance(state, str):
                    out.setdefault(str(peer), {})["replication_state"] = state
        return out

    def view(self, since_ms: int | None = None) -> dict:
        self._viewed_at = trio.current_time()
        status = self.observe()
        if status is None:
            status = self.node.cluster_status()  # raises: the route answers the error
        now = self.wall_ms()
        try:
            config = self.node.config_json()
        except Exception:
            config = {}
        raft = config.get("raft_config") if isinstance(config, dict) else None
        try:
            nodes = self.node.cluster_nodes()
        except Exception:
            nodes = []
        self._sync_pollers(status, nodes)
        series = [p for p in self.series if since_ms is None or p["t"] > since_ms]
        return {
            "now_ms": now,
            "started_ms": self.started_ms,
            "cluster_name": raft.get("cluster_name") if isinstance(raft, dict) else None,
            "admin_api_address": config.get("admin_api_address") if isinstance(config, dict) else None,
            "status": status,
            "nodes": nodes,
            "peers": {
                str(peer): {**info, "age_ms": now - info["at_ms"] if info.get("at_ms") else None}
                for peer, info in sorted(self.peers.items())
            },
            "links": self.links(),
            "sample_s": POINT_S,
            "series": series,
            "events": list(self.events)[-50:],
        }

    # -------------------------------------------------------------------- peers
    def _peer_addresses(self, status: dict, nodes: list[dict]) -> dict[int, str]:
        me = node_id_of(status)
        members = set(member_ids(status.get("voters"))) | set(member_ids(status.get("non_voters")))
        out: dict[int, str] = {}
        for record in nodes if isinstance(nodes, list) else []:
            peer = node_id_of(record)
            address = record.get("grpc_api_advertise_address") if isinstance(record, dict) else None
            if peer is not None and peer != me and peer in members and isinstance(address, str) and address:
                out[peer] = address
        return out

    def _sync_pollers(self, status: dict, nodes: list[dict]) -> None:
        if self._nursery is None:
            return
        wanted = set(self._peer_addresses(status, nodes).items())
        for key in list(self._pollers):
            if key not in wanted:
                self._pollers.pop(key).cancel()
                self.peers.pop(key[0], None)
        for key in wanted - set(self._pollers):
            scope = trio.CancelScope()
            self._pollers[key] = scope
            self._nursery.start_soon(self._poll_peer, key[0], key[1], scope)

    def _stop_pollers(self) -> None:
        for scope in self._pollers.values():
            scope.cancel()
        self._pollers.clear()
        self.peers.clear()

    async def _poll_peer(self, peer: int, address: str, scope: trio.CancelScope) -> None:
        """Ask `peer` for its status once a second until cancelled, one connection
        kept open; every failure is recorded and the connection made again."""
        from metanode.client import MetaClient  # the client imports nothing from api/

        info: dict[str, Any] = {
            "address": address, "status": None, "at_ms": None,
            "error": None, "error_ms": None, "failing_since_ms": None,
        }
        self.peers[peer] = info
        with scope:
            while True:
                try:
                    async with MetaClient.connect(
                        [address], token=self.client_token, timeout=PEER_TIMEOUT_S, tls=self.client_tls
                    ) as client:
                        while True:
                            status = await client.cluster_status()
                            info.update(status=status, at_ms=self.wall_ms(), error=None, failing_since_ms=None)
                            await trio.sleep(PEER_POLL_S)
                except Exception as exc:  # unreachable, refused, timed out: keep trying
                    message = str(exc) or type(exc).__name__
                    now = self.wall_ms()
                    info.update(error=message, error_ms=now)
                    if info.get("failing_since_ms") is None:
                        info["failing_since_ms"] = now
                await trio.sleep(PEER_POLL_S)

    # ------------------------------------------------------------------ the task
    async def run(self) -> None:
        """Sample forever (cancel to stop); poll peers while a page is watching."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    self.observe()
                    if self._pollers and (
                        self._viewed_at is None or trio.current_time() - self._viewed_at > PEER_IDLE_S
                    ):
                        self._stop_pollers()
                    await trio.sleep(SAMPLE_S)
            finally:
                self._nursery = None
                self._stop_pollers()


def parse_since(values: list[str]) -> int | None:
    """The optional ``since`` parameter (wall-clock milliseconds): only points after it."""
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter 'since' given {len(values)} times; give it once")
    text = values[0]
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(f"query parameter 'since' must be milliseconds since the epoch, got {text!r}")
    return int(text)
