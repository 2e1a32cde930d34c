"""Prometheus metrics of one node, under databend-meta's names (docs/reference/metrics.md).

`NodeMetrics` holds one `CollectorRegistry` per node with prometheus_client's own
`Counter`, `Gauge` and `Histogram` objects, named as databend-meta names them
(``metasrv_server_*``, ``metasrv_raft_network_*``, ``metasrv_raft_storage_*``,
``metasrv_meta_network_*``; a counter ``x`` is exposed as ``x_total``), plus metanode's
own ``metanode_*`` gauges. `metrics_for(node)` finds a node's one `NodeMetrics`, so the
client API (which moves the request counters as requests are served) and the admin
API (which renders a scrape) share it without the node carrying it.

Two kinds of quantities:

- events the client API sees (requests, their delays, bytes, watch items) move their
  counters and histograms as they happen, through the `ClientHooks` methods;
- state and counts kept by the node runtime (raft state, the WAL, peer links, the
  raft port, the driver's plain int counters) are read by `update(node)` at scrape
  time: gauges are set, and counters advance by what their source counted since the
  last scrape.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

# databend-meta exposes no ``*_created`` series; neither do we.
prometheus_client.disable_created_metrics()

#: databend-meta's buckets of ``metasrv_meta_network_rpc_delay*_ms`` (milliseconds).
RPC_DELAY_BUCKETS_MS: tuple[float, ...] = tuple(
    float(m * 10**e) for e in range(5) for m in (1, 2, 3, 4, 5, 7)
)
#: databend-meta's buckets of ``metasrv_raft_network_append_sent_seconds``: 1 ms to 524 s.
APPEND_SENT_BUCKETS_S: tuple[float, ...] = tuple(0.001 * 2**i for i in range(20))

#: HELP texts of the ``metanode_*`` gauges `node.metrics()` reports.
METANODE_HELP: dict[str, str] = {
    "metanode_raft_term": "Current raft term of this node.",
    "metanode_raft_is_leader": "1 if this node is the leader, else 0.",
    "metanode_raft_leader_id": "Id of the leader this node knows of, 0 if none.",
    "metanode_raft_last_log_index": "Index of the last entry in this node's log.",
    "metanode_raft_commit_index": "Highest log index known to be committed.",
    "metanode_raft_applied_index": "Highest log index applied to the state machine.",
    "metanode_raft_voters": "Number of voters in the committed membership.",
    "metanode_sm_keys": "Number of live keys in the state machine.",
    "metanode_sm_last_seq": "The global seq: the seq of the latest insert or update.",
}

#: Client API ops whose items count as databend-meta's streamed items.
STREAM_OPS = ("get", "mget", "list")
#: Client API ops counted as reads and writes (``rpc_delay_read_ms``, ``_write_ms``).
READ_OPS = frozenset(("get", "mget", "list"))
WRITE_OPS = frozenset(("upsert", "txn"))

#: What `promtool check metrics` (its lint) reports on an exposition, every one about a
#: name databend-meta gives the metric and its dashboards and tests read: kept.
PROMTOOL_LINT_FINDINGS: frozenset[str] = frozenset(
    [
        f"metasrv_meta_network_{name} metric names should not contain abbreviated units"
        for name in ("rpc_delay_ms", "rpc_delay_read_ms", "rpc_delay_write_ms")
    ]
    + [
        f'metasrv_server_{name} non-histogram and non-summary metrics should not have "_count" suffix'
        for name in ("snapshot_key_count", "raft_log_wal_closed_chunk_count")
    ]
)

#: Samples of `PeerLinkStats.append_seconds` kept between two scrapes (per link).
MAX_PENDING_SAMPLES = 4096


def observe_n(histogram: Histogram, amount: float, n: int) -> None:
    """`histogram.observe(amount)` `n` times, at the cost of one: a message's writes
    share one latency, and two observations a write were ~2 us of a leader's CPU.
    prometheus_client has no weighted observe, so this updates the Histogram's own
    `_sum` and `_buckets` (bounds `_upper_bounds`) as `observe` does; the test suite
    checks it against `observe` (tests/unit/test_metrics.py)."""
    if n == 1:
        histogram.observe(amount)
        return
    histogram._raise_if_not_observable()
    histogram._sum.inc(amount * n)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(n)
            break


class NodeMetrics:
    """The metrics of one node in its own registry (see the module doc)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def gauge(name: str, help_: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(name, help_, list(labels), registry=r)

        def counter(name: str, help_: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, help_, list(labels), registry=r)

        # ------------------------------------------------------------ server
        s = "metasrv_server_"
        self.current_leader_id = gauge(s + "current_leader_id", "current leader")
        self.is_leader = gauge(s + "is_leader", "is leader")
        self.node_is_health = gauge(s + "node_is_health", "node is health")
        self.leader_changes = counter(s + "leader_changes", "leader changes")
        self.applying_snapshot = gauge(s + "applying_snapshot", "if this node is applying snapshot")
        self.snapshot_key_count = gauge(s + "snapshot_key_count", "number of keys in the last snapshot")
        self.raft_log_cache_items = gauge(s + "raft_log_cache_items", "number of items in raft log cache")
        self.raft_log_cache_used_size = gauge(s + "raft_log_cache_used_size", "size of used space in raft log cache")
        self.raft_log_wal_open_chunk_size = gauge(s + "raft_log_wal_open_chunk_size", "size of open chunk in raft log wal")
        self.raft_log_wal_offset = gauge(s + "raft_log_wal_offset", "global offset of raft log WAL")
        self.raft_log_wal_closed_chunk_count = gauge(
            s + "raft_log_wal_closed_chunk_count", "number of closed chunks in raft log WAL"
        )
        self.raft_log_wal_closed_chunk_total_size = gauge(
            s + "raft_log_wal_closed_chunk_total_size", "total size of closed chunks in raft log WAL"
        )
        self.raft_log_size = gauge(s + "raft_log_size", "the size in bytes of the on disk data of raft log")
        self.last_log_index = gauge(s + "last_log_index", "last log index")
        self.last_seq = gauge(s + "last_seq", "last seq")
        self.current_term = gauge(s + "current_term", "current term")
        self.proposals_applied = gauge(s + "proposals_applied", "proposals applied")
        self.proposals_pending = gauge(
            s + "proposals_pending", "proposals pending, raft-log is proposed, not yet applied"
        )
        self.proposals_failed = counter(
            s + "proposals_failed", "number of failed proposals(raft-log), due to leader change or storage error"
        )
        self.read_failed = counter(s + "read_failed", "read failed")
        self.watchers = gauge(s + "watchers", "watchers")
        self.version = gauge(s + "version", "version", ("component", "semver", "sha"))

        # ------------------------------------------------------ raft network
        n = "metasrv_raft_network_"
        self.active_peers = gauge(n + "active_peers", "active peers", ("id", "addr"))
        self.fail_connect_to_peer = gauge(n + "fail_connect_to_peer", "fail connect to peer", ("id", "addr"))
        self.raft_sent_bytes = counter(n + "sent_bytes", "sent bytes", ("to",))
        self.raft_recv_bytes = counter(n + "recv_bytes", "recv bytes", ("from",))
        self.sent_failures = counter(n + "sent_failures", "sent failures", ("to",))
        self.append_sent_seconds = Histogram(
            n + "append_sent_seconds", "append entries sent seconds", ["to"],
            buckets=APPEND_SENT_BUCKETS_S, registry=r,
        )
        self.snapshot_send_inflights = gauge(n + "snapshot_send_inflights", "snapshot send inflights", ("to",))
        self.snapshot_recv_inflights = gauge(n + "snapshot_recv_inflights", "snapshot recv inflights", ("from",))

        # ------------------------------------------------------ raft storage
        t = "metasrv_raft_storage_"
        self.raft_store_write_failed = counter(t + "raft_store_write_failed", "raft store write failed", ("func",))
        self.raft_store_read_failed = counter(t + "raft_store_read_failed", "raft store read failed", ("func",))
        self.snapshot_building = gauge(
            t + "snapshot_building", "The number of tasks that are building a snapshot. It should be 0 or 1."
        )
        self.snapshot_written_entries = counter(
            t + "snapshot_written_entries", "The number of entries written to the snapshot file."
        )

        # ------------------------------------------------------ meta network
        m = "metasrv_meta_network_"

        def delay(name: str, help_: str) -> Histogram:
            return Histogram(m + name, help_, buckets=RPC_DELAY_BUCKETS_MS, registry=r)

        self.rpc_delay_ms = delay("rpc_delay_ms", "rpc delay milliseconds")
        self.rpc_delay_read_ms = delay("rpc_delay_read_ms", "rpc delay milliseconds for read operations")
        self.rpc_delay_write_ms = delay("rpc_delay_write_ms", "rpc delay milliseconds for write operations")
        self.sent_bytes = counter(m + "sent_bytes", "sent bytes")
        self.recv_bytes = counter(m + "recv_bytes", "recv bytes")
        self.req_inflights = gauge(m + "req_inflights", "req inflights")
        self.req_success = counter(m + "req_success", "req success")
        self.req_failed = counter(m + "req_failed", "req failed")
        self.watch_initialization = counter(
            m + "watch_initialization", "Number of items sent during watch stream initialization"
        )
        self.watch_change = counter(m + "watch_change", "Number of items sent when data changes in a watch stream")
        self.stream_item_sent = {
            op: counter(m + f"stream_{op}_item_sent", f"Number of items sent in a stream {op} response")
            for op in STREAM_OPS
        }

        # --------------------------------------------------------- metanode
        self._extra: dict[str, Gauge] = {}
        for name, help_ in METANODE_HELP.items():
            self._extra[name] = gauge(name, help_)

        from metanode import __version__

        self.version.labels("metasrv", __version__, "").set(1)
        # What each counter fed at scrape time had counted at the last scrape.
        self._seen: dict[tuple[str, ...], int] = {}
        self._snapshot_peers: set[str] = set()  # labels of the snapshot inflight gauges
        self._snapshot_sources: set[str] = set()

    # ------------------------------------------------------------------ events
    # The client API's hooks (metanode/api/client_api.py): called as it serves.
    def received(self, nbytes: int) -> None:
        """A message of `nbytes` from a client."""
        self.recv_bytes.inc(nbytes)

    def request_done(self, op: str, seconds: float, ok: bool) -> None:
        """A kv request (`READ_OPS`, `WRITE_OPS`) answered after `seconds`."""
        self.requests_done(op, seconds, 1, 0 if ok else 1)

    def requests_done(self, op: str, seconds: float, n: int, failed: int) -> None:
        """`n` kv requests of `op` answered together after `seconds`, `failed` of
        them with an error: as `n` calls of `request_done`, at one histogram update."""
        if op not in READ_OPS and op not in WRITE_OPS:
            return
        ms = seconds * 1000
        observe_n(self.rpc_delay_ms, ms, n)
        if op in READ_OPS:
            observe_n(self.rpc_delay_read_ms, ms, n)
            if failed:
                self.read_failed.inc(failed)
        else:
            observe_n(self.rpc_delay_write_ms, ms, n)

    def stream_items(self, op: str, n: int) -> None:
        """A get, mget or list answered with `n` items."""
        self.stream_item_sent[op].inc(n)

    def sent(self, messages: list[dict], nbytes: int) -> None:
        """One message of `nbytes` to a client, carrying `messages`: replies (``ok``
        or ``error``) or a watch item."""
        self.sent_bytes.inc(nbytes)
        ok = failed = 0
        for message in messages:
            if "event" in message:
                (self.watch_initialization if message.get("init") else self.watch_change).inc()
            elif "chunk" in message:  # a part of an export stream: its reply counts
                continue
            elif "error" in message:
                failed += 1
            else:
                ok += 1
        if ok:  # one increment for a message's replies (each increment takes a lock)
            self.req_success.inc(ok)
        if failed:
            self.req_failed.inc(failed)

    # ------------------------------------------------------------------ scrape
    def _advance(self, counter: Any, key: tuple[str, ...], value: int) -> None:
        """Move `counter` by what its source (`value`, counted since the source was
        created) counted since the last scrape."""
        last = self._seen.get(key, 0)
        self._seen[key] = value
        if value > last:
            counter.inc(value - last)
        elif value < last:  # a new source (a reopened store): it counted from 0
            counter.inc(value)

    def update(self, node: Any, *, healthy: bool | None = None) -> None:
        """Read the node's state and counts (a running `Node`; anything else only
        contributes its ``metrics()`` gauges)."""
        if healthy is not None:
            self.node_is_health.set(1 if healthy else 0)
        values = node.metrics() if hasattr(node, "metrics") else {}
        for name, value in values.items():
            if value is None:
                continue
            g = self._extra.get(name)
            if g is None:
                g = self._extra[name] = Gauge(name, f"metanode gauge {name}.", registry=self.registry)
            g.set(float(value))
        driver = getattr(node, "driver", None)
        if driver is not None:
            self._update_raft(node, driver)

    def _update_raft(self, node: Any, driver: Any) -> None:
        from metanode.node.status import raft_log
        from metanode.raft import Role

        core = driver.core
        st = core.status()
        leader = st.leader
        self.current_leader_id.set(leader or 0)
        self.is_leader.set(1 if st.role is Role.LEADER else 0)
        self.current_term.set(st.term)
        self.last_log_index.set(st.last_log_id.index)
        self.proposals_applied.set(driver.applied.index)  # as databend-meta: the applied index
        self.proposals_pending.set(len(getattr(driver, "_writes", ())))
        self.last_seq.set(driver.sm.last_seq)
        self.snapshot_key_count.set(len(driver.sm))
        self.applying_snapshot.set(
            1 if getattr(core, "_snap_rx", None) is not None or getattr(core, "_snapshot_to_install", None) else 0
        )
        self._advance(self.leader_changes, ("leader_changes",), getattr(driver, "stats_leader_changes", 0))
        self._advance(self.proposals_failed, ("proposals_failed",), getattr(driver, "stats_proposals_failed", 0))
        self._advance(
            self.snapshot_written_entries, ("snapshot_written_entries",),
            getattr(driver, "stats_snapshot_entries", 0),
        )
        hub = getattr(node, "watch_hub", None)
        self.watchers.set(len(hub.watchers) if hub is not None else 0)
        lock = getattr(node, "_snapshot_lock", None)
        self.snapshot_building.set(1 if lock is not None and lock.locked() else 0)

        storage = getattr(node, "storage", None)
        if storage is not None:
            try:
                rl = raft_log(node)
            except ValueError:  # the store is closing
                rl = None
            if rl is not None:
                self.raft_log_cache_items.set(rl["cache_items"])
                self.raft_log_cache_used_size.set(rl["cache_used_size"])
                self.raft_log_wal_open_chunk_size.set(rl["wal_open_chunk_size"])
                self.raft_log_wal_offset.set(rl["wal_offset"])
                self.raft_log_wal_closed_chunk_count.set(rl["wal_closed_chunk_count"])
                self.raft_log_wal_closed_chunk_total_size.set(rl["wal_closed_chunk_total_size"])
                self.raft_log_size.set(rl["wal_total_size"])
            stats = storage.stats
            for func, count in getattr(stats, "write_failures", {}).items():
                self._advance(self.raft_store_write_failed.labels(func), ("write_failed", func), count)
            for func, count in getattr(stats, "read_failures", {}).items():
                self._advance(self.raft_store_read_failed.labels(func), ("read_failed", func), count)

        links = dict(getattr(node, "_links", None) or {})
        for peer, link in sorted(links.items()):
            to = str(peer)
            addr = node.address_of(peer) or ""
            self.active_peers.labels(to, addr).set(1 if link.connected else 0)
            ls = link.stats
            failures = getattr(ls, "connect_failures", 0)
            if failures:
                self.fail_connect_to_peer.labels(to, addr).set(failures)
            self._advance(self.raft_sent_bytes.labels(to), ("raft_sent", to), getattr(ls, "sent_bytes", 0))
            self._advance(self.sent_failures.labels(to), ("raft_failed", to), getattr(ls, "send_failures", 0))
            samples = getattr(ls, "append_seconds", None)
            if samples:
                histogram = self.append_sent_seconds.labels(to)
                for seconds in samples:
                    histogram.observe(seconds)
                samples.clear()
        port = getattr(node, "raft_port_stats", None)
        if port is not None:
            for src, count in sorted(port.recv_bytes.items()):
                self._advance(self.raft_recv_bytes.labels(src), ("raft_recv", src), count)

        sending = {str(p): pr.snapshot is not None for p, pr in core.progress.items()} if st.role is Role.LEADER else {}
        for to in self._snapshot_peers | set(sending):
            self.snapshot_send_inflights.labels(to).set(1 if sending.get(to) else 0)
        self._snapshot_peers |= set(sending)
        receiving = getattr(core, "_snap_rx", None) is not None
        if receiving:
            self._snapshot_sources.add(str(leader or 0))
        for src in self._snapshot_sources:
            self.snapshot_recv_inflights.labels(src).set(1 if receiving and src == str(leader or 0) else 0)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when `accept` asks for it)
        and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


_BY_NODE: weakref.WeakKeyDictionary[Any, NodeMetrics] = weakref.WeakKeyDictionary()


def metrics_for(node: Any) -> NodeMetrics:
    """The one `NodeMetrics` of `node` (created on first use); a fresh one for an
    object that cannot be weakly referenced (then nothing is shared)."""
    try:
        found = _BY_NODE.get(node)
        if found is None:
            found = _BY_NODE[node] = NodeMetrics()
    except TypeError:
        return NodeMetrics()
    return found


__all__ = ["NodeMetrics", "metrics_for"]
