"""Real `metanode` processes for the robustness suite, driven from one trio test.

Each node listens on 127.0.0.1 and advertises its raft port on `ADV_HOST`
(127.0.0.2), where a `RaftProxy` forwards to it: every raft byte between nodes goes
through the proxies, so any directed link can be cut, slowed or made lossy
(`Cluster.net`). In multi-host mode (`NetnsHosts`) each node runs in its own network
namespace with its own address instead, and a link taken down is the partition.

Processes are stopped by PID only (SIGCONT, SIGTERM, then SIGKILL after a bound) in the
fixture's teardown; every wait here is bounded by a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

import metanode
from tests.net import free_port
from tests.robustness.proxy import Network, RaftProxy

_METANODE_ROOT = str(Path(metanode.__file__).resolve().parent.parent)
ADV_HOST = "127.0.0.2"
HEARTBEAT_MS = 200
ROUNDS = max(1, int(os.environ.get("ROBUSTNESS_ROUNDS", "1") or "1"))
START_TIMEOUT = 40.0


def election_timeout_s(heartbeat_ms: int) -> float:
    """The longest election timeout of a node (random in [2x, 3x) heartbeats)."""
    return 3 * heartbeat_ms / 1000


@attrs.define
class NodeSpec:
    id: int
    host: str  # where the node binds its three ports
    adv_host: str  # the raft host it advertises (the proxy's, or its own in netns mode)
    raft_port: int
    admin_port: int
    grpc_port: int
    raft_dir: Path
    netns: str | None = None
    env: dict[str, str] = attrs.Factory(dict)
    raft_extra: dict[str, Any] = attrs.Factory(dict)

    @property
    def raft_address(self) -> str:
        return f"{self.adv_host}:{self.raft_port}"

    @property
    def direct_raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def admin_address(self) -> str:
        return f"{self.host}:{self.admin_port}"

    @property
    def client_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class Cluster:
    """The nodes of one test, their proxies and a timeline of what the test did."""

    def __init__(self, root: Path, nursery: trio.Nursery, *, heartbeat_ms: int = HEARTBEAT_MS,
                 raft_extra: dict[str, Any] | None = None, proxied: bool = True,
                 top_extra: dict[str, Any] | None = None) -> None:
        self.root = root
        self.nursery = nursery
        self.heartbeat_ms = heartbeat_ms
        self.raft_extra = dict(raft_extra or {})
        self.top_extra = dict(top_extra or {})  # top-level keys of every node's config
        self.proxied = proxied
        self.net = Network(seed=int(time.time()))
        self.specs: dict[int, NodeSpec] = {}
        self.procs: dict[int, subprocess.Popen[bytes] | None] = {}
        self.incarnation: dict[int, int] = {}
        self.paused: set[int] = set()
        self.timeline: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.http = httpx.AsyncClient(timeout=2.0)
        self.mounts: list[Path] = []
        self.extra_procs: list[subprocess.Popen[bytes]] = []
        self.host_for: Callable[[int], tuple[str, str, str | None]] | None = None  # netns mode

    # ------------------------------------------------------------------ bookkeeping
    def note(self, text: str) -> None:
        t = round(time.monotonic() - self.t0, 3)
        self.timeline.append((t, text))
        print(f"[{t:8.3f}] {text}", flush=True)

    @property
    def election_timeout(self) -> float:
        return election_timeout_s(self.heartbeat_ms)

    def ids(self) -> list[int]:
        return sorted(self.specs)

    def running(self, node_id: int) -> bool:
        p = self.procs.get(node_id)
        return p is not None and p.poll() is None

    def live(self) -> list[int]:
        return [i for i in self.ids() if self.running(i)]

    def client_addresses(self, ids: Iterable[int] | None = None) -> list[str]:
        return [self.specs[i].client_address for i in (ids if ids is not None else self.ids())]

    def raft_address(self, node_id: int) -> str:
        return self.specs[node_id].raft_address

    def log_file(self, node_id: int) -> Path:
        return self.root / f"logs{node_id}" / f"metanode-{node_id}.log"

    def out_file(self, node_id: int) -> Path:
        return self.root / f"node{node_id}.out"

    def output(self, node_id: int) -> str:
        p = self.out_file(node_id)
        return p.read_text(errors="replace") if p.exists() else ""

    # ------------------------------------------------------------------ nodes
    async def add_node(self, node_id: int, *, env: dict[str, str] | None = None,
                       raft_dir: Path | None = None, raft_extra: dict[str, Any] | None = None) -> NodeSpec:
        """Allocate the node's ports (and start its proxy); `start` runs it."""
        if self.host_for is not None:
            host, adv, netns = self.host_for(node_id)
            raft_port, admin_port, grpc_port = 28004, 28002, 9191
        else:
            host, adv, netns = "127.0.0.1", ADV_HOST if self.proxied else "127.0.0.1", None
            raft_port, admin_port, grpc_port = free_port(), free_port(), free_port()
        spec = NodeSpec(
            node_id, host, adv, raft_port, admin_port, grpc_port,
            raft_dir or self.root / f"data{node_id}", netns, dict(env or {}),
            {**self.raft_extra, **(raft_extra or {})},
        )
        self.specs[node_id] = spec
        self.procs.setdefault(node_id, None)
        self.incarnation.setdefault(node_id, 0)
        if self.proxied and self.host_for is None:
            proxy = RaftProxy(self.net, node_id, (ADV_HOST, raft_port), ("127.0.0.1", raft_port))
            await self.nursery.start(proxy.serve)
        return spec

    def write_config(self, node_id: int, *, single: bool = False, join: Iterable[int] = (),
                     join_addresses: Iterable[str] = (), spec: NodeSpec | None = None, name: str | None = None) -> Path:
        spec = spec or self.specs[node_id]
        joins = [self.raft_address(j) for j in join] + list(join_addresses)
        raft = {
            "id": node_id,
            "raft_dir": str(spec.raft_dir),
            "raft_api_port": spec.raft_port,
            "raft_listen_host": spec.host,
            "raft_advertise_host": spec.adv_host,
            "heartbeat_interval": self.heartbeat_ms,
            **spec.raft_extra,
        }
        if single:
            raft["single"] = True
        if joins:
            raft["join"] = joins
        lines = [
            f'log_dir = "{self.root / f"logs{name or node_id}"}"',
            f'admin_api_address = "{spec.admin_address}"',
            f'grpc_api_address = "{spec.client_address}"',
            *(f"{k} = {json.dumps(v)}" for k, v in self.top_extra.items()),
            "[raft_config]",
            *(f"{k} = {json.dumps(v)}" for k, v in raft.items()),
        ]
        path = self.root / f"{name or f'node{node_id}'}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, node_id: int, *, single: bool = False, join: Iterable[int] = (),
              join_addresses: Iterable[str] = ()) -> None:
        assert not self.running(node_id), f"node {node_id} runs already"
        spec = self.specs[node_id]
        cfg = self.write_config(node_id, single=single, join=join, join_addresses=join_addresses)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k in ("METASRV_CONFIG_FILE", "NOTIFY_SOCKET", "METANODE_TEST_CLOCK_OFFSET_MS", "PYTHONTRACEMALLOC"):
            env.pop(k, None)
        env.update(spec.env)
        # The nodes run the metanode this test imported (a checkout, a worktree, the CI's venv).
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_METANODE_ROOT, env.get("PYTHONPATH")) if x)
        argv = [sys.executable, "-m", "metanode", "-c", str(cfg)]
        if spec.netns is not None:
            argv = ["ip", "netns", "exec", spec.netns, *argv]
        self.incarnation[node_id] += 1
        with open(self.out_file(node_id), "ab") as out:
            out.write(f"\n===== incarnation {self.incarnation[node_id]} {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.procs[node_id] = subprocess.Popen(argv, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.paused.discard(node_id)
        self.note(f"start node {node_id} (pid {self.procs[node_id].pid}, incarnation {self.incarnation[node_id]})")  # type: ignore[union-attr]

    def start_extra(self, name: str, node_id: int, *, join: Iterable[int] = (),
                    raft_extra: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
        """A one-off process outside the cluster's bookkeeping (an impostor under a
        member's id, a node of another cluster name...) on ports of its own; stopped
        by `stop_all` if still running."""
        spec = NodeSpec(node_id, "127.0.0.1", "127.0.0.1", free_port(), free_port(), free_port(),
                        self.root / f"data-{name}", None, {}, {**self.raft_extra, **(raft_extra or {})})
        cfg = self.write_config(node_id, join=join, spec=spec, name=name)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_METANODE_ROOT, env.get("PYTHONPATH")) if x)
        with open(self.root / f"{name}.out", "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "metanode", "-c", str(cfg)], cwd=self.root,
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
        self.extra_procs.append(p)
        self.note(f"start {name} as node {node_id} (pid {p.pid})")
        return p

    def signal(self, node_id: int, sig: int) -> None:
        p = self.procs.get(node_id)
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def kill(self, *ids: int) -> None:
        """SIGKILL (power loss): all given nodes at once."""
        for i in ids:
            self.signal(i, signal.SIGKILL)
        for i in ids:
            p = self.procs.get(i)
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            self.paused.discard(i)
        self.note(f"SIGKILL {list(ids)}")

    def pause(self, node_id: int) -> None:
        self.signal(node_id, signal.SIGSTOP)
        self.paused.add(node_id)
        self.note(f"SIGSTOP {node_id}")

    def resume(self, node_id: int) -> None:
        self.signal(node_id, signal.SIGCONT)
        self.paused.discard(node_id)
        self.note(f"SIGCONT {node_id}")

    async def wait_exit(self, node_id: int, timeout: float) -> int | None:
        p = self.procs.get(node_id)
        if p is None:
            return None
        with trio.move_on_after(timeout):
            while p.poll() is None:
                await trio.sleep(0.05)
        return p.poll()

    async def terminate(self, node_id: int, timeout: float = 15) -> int | None:
        p = self.procs.get(node_id)
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode
        p.send_signal(signal.SIGCONT)
        p.send_signal(signal.SIGTERM)
        rc = await self.wait_exit(node_id, timeout)
        if rc is None:
            p.kill()
            rc = await self.wait_exit(node_id, 10)
        self.note(f"SIGTERM {node_id}: exit {rc}")
        return rc

    async def stop_all(self) -> None:
        for i in list(self.procs):
            self.signal(i, signal.SIGCONT)
        for i in list(self.procs):
            p = self.procs[i]
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for i in list(self.procs):
            p = self.procs[i]
            if p is None:
                continue
            while p.poll() is None and time.monotonic() < deadline:
                await trio.sleep(0.05)
            _kill(p)
        for p in self.extra_procs:
            _kill(p)
        await self.http.aclose()
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)
        self.mounts.clear()

    # ------------------------------------------------------------------ admin API
    async def get(self, node_id: int, path: str, timeout: float = 2.0) -> httpx.Response | None:
        if not self.running(node_id) or node_id in self.paused:
            return None
        try:
            return await self.http.get(f"http://{self.specs[node_id].admin_address}{path}", timeout=timeout)
        except httpx.HTTPError:
            return None

    async def status(self, node_id: int, timeout: float = 2.0) -> dict | None:
        r = await self.get(node_id, "/v1/cluster/status", timeout)
        if r is None or r.status_code != 200:
            return None
        try:
            return r.json()  # type: ignore[no-any-return]
        except ValueError:
            return None

    async def statuses(self, ids: Iterable[int] | None = None) -> dict[int, dict | None]:
        ids = list(ids if ids is not None else self.ids())
        out: dict[int, dict | None] = {}

        async def one(i: int) -> None:
            out[i] = await self.status(i)

        async with trio.open_nursery() as n:
            for i in ids:
                n.start_soon(one, i)
        return out

    async def healthy(self, node_id: int) -> bool:
        r = await self.get(node_id, "/v1/health")
        return r is not None and r.status_code == 200

    async def leader(self, among: Iterable[int] | None = None) -> int | None:
        """The leader of the highest term among the nodes that answer."""
        sts = await self.statuses(among)
        leaders = [(st["current_term"], i) for i, st in sts.items() if st and st["is_leader"]]
        return max(leaders)[1] if leaders else None

    async def wait_for(self, pred: Callable[[], Awaitable[Any]], timeout: float, what: str,
                       interval: float = 0.05) -> Any:
        deadline = trio.current_time() + timeout
        while True:
            value = await pred()
            if value:
                return value
            if trio.current_time() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            await trio.sleep(interval)

    async def wait_leader(self, among: Iterable[int] | None = None, timeout: float = 20) -> int:
        among = list(among) if among is not None else None
        return await self.wait_for(lambda: self.leader(among), timeout, f"a leader among {among or 'all'}")  # type: ignore[no-any-return]

    async def wait_healthy(self, node_id: int, timeout: float = START_TIMEOUT) -> None:
        async def ok() -> bool:
            if not self.running(node_id):
                p = self.procs.get(node_id)
                raise AssertionError(
                    f"node {node_id} exited {p.returncode if p else None}:\n{self.output(node_id)[-3000:]}"
                )
            return await self.healthy(node_id)

        await self.wait_for(ok, timeout, f"node {node_id} to be healthy", interval=0.1)

    async def voters(self, node_id: int) -> list[int]:
        st = await self.status(node_id)
        return sorted(int(v["name"]) for v in st["voters"]) if st else []

    # ------------------------------------------------------------------ scenarios' helpers
    async def start_cluster(self, n: int = 3, *, concurrent_joins: bool = True) -> None:
        """Node 1 initializes the cluster, the others join it (all at once, by default)."""
        for i in range(1, n + 1):
            if i not in self.specs:
                await self.add_node(i)
        self.start(1, single=True)
        await self.wait_healthy(1)
        others = list(range(2, n + 1))
        if concurrent_joins:
            for i in others:
                self.start(i, join=[1])
            for i in others:
                await self.wait_healthy(i)
        else:
            for i in others:
                self.start(i, join=[1])
                await self.wait_healthy(i)
        want = list(range(1, n + 1))

        async def all_voters() -> bool:
            return all([await self.voters(i) == want for i in want])

        await self.wait_for(all_voters, START_TIMEOUT, f"voters {want} on every node", interval=0.1)
        self.note(f"cluster of {n} up")

    async def run_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ)
        env.pop("METASRV_CONFIG_FILE", None)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_METANODE_ROOT, env.get("PYTHONPATH")) if x)
        with trio.fail_after(timeout):
            result = await trio.run_process(
                [sys.executable, "-m", "metanode", *args], capture_stdout=True, capture_stderr=True,
                check=False, cwd=self.root, env=env,
            )
        self.note(f"cli {' '.join(args)}: exit {result.returncode}")
        return result

    async def transfer_leader(self, to: int) -> bool:
        leader = await self.leader()
        if leader is None:
            return False
        r = await self.get(leader, f"/v1/ctrl/trigger_transfer_leader?to={to}", timeout=5)
        self.note(f"transfer leader {leader} -> {to}: {r.status_code if r else None}")
        return r is not None and r.status_code == 200

    async def trigger_snapshot(self, node_id: int) -> int | None:
        r = await self.get(node_id, "/v1/ctrl/trigger_snapshot", timeout=20)
        self.note(f"trigger snapshot on {node_id}: {r.status_code if r else None}")
        return r.status_code if r else None

    def rss_kib(self, node_id: int) -> int:
        """The node's resident set size (VmRSS of /proc/PID/status), KiB; 0 if gone."""
        p = self.procs.get(node_id)
        if p is None or p.poll() is not None:
            return 0
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return 0
        return 0

    def mount_tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
        self.mounts.append(path)
        self.note(f"tmpfs of {size} on {path}")
        return path

    # ------------------------------------------------------------------ artifacts
    def save_timeline(self) -> None:
        (self.root / "timeline.txt").write_text("".join(f"{t:9.3f} {s}\n" for t, s in self.timeline))


def copy_artifacts(src: Path, dest: Path, max_file: int = 8 << 20) -> None:
    """Logs, outputs, configs, history and reports of a failed test (no big data files)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        try:
            if path.stat().st_size > max_file:
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
        except OSError:
            continue


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL `p` (by its PID) if it still runs, and reap it."""
    if p.poll() is None:
        p.kill()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


__all__ = ["ADV_HOST", "Cluster", "HEARTBEAT_MS", "NodeSpec", "ROUNDS", "copy_artifacts", "election_timeout_s"]
