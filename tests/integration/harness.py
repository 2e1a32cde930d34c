"""Real `metanode` processes on 127.0.0.1 for integration tests.

Every process a test starts is stopped by the test (`Cluster.stop_all` in a
fixture's teardown): SIGTERM, then SIGKILL after a bound. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tests.net import free_port

START_TIMEOUT = 20.0


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `pred` (an external process's state: nothing to wait on) until truthy."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError) as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc})")


class Proc:
    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.cwd = cwd
        self.extra_env = env or {}  # added to the environment (NOTIFY_SOCKET, ...)
        self.log_path = cwd / f"{name}.out"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("METASRV_CONFIG_FILE", None)
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.extra_env)
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "metanode", *self.args],
                cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout: float = 20) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Admin:
    """A tiny client of one node's admin API."""

    def __init__(self, address: str, ca: str | None = None) -> None:
        # ca: the admin API is on TLS; verify it against this CA file
        self.base = f"{'https' if ca else 'http'}://{address}"
        self.verify: Any = ssl.create_default_context(cafile=ca) if ca else True

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base + path, timeout=5, verify=self.verify, **kw)

    def nodes(self) -> list[dict]:
        r = self.get("/v1/cluster/nodes")
        r.raise_for_status()
        return r.json()

    def node_names(self) -> list[str]:
        return [n["name"] for n in self.nodes()]

    def status(self) -> dict:
        r = self.get("/v1/cluster/status")
        r.raise_for_status()
        return r.json()

    def healthy(self) -> bool:
        return self.get("/v1/health").status_code == 200


def voter_ids(status: dict) -> list[int]:
    """The voter ids of a `/v1/cluster/status` document (voters are node records whose
    `name` is the id, as databend's scripts read them)."""
    return [int(v["name"]) for v in status["voters"]]


def run_cli(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("METASRV_CONFIG_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "metanode", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def write_config(path: Path, node_id: int, raft_port: int, admin_port: int, grpc_port: int, *,
                 single: bool = False, join: list[str] | None = None, extra: str = "", raft_extra: str = "",
                 heartbeat_ms: int = 100) -> Path:
    lines = [
        f'log_dir = "logs{node_id}"',
        f'admin_api_address = "127.0.0.1:{admin_port}"',
        f'grpc_api_address = "127.0.0.1:{grpc_port}"',
        extra,
        "[raft_config]",
        f"id = {node_id}",
        f'raft_dir = "data{node_id}"',
        f"raft_api_port = {raft_port}",
        'raft_listen_host = "127.0.0.1"',
        'raft_advertise_host = "127.0.0.1"',
        f"heartbeat_interval = {heartbeat_ms}",
        raft_extra,
    ]
    if single:
        lines.append("single = true")
    if join:
        lines.append("join = " + json.dumps(join))
    path.write_text("\n".join(lines) + "\n")
    return path


class LocalCluster:
    """Nodes on free loopback ports, each with its own config file in `root`."""

    def __init__(self, root: Path, heartbeat_ms: int = 100) -> None:
        self.root = root
        self.heartbeat_ms = heartbeat_ms
        self.procs: dict[int, Proc] = {}
        self.ports: dict[int, tuple[int, int, int]] = {}
        self.admin_ca: str | None = None  # set when the admin APIs are on TLS: their CA file

    def raft_address(self, node_id: int) -> str:
        return f"127.0.0.1:{self.ports[node_id][0]}"

    def admin(self, node_id: int) -> Admin:
        return Admin(f"127.0.0.1:{self.ports[node_id][1]}", self.admin_ca)

    def add(self, node_id: int, *, single: bool = False, join: list[int] | None = None, extra: str = "",
            raft_extra: str = "") -> Proc:
        if node_id not in self.ports:
            self.ports[node_id] = (free_port(), free_port(), free_port())
        raft, admin, grpc = self.ports[node_id]
        cfg = write_config(
            self.root / f"node{node_id}.toml", node_id, raft, admin, grpc, single=single,
            join=[self.raft_address(j) for j in join or []], extra=extra, raft_extra=raft_extra,
            heartbeat_ms=self.heartbeat_ms,
        )
        proc = Proc(f"node{node_id}", ["-c", str(cfg)], self.root)
        self.procs[node_id] = proc
        return proc.start()

    def restart(self, node_id: int) -> Proc:
        return self.procs[node_id].start()

    def wait_healthy(self, node_id: int, timeout: float = START_TIMEOUT) -> None:
        proc = self.procs[node_id]

        def ok() -> bool:
            if not proc.running:
                raise AssertionError(f"node {node_id} exited {proc.popen.returncode}:\n{proc.output()[-3000:]}")  # type: ignore[union-attr]
            return self.admin(node_id).healthy()

        wait_until(ok, timeout, f"node {node_id} to serve its admin API")

    def leader(self, among: list[int] | None = None) -> int | None:
        for i in among or list(self.procs):
            if self.procs[i].running:
                try:
                    st = self.admin(i).status()
                except (httpx.HTTPError, ValueError):
                    continue
                if st["is_leader"]:
                    return i
        return None

    def start(self, count: int) -> None:
        """Node 1 initializes the cluster, nodes 2..count join it; returns once node 1
        lists every member."""
        self.add(1, single=True)
        self.wait_healthy(1)
        wait_until(lambda: self.admin(1).node_names() == ["1"], START_TIMEOUT, "node 1 to publish itself")
        for i in range(2, count + 1):
            self.add(i, join=[1])
            self.wait_healthy(i)
        names = [str(i) for i in range(1, count + 1)]
        wait_until(lambda: self.admin(1).node_names() == names, 30, f"{count} members")

    def client_addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.ports[i][2]}" for i in sorted(self.ports)]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()
