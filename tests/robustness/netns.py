"""Nodes on separate "hosts": one network namespace per node, each with its own address
on a bridge in the test's namespace (`ip netns`, a veth pair per node). Taking a
node's link down (`ip link set DEV down`, the bridge side of its veth) cuts it off from
every other node and from the test; up again heals. Everything created here is
deleted by `close` (the namespaces, which takes their veth ends, then the bridge).

Names carry the test process's pid (interface names are at most 15 characters), and
the /24 is picked among 10.213.0.0/16 by that pid, so parallel workers do not collide.
"""

from __future__ import annotations

import os
import subprocess


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class NetnsHosts:
    def __init__(self) -> None:
        pid = os.getpid()
        self.tag = f"{pid % 100000}"
        self.subnet = f"10.213.{pid % 250 + 1}"
        self.bridge = f"rbbr{self.tag}"
        self.namespaces: dict[int, str] = {}
        self.links: dict[int, str] = {}  # node id -> the bridge side of its veth
        self.created_bridge = False

    def setup_bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.created_bridge = True
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def address(self, node_id: int) -> str:
        return f"{self.subnet}.{10 + node_id}"

    def host(self, node_id: int) -> tuple[str, str, str]:
        """(host, advertised host, namespace) of node `node_id`, created on first use."""
        if node_id not in self.namespaces:
            ns, outer, inner = f"rbns{self.tag}n{node_id}", f"rbv{self.tag}n{node_id}", f"rbp{self.tag}n{node_id}"
            _ip("netns", "add", ns)
            self.namespaces[node_id] = ns
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.links[node_id] = outer
            _ip("link", "set", outer, "master", self.bridge, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.address(node_id)}/24", "dev", inner)
            _ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        addr = self.address(node_id)
        return addr, addr, self.namespaces[node_id]

    def link_down(self, node_id: int) -> None:
        _ip("link", "set", self.links[node_id], "down")

    def link_up(self, node_id: int) -> None:
        _ip("link", "set", self.links[node_id], "up")

    def close(self) -> list[str]:
        """Delete everything created; returns what could not be deleted."""
        left = []
        for node_id, ns in self.namespaces.items():
            if _ip("netns", "del", ns, check=False).returncode:
                left.append(ns)
            link = self.links.get(node_id)
            if link and _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
        if self.created_bridge and _ip("link", "del", self.bridge, check=False).returncode:
            left.append(self.bridge)
        self.namespaces.clear()
        self.links.clear()
        return left

    def leftovers(self) -> list[str]:
        names = _ip("netns", "list", check=False).stdout + _ip("link", "show", check=False).stdout
        return [w for w in (f"rbns{self.tag}n", f"rbv{self.tag}n", self.bridge) if w in names]


__all__ = ["NetnsHosts"]
