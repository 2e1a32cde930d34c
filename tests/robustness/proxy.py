"""A frame-aware TCP proxy in front of each node's raft port (trio, in the test process).

Every node listens on `127.0.0.1:P` and advertises `ADV:P` (another loopback address),
where one `RaftProxy` listens: peers, joiners and the CLI dial the advertised address,
so all raft traffic (PeerLink streams, calls, forwarded client requests, joins) passes
here. The proxy reads the dialer's hello (`[u32 big-endian length][msgpack map]`, the
first frame `{"t": "hello", ..., "from": id}`) to learn who dials, so each *directed*
link `src -> dst` can be ruled on its own:

- `blackhole`: every frame of that direction is dropped (the TCP connection stays up,
  as in a real partition; a connection dialed during it is not even opened upstream
  until the link passes again);
- `drop`: each frame is dropped with a probability;
- `delay`: each frame is held `delay` seconds (+ uniform jitter), order kept;
- `gap`: frames of a connection leave at least `gap` seconds apart (a thin pipe:
  a batch of messages sent at once arrives one by one).

Frames of a connection flow in two directions: the dialer's frames are link
`from -> owner`, the listener's answers (call results, error frames) `owner -> from`.
Hello frames are never dropped (they are held while the link is blackholed). Dialers
that are not nodes (`from` 0: the leave CLI) are never ruled. `cut(src, dst)` closes
the connections of a link (a peer restart, a middlebox reset).
"""

from __future__ import annotations

import logging
import math
import random
import struct
from collections.abc import Iterable
from typing import Any

import attrs
import msgpack
import trio

from metanode.wire import FrameDecoder

log = logging.getLogger("tests.robustness.proxy")

MAX_FRAME = 1 << 30  # the proxy passes what the node itself refuses


@attrs.define
class Rule:
    blackhole: bool = False
    drop: float = 0.0  # probability of dropping one frame
    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, uniform in [0, jitter)
    gap: float = 0.0  # seconds at least between two frames of a connection (pacing)

    @property
    def passes_all(self) -> bool:
        return not self.blackhole and self.drop == 0 and self.delay == 0 and self.jitter == 0 and self.gap == 0


@attrs.define
class LinkStats:
    forwarded: int = 0
    dropped: int = 0


class Network:
    """The rules of every directed link between node ids, shared by the proxies."""

    def __init__(self, seed: int = 0) -> None:
        self.rules: dict[tuple[int, int], Rule] = {}
        self.stats: dict[tuple[int, int], LinkStats] = {}
        self.rng = random.Random(seed)
        self.proxies: dict[int, RaftProxy] = {}
        self.errors: list[str] = []  # proxy bugs (the checks fail on any)
        self.changed = trio.Event()  # set (and replaced) when a rule changes

    def rule(self, src: int, dst: int) -> Rule:
        return self.rules.get((src, dst)) or Rule()

    def set(self, src: int, dst: int, rule: Rule) -> None:
        if rule.passes_all:
            self.rules.pop((src, dst), None)
        else:
            self.rules[(src, dst)] = rule
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # ----------------------------------------------------------- fault vocabulary
    def isolate_one_way(self, src: int, dsts: Iterable[int]) -> None:
        """Frames from `src` to each of `dsts` are lost; the other way works."""
        for d in dsts:
            if d != src:
                self.set(src, d, Rule(blackhole=True))

    def partition(self, *groups: Iterable[int]) -> None:
        """Nodes talk only inside their group (both directions blackholed between groups)."""
        sets = [set(g) for g in groups]
        for a in sets:
            for b in sets:
                if a is b:
                    continue
                for s in a:
                    for d in b:
                        self.set(s, d, Rule(blackhole=True))

    def cut_pair(self, a: int, b: int) -> None:
        """a and b cannot talk (both directions); others are untouched."""
        self.set(a, b, Rule(blackhole=True))
        self.set(b, a, Rule(blackhole=True))

    def degrade(self, ids: Iterable[int], *, drop: float = 0.0, delay: float = 0.0, jitter: float = 0.0) -> None:
        ids = list(ids)
        for s in ids:
            for d in ids:
                if s != d:
                    self.set(s, d, Rule(drop=drop, delay=delay, jitter=jitter))

    def heal(self) -> None:
        self.rules.clear()
        self._changed()

    def cut(self, src: int | None = None, dst: int | None = None) -> int:
        """Close the open connections of the links matching (None: any); how many."""
        n = 0
        for proxy in self.proxies.values():
            n += proxy.cut(src, dst)
        return n

    def totals(self) -> dict[str, int]:
        fwd = sum(s.forwarded for s in self.stats.values())
        drop = sum(s.dropped for s in self.stats.values())
        return {"forwarded": fwd, "dropped": drop}

    def count(self, src: int, dst: int, *, dropped: bool) -> None:
        st = self.stats.setdefault((src, dst), LinkStats())
        if dropped:
            st.dropped += 1
        else:
            st.forwarded += 1


def _hello_from(body: bytes) -> int | None:
    try:
        frame = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return None
    if isinstance(frame, dict) and frame.get("t") == "hello":
        src = frame.get("from")
        if isinstance(src, int) and not isinstance(src, bool):
            return src
    return None


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection whose socket is closed whenever the connect does not return it
    (`trio.open_tcp_stream` can leak a connected socket when cancelled at that moment,
    which `filterwarnings = error` turns into a failure)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class _ProxiedConn:
    """One accepted connection and, once a frame may pass, its upstream connection."""

    def __init__(self, proxy: RaftProxy, down: trio.SocketStream) -> None:
        self.proxy = proxy
        self.net = proxy.net
        self.down = down
        self.up: trio.SocketStream | None = None
        self.src: int | None = None  # the dialer's node id (0: not a node), from its hello
        self.hello: bytes | None = None
        self.scope = trio.CancelScope()

    @property
    def dst(self) -> int:
        return self.proxy.owner

    def _ruled(self, src: int, dst: int) -> Rule:
        if src == 0 or dst == 0:
            return Rule()
        return self.net.rule(src, dst)

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._forward, nursery)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.down)
                if self.up is not None:
                    await trio.aclose_forcefully(self.up)

    async def _ensure_up(self, nursery: trio.Nursery) -> bool:
        """Connect upstream and pass the hello on (only `_deliver` "up" calls it)."""
        if self.up is not None:
            return True
        try:
            self.up = await connect_tcp(*self.proxy.upstream)
        except OSError:
            self.scope.cancel()  # the node is down: the dialer sees the connection end
            return False
        assert self.hello is not None
        try:
            await self.up.send_all(_frame(self.hello))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.scope.cancel()
            return False
        nursery.start_soon(self._backward)
        return True

    async def _forward(self, nursery: trio.Nursery) -> None:
        """Dialer -> node. Queue items are (due, frame body), or (due, None): connect."""
        decoder = FrameDecoder(MAX_FRAME)
        send, recv = trio.open_memory_channel[tuple[float, bytes | None]](math.inf)
        nursery.start_soon(self._deliver, recv, "up", nursery)
        last_due = 0.0
        connect_asked = False
        while True:
            try:
                data = await self.down.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                break
            if not data:
                break
            try:
                bodies = decoder.feed(data)
            except Exception:
                break  # a frame the proxy will not buffer: the connection ends
            for body in bodies:
                if self.hello is None:
                    self.hello = body
                    src = _hello_from(body)
                    self.src = 0 if src is None else src
                    self.proxy.conns.add(self)
                    continue
                rule = self._ruled(self.src or 0, self.dst)
                if rule.blackhole or (rule.drop and self.net.rng.random() < rule.drop):
                    self.net.count(self.src or 0, self.dst, dropped=True)
                    continue
                self.net.count(self.src or 0, self.dst, dropped=False)
                due = trio.current_time() + rule.delay + (self.net.rng.random() * rule.jitter if rule.jitter else 0)
                last_due = max(last_due + rule.gap, due)
                try:
                    send.send_nowait((last_due, body))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the delivery ended (its side closed): so does this connection
                connect_asked = True
            if self.hello is not None and not connect_asked and not self._ruled(self.src or 0, self.dst).blackhole:
                last_due = max(last_due, trio.current_time())
                try:
                    send.send_nowait((last_due, None))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                connect_asked = True
        # The dialer closed its side: pass the end of stream on once the queue drained.
        send.close()

    async def _deliver(self, recv: trio.MemoryReceiveChannel[tuple[float, bytes | None]], to: str,
                       nursery: trio.Nursery) -> None:
        async with recv:
            async for due, body in recv:
                now = trio.current_time()
                if due > now:
                    await trio.sleep(due - now)
                if to == "up":
                    if self.up is None and not await self._ensure_up(nursery):
                        return
                    stream = self.up
                else:
                    stream = self.down
                if body is None:
                    continue
                assert stream is not None
                try:
                    await stream.send_all(_frame(body))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.scope.cancel()
                    return
        if to == "up" and self.up is not None:
            try:
                await self.up.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.scope.cancel()
        else:
            self.scope.cancel()

    async def _backward(self) -> None:
        """Node -> dialer (call results, error frames)."""
        assert self.up is not None
        decoder = FrameDecoder(MAX_FRAME)
        send, recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        last_due = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, recv, "down", nursery)
            while True:
                try:
                    data = await self.up.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
                if not data:
                    break
                try:
                    bodies = decoder.feed(data)
                except Exception:
                    break
                for body in bodies:
                    rule = self._ruled(self.dst, self.src or 0)
                    if rule.blackhole or (rule.drop and self.net.rng.random() < rule.drop):
                        self.net.count(self.dst, self.src or 0, dropped=True)
                        continue
                    self.net.count(self.dst, self.src or 0, dropped=False)
                    due = trio.current_time() + rule.delay + (self.net.rng.random() * rule.jitter if rule.jitter else 0)
                    last_due = max(last_due + rule.gap, due)
                    try:
                        send.send_nowait((last_due, body))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
            send.close()


class RaftProxy:
    """Listens on `listen` and forwards to `upstream`, ruled by `net` as node `owner`."""

    def __init__(self, net: Network, owner: int, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.net = net
        self.owner = owner
        self.listen = listen
        self.upstream = upstream
        self.conns: set[_ProxiedConn] = set()
        self.accepted = 0
        net.proxies[owner] = self

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn = _ProxiedConn(self, stream)
        try:
            await conn.run()
        except Exception as e:  # a bug of the proxy: kept for the checks, not fatal to the others
            self.net.errors.append(f"proxy of {self.owner}: {e!r}"[:500])
            log.exception("proxy of %d failed", self.owner)
        finally:
            self.conns.discard(conn)

    def cut(self, src: int | None, dst: int | None) -> int:
        n = 0
        for conn in list(self.conns):
            if (src is None or conn.src == src) and (dst is None or self.owner == dst):
                conn.scope.cancel()
                n += 1
        return n


__all__ = ["LinkStats", "Network", "RaftProxy", "Rule"]
