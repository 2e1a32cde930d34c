"""The recorded workload every scenario runs, and the checks made on what it saw.

- `CLIENTS` `MetaClient`s (each to every node, in its own order) run get, upsert,
  upsert with `match_seq`, delete and a small txn on `KEYS`, and write-once keys
  under `u/` (the "no acknowledged write is lost" check). Every operation is recorded
  for the linearizability checker (tests/sim/linearizability.py): a write that failed
  in any way has an unknown outcome, a failed read is dropped.
- A raw WebSocket watcher on every node (not `MetaClient.watch`, which drops a
  duplicate revision silently) watches every key from an initial flush, resumes with
  `from_seq` on the same node after any break, and records each event as received.
- A sampler polls every node's status: `last_seq`, term, leader, `last_applied`.

`Workload.check(...)` then asserts, after the faults ended: the history is
linearizable (a checker that gives up fails), every acknowledged write-once key is on
every live replica, the live replicas converge (`last_applied` and `state_digest`)
within 30 s of healing, seq and the applied index never decrease on a node, no term
has two leaders, the cluster accepted a write within 5 election timeouts of healing,
every watcher saw each change once, in order, without gaps, with the `prev` it had,
the same event at the same revision on every node, and ended with the node's state.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio
from trio_websocket import ConnectionClosed, HandshakeError, wrap_client_stream

from metanode.client import MetaClient, MetaError
from tests.robustness.cluster import Cluster
from tests.robustness.proxy import connect_tcp
from tests.sim.linearizability import CheckerGaveUp, Op, check

KEYS = tuple(f"k{i}" for i in range(8))
CLIENTS = 5
OP_TIMEOUT = 3.0
WATCH_KEY, WATCH_END = "", "\x7f"  # every key the suite writes is ASCII
SENTINEL = "~end"
CONVERGE_S = 30.0


_CONNECTION_ERRORS = (OSError, ConnectionClosed, HandshakeError, trio.BrokenResourceError,
                      trio.ClosedResourceError, trio.TooSlowError)


def _only(e: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Is `e` (or every exception of the group `e`) one of `types`?"""
    if isinstance(e, BaseExceptionGroup):
        return all(_only(x, types) for x in e.exceptions)
    return isinstance(e, types)


def sv(v: Any) -> tuple[int, bytes] | None:
    return None if v is None else (v.seq, v.data)


def _wire_sv(v: Any) -> tuple[int, bytes] | None:
    return None if v is None else (v["seq"], v["data"])


@attrs.define
class Sample:
    t: float
    node: int
    incarnation: int
    term: int
    is_leader: bool
    last_seq: int
    applied: int
    leader: str | None


class RawWatcher:
    """A watch of every key on one node, on the wire."""

    def __init__(self, cluster: Cluster, node_id: int) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.last_rev: int | None = None
        self.state: dict[str, tuple[int, bytes]] = {}
        self.events: dict[int, tuple[str, Any, Any]] = {}  # rev -> (key, prev, current)
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.reflushes: list[tuple[int | None, int]] = []
        self.connections = 0
        self._rid = 0
        self._flush: dict[str, tuple[int, bytes]] | None = None
        self.seen_sentinel: bytes | None = None
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        """Until cancelled (or `stop`): (re)connect to the node, watch, record."""
        with self.scope:
            await self._run()

    def stop(self) -> None:
        self.scope.cancel()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            spec = self.cluster.specs.get(self.node_id)
            if spec is None:
                return
            if not self.cluster.running(self.node_id) or self.node_id in self.cluster.paused:
                await trio.sleep(0.1)
                continue
            try:
                await self._session(spec.host, spec.grpc_port)
            except BaseException as e:
                if not _only(e, _CONNECTION_ERRORS):
                    raise
                self.notes.append(f"{type(e).__name__}: {e}"[:200])
            else:
                backoff = 0.05
            await trio.sleep(backoff)
            backoff = min(1.0, backoff * 2)

    async def _session(self, host: str, port: int) -> None:
        """One connection. The stream is ours and closed here: trio-websocket leaves a
        socket unclosed when the peer dies under it (a ResourceWarning)."""
        with trio.fail_after(2):
            stream = await connect_tcp(host, port)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(2):
                    ws = await wrap_client_stream(nursery, stream, host, "/v1", max_message_size=1 << 28,
                                                  message_queue_size=4096)
                try:
                    self.connections += 1
                    self._rid += 1
                    req: dict[str, Any] = {"id": self._rid, "op": "watch", "key": WATCH_KEY, "key_end": WATCH_END,
                                           "consistency": "local"}
                    if self.last_rev is None:
                        req["initial_flush"] = True
                        self._flush = {}
                    else:
                        req["from_seq"] = self.last_rev
                        self._flush = None
                    await ws.send_message(msgpack.packb(req, use_bin_type=True))
                    while True:
                        raw = await ws.get_message()
                        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                        # A message is one reply map or an array of them (client protocol).
                        if not all(self._on_message(m) for m in (msg if isinstance(msg, list) else [msg])):
                            break
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    def _on_message(self, msg: Any) -> bool:
        """Record one message; False when this stream is over (resume)."""
        if not isinstance(msg, dict) or msg.get("id") != self._rid:
            self.violations.append(f"node {self.node_id}: unexpected message {msg!r:.200}")
            return False
        if "error" in msg:
            err = msg["error"] or {}
            text = f"{err.get('code')}: {err.get('message')}"
            self.notes.append(text[:300])
            if err.get("code") == "bad_request" and "compacted" in str(err.get("message")):
                self.last_rev = None  # watch again with a flush (the protocol's way out)
            elif err.get("code") not in ("unavailable", "timeout"):
                self.violations.append(f"node {self.node_id}: watch error {text}")
            return False
        if "ok" in msg:
            self.notes.append("stream ended (ok)")
            return False
        if "event" not in msg:
            self.violations.append(f"node {self.node_id}: malformed watch message {msg!r:.200}")
            return False
        ev = msg["event"]
        if msg.get("init"):
            if self._flush is None:
                self.violations.append(f"node {self.node_id}: flush message on a resumed watch: {msg!r:.200}")
                return False
            if ev is not None:
                self._flush[ev["key"]] = _wire_sv(ev["current"])  # type: ignore[assignment]
                return True
            rev = msg["seq"]
            if self.events or self.reflushes:
                self.reflushes.append((max(self.events, default=None), rev))
            self.state = dict(self._flush)
            self._flush = None
            self.last_rev = rev
            if SENTINEL in self.state:  # a flush (after "history compacted") may hold it
                self.seen_sentinel = self.state[SENTINEL][1]
            return True
        rev, key = ev["seq"], ev["key"]
        prev, current = _wire_sv(ev["prev"]), _wire_sv(ev["current"])
        if self.last_rev is None:
            self.violations.append(f"node {self.node_id}: event before the flush marker: {msg!r:.200}")
            return False
        if rev <= self.last_rev:
            self.violations.append(
                f"node {self.node_id}: revision {rev} ({key!r}) received after {self.last_rev}: a duplicate or out of order"
            )
            return True
        if rev != self.last_rev + 1:
            self.violations.append(
                f"node {self.node_id}: revisions {self.last_rev + 1}..{rev - 1} missing before {rev} ({key!r})"
            )
        if self.state.get(key) != prev:
            self.violations.append(
                f"node {self.node_id}: revision {rev} on {key!r} has prev {prev!r:.80} but the watch held"
                f" {self.state.get(key)!r:.80}"
            )
        if current is None:
            self.state.pop(key, None)
        else:
            self.state[key] = current
        self.events[rev] = (key, prev, current)
        self.last_rev = rev
        if key == SENTINEL and current is not None:
            self.seen_sentinel = current[1]
        return True


class Workload:
    """Clients, watchers and the status sampler of one scenario."""

    def __init__(self, cluster: Cluster, *, clients: int = CLIENTS, keys: tuple[str, ...] = KEYS,
                 seed: int | None = None, pause: float = 0.01) -> None:
        self.cluster = cluster
        self.clients = clients
        self.keys = keys
        self.seed = seed if seed is not None else int(time.time())
        self.pause = pause
        self.history: list[Op] = []
        self.acked_unique: dict[str, tuple[int, bytes]] = {}
        self.seen: dict[str, list[int]] = {}
        self.samples: list[Sample] = []
        self.watchers: dict[int, RawWatcher] = {}
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.stop = trio.Event()
        self.healed: list[float] = []  # monotonic times at which faults ended
        self.recoveries: list[tuple[float, float | None]] = []  # (healed at, first write acknowledged after)
        self.extra_clients: list[tuple[list[str], str]] = []  # (addresses, name): pinned readers...
        self.t0 = time.monotonic()
        self.writes_after_heal_budget = 5 * cluster.election_timeout
        self.expected_exits: set[int] = set()  # nodes the test stopped or expects to exit
        self.wiped: set[int] = set()  # nodes whose data dir the test wiped (their term restarts)
        self._active_clients = 0

    # ------------------------------------------------------------------ running
    @asynccontextmanager
    async def running(self, watch: Iterable[int] | None = None) -> Any:
        """Start the watchers (on `watch`, default every node), the clients and the
        sampler; `stop_clients` stops the clients and the sampler, `finish` (inside
        the block) checks; leaving the block cancels what is left."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for i in watch if watch is not None else self.cluster.ids():
                self.add_watcher(i)
            self._clients_scope = trio.CancelScope()
            nursery.start_soon(self._run_clients)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def _run_clients(self) -> None:
        with self._clients_scope:
            async with trio.open_nursery() as nursery:
                for cid in range(self.clients):
                    nursery.start_soon(self._client, cid, None)
                for n, (addresses, _name) in enumerate(self.extra_clients):
                    nursery.start_soon(self._client, 100 + n, addresses)
                nursery.start_soon(self._sampler)

    async def stop_clients(self) -> None:
        """Stop the clients (each finishes its operation in flight) and the sampler."""
        self.stop.set()
        with trio.move_on_after(OP_TIMEOUT + 5):
            while self._active_clients:
                await trio.sleep(0.05)
        self._clients_scope.cancel()
        self.cluster.note("clients stopped")

    def add_watcher(self, node_id: int) -> None:
        w = RawWatcher(self.cluster, node_id)
        self.watchers[node_id] = w
        self._nursery.start_soon(w.run)

    def drop_watcher(self, node_id: int) -> None:
        """A node that leaves the cluster for good: its watch stops and is not checked."""
        w = self.watchers.pop(node_id, None)
        if w is not None:
            w.stop()

    def pin_reader(self, addresses: list[str], name: str) -> None:
        """Before `running`: one more client on only these addresses (reads and writes)."""
        self.extra_clients.append((addresses, name))

    def now(self) -> float:
        return time.monotonic()

    @staticmethod
    def op_cas(cid: int, key: str, value: bytes, expect: int, call: float, ret: float | None = None,
               ch: Any = None) -> Op:
        """A recorded upsert with `match_seq=expect` (`ch` its Change, None: unknown)."""
        if ret is None:
            return Op.cas(cid, key, value, expect, call)
        return Op.cas(cid, key, value, expect, call, ret, (sv(ch.prev), sv(ch.result)))

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def _client(self, cid: int, addresses: list[str] | None) -> None:
        rng = random.Random(self.seed * 1000 + cid)
        self._active_clients += 1
        try:
            n = 0
            while not self.stop.is_set():
                addrs = list(addresses) if addresses is not None else self.cluster.client_addresses()
                if addresses is None:
                    rng.shuffle(addrs)
                try:
                    async with MetaClient.connect(addrs, timeout=OP_TIMEOUT) as c:
                        while not self.stop.is_set():
                            n += 1
                            await self._one_op(c, cid, n, rng)
                            if self.pause:
                                await trio.sleep(rng.uniform(0, self.pause))
                except MetaError as e:
                    self.errors[f"connect: {type(e).__name__}"] = self.errors.get(f"connect: {type(e).__name__}", 0) + 1
                    with trio.move_on_after(0.2):
                        await self.stop.wait()
        finally:
            self._active_clients -= 1

    def _expect(self, key: str, rng: random.Random) -> int:
        seen = self.seen.get(key)
        if not seen or rng.random() < 0.15:
            return 0
        return seen[-1] if rng.random() < 0.7 else rng.choice(seen[-5:])

    def _saw(self, key: str, v: Any) -> None:
        if v is not None:
            lst = self.seen.setdefault(key, [])
            if not lst or lst[-1] != v.seq:
                lst.append(v.seq)
                del lst[:-20]

    async def _one_op(self, c: MetaClient, cid: int, n: int, rng: random.Random) -> None:
        kind = rng.choices(("get", "put", "cas", "delete", "txn", "unique"), (4, 3, 2, 1, 1, 1))[0]
        key = rng.choice(self.keys)
        value = f"c{cid}-{n}".encode()
        call = self.now()
        h = self.history
        try:
            if kind == "get":
                out = await c.get(key)
                h.append(Op.get(cid, key, call, self.now(), sv(out)))
                self._saw(key, out)
            elif kind == "put":
                ch = await c.upsert(key, value)
                h.append(Op.put(cid, key, value, call, self.now(), (sv(ch.prev), sv(ch.result))))
                self._saw(key, ch.result)
            elif kind == "cas":
                expect = self._expect(key, rng)
                ch = await c.upsert(key, value, match_seq=expect)
                h.append(Op.cas(cid, key, value, expect, call, self.now(), (sv(ch.prev), sv(ch.result))))
                self._saw(key, ch.result)
            elif kind == "delete":
                ch = await c.delete(key)
                h.append(Op.delete(cid, key, call, self.now(), (sv(ch.prev), sv(ch.result))))
            elif kind == "txn":
                other = rng.choice([k for k in self.keys if k != key])
                expect = self._expect(key, rng)
                v2 = value + b"/2"
                r = await c.txn(
                    conditions=[{"key": key, "target": "seq", "op": "==", "operand": expect}],
                    if_then=[{"put": {"key": key, "value": value}}, {"put": {"key": other, "value": v2}}],
                    else_then=[{"get": {"key": key}}],
                )
                ret = self.now()
                if r.success:
                    a, b = r.responses[0]["put"], r.responses[1]["put"]
                    h.append(Op.cas(cid, key, value, expect, call, ret, (sv(a["prev"]), sv(a["result"]))))
                    h.append(Op.put(cid, other, v2, call, ret, (sv(b["prev"]), sv(b["result"]))))
                    self._saw(key, a["result"])
                else:
                    got = sv(r.responses[0]["get"]["value"])
                    h.append(Op.cas(cid, key, value, expect, call, ret, (got, got)))
            else:
                ukey = f"u/{cid}/{n}"
                ch = await c.upsert(ukey, value)
                h.append(Op.put(cid, ukey, value, call, self.now(), (sv(ch.prev), sv(ch.result))))
                assert ch.result is not None
                self.acked_unique[ukey] = (ch.result.seq, ch.result.data)
            self._count(kind)
        except MetaError as e:
            self.errors[f"{kind}: {type(e).__name__}"] = self.errors.get(f"{kind}: {type(e).__name__}", 0) + 1
            if kind == "put":
                h.append(Op.put(cid, key, value, call))
            elif kind == "cas":
                h.append(Op.cas(cid, key, value, expect, call))
            elif kind == "delete":
                h.append(Op.delete(cid, key, call))
            elif kind == "txn":
                h.append(Op.cas(cid, key, value, expect, call))
                h.append(Op.put(cid, other, value + b"/2", call))
            elif kind == "unique":
                h.append(Op.put(cid, f"u/{cid}/{n}", value, call))
            await trio.sleep(0.02)

    async def _sampler(self) -> None:
        c = self.cluster
        while True:
            before = dict(c.incarnation)
            sts = await c.statuses(c.live())
            t = self.now()
            for i, st in sts.items():
                if st is None or c.incarnation[i] != before.get(i):
                    continue  # restarted during the request: which process answered?
                leader = st.get("leader")
                self.samples.append(Sample(
                    t, i, c.incarnation[i], st["current_term"], st["is_leader"], st["last_seq"],
                    (st.get("last_applied") or {}).get("index", 0), leader["name"] if leader else None,
                ))
            await trio.sleep(0.2)

    # ------------------------------------------------------------------ the fault cycle
    async def healed_now(self, among: Iterable[int] | None = None) -> float:
        """The fault ended: record it and probe until a write is acknowledged (through
        any live node of `among`), at most 5 election timeouts + 5 s."""
        healed = self.now()
        self.healed.append(healed)
        self.cluster.note("fault healed")
        budget = self.writes_after_heal_budget
        got: list[float] = []
        ids = list(among) if among is not None else self.cluster.live()

        async def probe(node_id: int) -> None:
            # Never cancelled (a connect cancelled at the wrong moment leaks its socket):
            # each probe ends by itself once any probe succeeded or the budget is spent.
            addr = self.cluster.specs[node_id].client_address
            k = 0
            end = healed + budget + 5
            while not got and self.now() < end:
                try:
                    async with MetaClient.connect([addr], timeout=max(0.5, budget)) as cl:
                        while not got and self.now() < end:
                            k += 1
                            try:
                                await cl.upsert(f"~probe/{node_id}", f"{k}".encode())
                                got.append(self.now())
                                done.set()
                                return
                            except MetaError:
                                await trio.sleep(0.05)
                except MetaError:
                    await trio.sleep(0.05)

        done = trio.Event()
        for i in ids:
            if i not in self.cluster.paused:
                self._nursery.start_soon(probe, i)
        with trio.move_on_after(budget + 5):
            await done.wait()
        self.recoveries.append((healed, (got[0] - healed) if got else None))
        self.cluster.note(f"write acknowledged {got[0] - healed:.2f} s after healing" if got else "no write after healing")
        return healed

    # ------------------------------------------------------------------ checks
    async def finish(self, *, live: Iterable[int] | None = None, converge_from: float | None = None) -> dict:
        """Inside `running`, after `stop_clients`: convergence, final reads, sentinel, then every check.
        Returns the report (also written to history/report files); raises AssertionError
        listing every failed check."""
        c = self.cluster
        live = sorted(live if live is not None else c.live())
        failures: list[str] = []
        report: dict[str, Any] = {"seed": self.seed, "counts": self.counts, "errors": self.errors}
        since = converge_from if converge_from is not None else (self.healed[-1] if self.healed else self.now())
        if not self.stop.is_set():
            await self.stop_clients()
        # 1. Convergence of the live replicas.
        conv = await self._converge(live, since)
        report["convergence"] = conv
        if not conv["ok"]:
            failures.append(f"the live replicas did not converge within {CONVERGE_S:g} s of healing: {conv}")
        # 2. Final linearizable reads of every key (they join the history).
        try:
            await self._final_reads(live)
        except MetaError as e:
            failures.append(f"the final linearizable reads failed: {e}")
        # 3. Write-once keys on every live replica.
        lost = await self._lost_writes(live)
        report["acked write-once keys"] = len(self.acked_unique)
        if lost:
            failures.append(f"acknowledged writes lost: {lost}")
        # 4. Watchers: sentinel, then every stream.
        wrep = await self._check_watchers(live)
        report["watch"] = wrep
        failures.extend(wrep.pop("failures"))
        # 5. Linearizability.
        lin = self._check_history()
        report["linearizability"] = lin
        if not lin["ok"]:
            failures.append(f"history: {lin['explanation']}")
        # 6. Monotonic seq/applied per node incarnation, terms, one leader per term.
        mono = self._check_samples()
        report["samples"] = mono.pop("summary")
        failures.extend(mono["failures"])
        # 7. Writes accepted again within 5 election timeouts of every healing.
        report["recoveries (healed at, write acknowledged after s)"] = [
            (round(h - self.t0, 2), None if r is None else round(r, 2)) for h, r in self.recoveries
        ]
        for h, r in self.recoveries:
            if r is None or r > self.writes_after_heal_budget:
                failures.append(
                    f"no write acknowledged within {self.writes_after_heal_budget:g} s (5 election timeouts) of"
                    f" healing at {h - self.t0:.2f} s: {r if r is None else round(r, 2)}"
                )
        if c.net.errors:
            failures.append(f"the raft proxies failed (a bug of the test tool): {c.net.errors[:3]}")
        # 8. No node died on its own.
        died = {i: c.procs[i].returncode for i in c.ids()  # type: ignore[union-attr]
                if c.procs.get(i) is not None and not c.running(i) and i not in self.expected_exits}
        if died:
            failures.append(f"nodes exited on their own (exit codes): {died}")
        report["failures"] = failures
        self.save(report)
        c.save_timeline()
        if failures:
            raise AssertionError(
                "robustness checks failed:\n- " + "\n- ".join(f[:4000] for f in failures)
                + f"\nreport: {json.dumps(report, default=str)[:3000]}"
            )
        return report

    async def _converge(self, live: list[int], since: float) -> dict:
        c = self.cluster
        deadline = since + CONVERGE_S
        last: dict[int, Any] = {}
        while True:
            sts = await c.statuses(live)
            last = {i: (st["last_applied"]["index"], st.get("state_digest")) if st else None for i, st in sts.items()}
            vals = set(last.values())
            if None not in vals and len(vals) == 1:
                return {"ok": True, "after_s": round(self.now() - since, 2), "applied": next(iter(vals))[0]}
            if self.now() > deadline:
                return {"ok": False, "last": last}
            await trio.sleep(0.1)

    async def _final_reads(self, live: list[int]) -> None:
        addrs = self.cluster.client_addresses(live)
        try:
            async with MetaClient.connect(addrs, timeout=10) as cl:
                for key in self.keys:
                    call = self.now()
                    v = await cl.get(key)
                    self.history.append(Op.get(999, key, call, self.now(), sv(v)))
        except MetaError as e:
            self.errors[f"final reads: {e}"] = 1
            raise

    async def _lost_writes(self, live: list[int]) -> dict[int, list[str]]:
        lost: dict[int, list[str]] = {}
        for i in live:
            async with MetaClient.connect([self.cluster.specs[i].client_address], timeout=10) as cl:
                items = {k: (v.seq, v.data) for k, v in await cl.list("u/", consistency="local")}
            missing = [k for k, v in self.acked_unique.items() if items.get(k) != v]
            if missing:
                lost[i] = missing[:10] + ([f"... {len(missing)} in all"] if len(missing) > 10 else [])
        return lost

    async def _check_watchers(self, live: list[int]) -> dict:
        failures: list[str] = []
        watchers = {i: w for i, w in self.watchers.items() if i in live}
        token = f"end-{time.monotonic_ns()}".encode()
        async with MetaClient.connect(self.cluster.client_addresses(live), timeout=10) as cl:
            await cl.upsert(SENTINEL, token)
        with trio.move_on_after(30):
            while any(w.seen_sentinel != token for w in watchers.values()):
                await trio.sleep(0.05)
        rep: dict[str, Any] = {}
        by_rev: dict[int, tuple[int, tuple]] = {}
        for i, w in sorted(watchers.items()):
            rep[str(i)] = {"events": len(w.events), "last_rev": w.last_rev, "connections": w.connections,
                           "reflushes": w.reflushes, "notes": w.notes[-5:]}
            if w.seen_sentinel != token:
                failures.append(f"the watcher on node {i} never saw the final write (last revision {w.last_rev};"
                                f" notes {w.notes[-3:]})")
            failures.extend(w.violations[:10])
            for rev, ev in w.events.items():
                other = by_rev.get(rev)
                if other is None:
                    by_rev[rev] = (i, ev)
                elif other[1] != ev:
                    failures.append(f"revision {rev}: node {other[0]} saw {other[1]!r:.200}, node {i} saw {ev!r:.200}")
            async with MetaClient.connect([self.cluster.specs[i].client_address], timeout=10) as cl:
                items = {k: (v.seq, v.data) for k, v in await cl.list("", consistency="local")}
            items = {k: v for k, v in items.items() if WATCH_KEY <= k < WATCH_END}
            if w.seen_sentinel == token and items != w.state:
                diff = sorted(set(items.items()) ^ set(w.state.items()))[:5]
                failures.append(f"node {i}: the watch's replayed state differs from the node's (first: {diff!r:.500})")
        rep["failures"] = failures
        return rep

    def _check_history(self) -> dict:
        started = time.monotonic()
        unknown = sum(1 for op in self.history if op.ret is None)
        try:
            result = check(self.history)
        except CheckerGaveUp as e:
            return {"ok": False, "explanation": f"the checker gave up: {e}", "ops": len(self.history), "unknown": unknown}
        return {"ok": result.ok, "explanation": result.explanation, "ops": len(self.history), "unknown": unknown,
                "states": result.states, "seconds": round(time.monotonic() - started, 2)}

    def _check_samples(self) -> dict:
        failures: list[str] = []
        last: dict[tuple[int, int], Sample] = {}
        term_of: dict[int, Sample] = {}
        leaders: dict[int, set[int]] = {}
        for s in self.samples:
            k = (s.node, s.incarnation)
            p = last.get(k)
            if p is not None:
                if s.last_seq < p.last_seq:
                    failures.append(f"node {s.node}: last_seq went from {p.last_seq} to {s.last_seq}"
                                    f" at {s.t - self.t0:.2f} s")
                if s.applied < p.applied:
                    failures.append(f"node {s.node}: last_applied went from {p.applied} to {s.applied}"
                                    f" at {s.t - self.t0:.2f} s")
            last[k] = s
            q = term_of.get(s.node)
            if q is not None and s.term < q.term and s.node not in self.wiped:
                failures.append(f"node {s.node}: term went from {q.term} to {s.term} at {s.t - self.t0:.2f} s")
            term_of[s.node] = s
            if s.is_leader:
                leaders.setdefault(s.term, set()).add(s.node)
        for term, ids in leaders.items():
            if len(ids) > 1:
                failures.append(f"term {term} had two leaders: {sorted(ids)}")
        return {"failures": failures[:20], "summary": {
            "samples": len(self.samples), "terms": sorted(leaders), "leaders": {t: sorted(v) for t, v in leaders.items()},
        }}

    # ------------------------------------------------------------------ artifacts
    def save(self, report: dict) -> None:
        root = self.cluster.root
        with open(root / "history.jsonl", "w") as f:
            for op in self.history:
                f.write(json.dumps({
                    "client": op.client, "key": op.key, "kind": op.kind, "arg": _j(op.arg), "call": op.call - self.t0,
                    "ret": None if op.ret is None else op.ret - self.t0, "out": _j(op.out),
                }) + "\n")
        with open(root / "samples.jsonl", "w") as f:
            for s in self.samples:
                f.write(json.dumps(attrs.asdict(s) | {"t": round(s.t - self.t0, 3)}) + "\n")
        with open(root / "watch.jsonl", "w") as f:
            for i, w in self.watchers.items():
                for rev in sorted(w.events):
                    f.write(json.dumps({"node": i, "rev": rev, "event": _j(w.events[rev])}) + "\n")
        (root / "report.json").write_text(json.dumps(report, indent=1, default=str))


def _j(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode(errors="replace")
    if isinstance(x, (tuple, list)):
        return [_j(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return None
    return x


def history_path(root: Path) -> Path:
    return root / "history.jsonl"


__all__ = ["CLIENTS", "KEYS", "OP_TIMEOUT", "RawWatcher", "Workload"]
