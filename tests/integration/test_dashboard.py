"""The dashboard (``GET /`` on the admin port) in a real browser: headless Chromium.

* against a real 3-node cluster: the page lists the three members with their own
  numbers and names the leader; after the leader is SIGKILLed the same page, served by
  a survivor, names the new leader within 5 s and shows the old one down; when the
  node serving it is killed too, it says so. Screenshots of each stage are written to
  ``$METANODE_TEST_ARTIFACTS`` (default: the test's tmp dir) and their paths printed.
* against in-process admin servers over scripted nodes: the page reads both status
  shapes (metanode's first one and databend-meta's MetaNodeStatus).

The browser is driven over the DevTools protocol (one page kept open across the
failover), or run once with ``--dump-dom``. Every Chromium process is started in its
own process group and the test stops that group by the browser's PID; every wait is
bounded. Without a ``chromium`` binary the tests skip, unless
``METANODE_REQUIRE_CHROMIUM=1`` (as ``.ci/run`` sets) makes that a failure.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from metanode.api import serve_admin
from metanode.client import MetaClient
from tests.integration.harness import START_TIMEOUT, LocalCluster, voter_ids, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The client API addresses are published, so the page shows every member's own numbers.
PUBLISH = 'grpc_api_advertise_host = "127.0.0.1"'

WINDOW = (1280, 900)


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("METANODE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    base = os.environ.get("METANODE_TEST_ARTIFACTS")
    path = Path(base) / "dashboard" if base else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------- the browser


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the browser's process group (its renderer and helpers too), then
    SIGKILL after a bound; reap the browser."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            # The helpers may outlive the browser for a moment: check the group is gone.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def _chromium_args(binary: str, profile: Path) -> list[str]:
    return [
        binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
    ]


class Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict:
        rid = next(self.ids)
        await self.ws.send_message(json.dumps({"id": rid, "method": method, "params": params}))
        with trio.fail_after(20):
            while True:
                msg = json.loads(await self.ws.get_message())
                if msg.get("id") == rid:
                    if "error" in msg:
                        raise AssertionError(f"{method}: {msg['error']}")
                    return msg.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        """The whole page (not only the window) as a PNG."""
        metrics = await self.call("Page.getLayoutMetrics")
        height = max(WINDOW[1], int(metrics["cssContentSize"]["height"]))
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=height,
            deviceScaleFactor=1, mobile=False,
        )
        shot = await self.call("Page.captureScreenshot", format="png")
        await self.call("Emulation.clearDeviceMetricsOverride")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"dashboard screenshot: {path}")
        return path


@asynccontextmanager
async def browser(binary: str, profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with the DevTools protocol on a free port, and its tab."""
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile.parent / f"{profile.name}.log", "ab")
    proc = subprocess.Popen(
        [*_chromium_args(binary, profile), "--remote-debugging-port=0", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        active = profile / "DevToolsActivePort"
        wait_until(lambda: proc.poll() is None and active.exists() and active.read_text().count("\n") >= 1,
                   20, "chromium to open its DevTools port")
        port = int(active.read_text().split("\n")[0])
        targets = wait_until(
            lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                     if t.get("type") == "page"],
            10, "chromium's first tab",
        )
        async with open_websocket_url(targets[0]["webSocketDebuggerUrl"], max_message_size=64 << 20) as ws:
            yield Page(ws)
    finally:
        _stop_group(proc)
        log.close()


#: What the page shows, read from its DOM (the data-* attributes are for tests).
SNAPSHOT_JS = """!document.getElementById('leader') ? JSON.stringify({state: 'not loaded', rows: [], alerts: []}) :
JSON.stringify({
  state: document.body.dataset.state,
  leader: document.getElementById('leader').dataset.leaderId,
  leaderText: document.getElementById('leader').textContent,
  rows: [...document.querySelectorAll('#members-body tr')].map(tr => ({
    id: Number(tr.dataset.nodeId), role: tr.dataset.role,
    cells: [...tr.cells].map(c => c.textContent.trim())})),
  alerts: [...document.querySelectorAll('#alerts .alert')].map(a => a.id),
  alertText: document.getElementById('alerts').textContent,
  reads: document.querySelector('#chart-reads .now').textContent,
  writes: document.querySelector('#chart-writes .now').textContent,
  events: [...document.querySelectorAll('#events li .text')].map(e => e.textContent),
})"""


async def snapshot(page: Page) -> dict:
    return json.loads(await page.evaluate(SNAPSHOT_JS))


async def wait_page(page: Page, pred: Callable[[dict], bool], timeout: float, what: str) -> dict:
    """Read the page every 100 ms until `pred` holds (bounded); its last snapshot."""
    deadline = trio.current_time() + timeout
    last: dict = {}
    while True:
        last = await snapshot(page)
        if pred(last):
            return last
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for the page to show {what}; it shows {last}")
        await trio.sleep(0.1)


def roles(view: dict) -> dict[int, str]:
    return {row["id"]: row["role"] for row in view["rows"]}


# ----------------------------------------------------------- a real cluster


def start_published(c: LocalCluster, count: int = 3) -> None:
    """Like `LocalCluster.start`, with each member's client API address published."""
    c.add(1, single=True, extra=PUBLISH)
    c.wait_healthy(1)
    wait_until(lambda: c.admin(1).node_names() == ["1"], START_TIMEOUT, "node 1 to publish itself")
    for i in range(2, count + 1):
        c.add(i, join=[1], extra=PUBLISH)
        c.wait_healthy(i)
    ids = list(range(1, count + 1))
    wait_until(lambda: voter_ids(c.admin(1).status()) == ids, 30, f"{count} voters")
    wait_until(lambda: c.admin(1).node_names() == [str(i) for i in ids], 30, f"{count} records")


def member_numbers_shown(view: dict, ids: list[int]) -> bool:
    """Every member's row carries its own term and indexes (digits, not a dash)."""
    rows = {row["id"]: row for row in view["rows"]}
    return all(i in rows and re.fullmatch(r"[\d,]+", rows[i]["cells"][3]) for i in ids)


async def test_the_dashboard_follows_a_leader_change(
    cluster: LocalCluster, chromium: str, artifacts: Path, tmp_path: Path
) -> None:
    start_published(cluster)
    leader = wait_until(cluster.leader, 10, "a leader")
    survivors = [i for i in (1, 2, 3) if i != leader]
    served_by = survivors[0]
    url = f"{cluster.admin(served_by).base}/"

    async with browser(chromium, tmp_path / "chromium") as page:
        await page.call("Page.navigate", url=url)
        view = await wait_page(
            page,
            lambda v: v["state"] == "live" and sorted(roles(v)) == [1, 2, 3] and v["leader"] == str(leader)
            and roles(v)[leader] == "leader" and member_numbers_shown(v, [1, 2, 3]),
            15, f"three members, each with its own numbers, and node {leader} leading",
        )
        assert view["leaderText"].startswith(f"node {leader}")
        # The route behind the page: every peer asked over the client API, and this
        # node's raft link to the leader seen (a renamed node attribute would hide it).
        stats = cluster.admin(served_by).get("/v1/dashboard/stats").json()
        assert sorted(stats["peers"]) == sorted(str(i) for i in (1, 2, 3) if i != served_by)
        assert stats["links"].get(str(leader), {}).get("connected") is True
        assert sorted(r for i, r in roles(view).items() if i != leader) == ["follower", "follower"]
        assert view["alerts"] == []

        # Client requests at the node serving the page show up in its charts.
        async with MetaClient.connect([f"127.0.0.1:{cluster.ports[served_by][2]}"], timeout=10) as client:
            for n in range(30):
                await client.upsert(f"dash/{n}", b"v")
                await client.get(f"dash/{n}")
        view = await wait_page(page, lambda v: v["reads"] not in ("0", "—"), 5, "reads at this node")
        await page.screenshot(artifacts / "dashboard-3-nodes.png")

        # SIGKILL the leader: the same page names the new leader within 5 s.
        cluster.procs[leader].kill()
        killed_at = trio.current_time()
        view = await wait_page(
            page, lambda v: v["leader"] not in ("", str(leader)) and int(v["leader"]) in survivors,
            5, "a new leader among the survivors",
        )
        took = trio.current_time() - killed_at
        new_leader = int(view["leader"])
        print(f"dashboard on node {served_by} named node {new_leader} the new leader {took:.2f} s after node {leader} was killed")
        view = await wait_page(
            page, lambda v: roles(v).get(leader) == "down" and roles(v).get(new_leader) == "leader"
            and "alert-members-down" in v["alerts"],
            10, f"node {leader} down and node {new_leader} leading",
        )
        assert any("became leader" in e for e in view["events"])
        await page.screenshot(artifacts / "dashboard-after-failover.png")

        # Kill the node serving the page: the page says so instead of going stale.
        cluster.procs[served_by].kill()
        view = await wait_page(
            page, lambda v: v["state"] == "down" and "alert-server-down" in v["alerts"],
            5, "that its own node is not answering",
        )
        assert f"Node {served_by} is not answering" in view["alertText"]
        await page.screenshot(artifacts / "dashboard-server-down.png")


# --------------------------------------------------- both status shapes, in-process


def _record(i: int) -> dict:
    return {"name": str(i), "endpoint": {"addr": "127.0.0.1", "port": 29000 + i}, "grpc_api_advertise_address": None}


def _log_id(index: int) -> dict:
    return {"leader_id": {"term": 7, "node_id": 1}, "index": index}


#: metanode's first status shape: ids, {"index"}, an endpoint map, leader {"id"}.
OLD_STATUS = {
    "id": 1, "endpoint": {"addr": "127.0.0.1", "port": 29001}, "state": "Leader", "is_leader": True,
    "current_term": 7, "last_log_index": 120, "last_applied": _log_id(120),
    "snapshot_last_log_id": _log_id(100), "purged": _log_id(50),
    "leader": {"id": 1, "endpoint": {"addr": "127.0.0.1", "port": 29001}},
    "replication": {"1": {"index": 120}, "2": {"index": 118}, "3": {"index": 20}},
    "voters": [1, 2, 3], "non_voters": [], "last_seq": 99, "cluster_id": "c0ffee",
}

#: databend-meta's MetaNodeStatus: Node records, log ids, "host:port", leader a record.
NEW_STATUS = {
    "id": 1, "binary_version": "metanode test", "data_version": "V001", "endpoint": "127.0.0.1:29001",
    "raft_log": {}, "snapshot_key_count": 3, "state": "Leader", "is_leader": True,
    "current_term": 7, "last_log_index": 120, "last_applied": _log_id(120),
    "snapshot_last_log_id": _log_id(100), "purged": _log_id(50), "leader": _record(1),
    "replication": {"1": _log_id(120), "2": _log_id(118), "3": _log_id(20)},
    "voters": [_record(1), _record(2), _record(3)], "non_voters": [], "last_seq": 99, "cluster_id": "c0ffee",
}


class ShapedNode:
    """A leader whose status has the given shape."""

    def __init__(self, status: dict) -> None:
        self.status = status

    def config_json(self) -> dict:
        return {"admin_api_address": "127.0.0.1:0", "raft_config": {"id": 1, "cluster_name": "shapes"}}

    def cluster_nodes(self) -> list[dict]:
        return [_record(i) for i in (1, 2, 3)]

    def cluster_status(self) -> dict:
        return self.status

    def metrics(self) -> dict[str, float]:
        return {}

    async def trigger_snapshot(self) -> None:
        return None

    async def transfer_leader(self, to: int | None) -> dict:
        raise NotImplementedError


async def dump_dom(binary: str, url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran (a few seconds of virtual time)."""
    proc = subprocess.Popen(
        [*_chromium_args(binary, profile), "--virtual-time-budget=4000", "--dump-dom", url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        out, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
    finally:
        _stop_group(proc)
    return out.decode()


@pytest.mark.parametrize("shape", ["first", "MetaNodeStatus"])
async def test_the_page_reads_both_status_shapes(shape: str, chromium: str, tmp_path: Path) -> None:
    node = ShapedNode(OLD_STATUS if shape == "first" else NEW_STATUS)
    shutdown = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                lambda task_status: serve_admin(node, "127.0.0.1:0", token=None, shutdown=shutdown, task_status=task_status)
            )
            try:
                dom = await dump_dom(chromium, f"http://{address}/", tmp_path / "chromium")
            finally:
                shutdown.set()
    rows = dict(re.findall(r'<tr data-node-id="(\d+)" data-role="(\w+)"', dom))
    assert rows == {"1": "leader", "2": "unknown", "3": "unknown"}, dom[:2000]
    assert 'id="leader" data-leader-id="1"' in dom
    assert 'id="cluster-name">shapes<' in dom
    # The leader's replication map, read from either shape: lag = 120 - matched.
    behind = {}
    for row in dom.split('<tr data-node-id="')[1:]:
        found = re.search(r'data-behind="(\d*)"', row.split("</tr>")[0])
        behind[row.split('"')[0]] = found.group(1) if found else None
    assert behind == {"1": None, "2": "2", "3": "100"}
    assert "127.0.0.1:29002" in dom  # raft endpoints from the records
    assert ">snapshot 100 · purged 50<" in dom
