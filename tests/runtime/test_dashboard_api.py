"""The dashboard's routes on the admin API (``GET /``, its files, ``/v1/dashboard/stats``)
over real HTTP on 127.0.0.1 against the fake node of test_admin_api, its sampler on a
scripted node, and the request statistics the client API feeds it.

The page itself is rendered in a real browser by tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import importlib.resources
import re
from typing import Any

import pytest
import trio

from metanode.api import dashboard as dashboard_mod
from metanode.api.dashboard import ASSETS, Dashboard
from metanode.api.reqstats import RequestStats, percentile, stats_for
from tests.runtime.test_admin_api import LIMIT, NODES, STATUS, FakeNode, running

pytestmark = pytest.mark.runtime


# -------------------------------------------------------------------- the page


async def test_root_serves_the_page() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    html = r.text
    assert html.startswith("<!doctype html>")
    assert '<script src="/dashboard/app.js" defer></script>' in html
    assert '<link rel="stylesheet" href="/dashboard/style.css">' in html


async def test_every_file_the_page_names_is_served_from_this_origin() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            html = (await srv.client.get("/")).text
            refs = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert refs, "the page names no files"
            answers = {ref: await srv.client.get(ref) for ref in refs}
    for ref, r in answers.items():
        assert ref.startswith("/dashboard/"), f"{ref} is not a file of this origin"
        name = ref.removeprefix("/dashboard/")
        assert r.status_code == 200, ref
        assert r.headers["content-type"] == ASSETS[name]
        assert r.headers["cache-control"] == "no-cache"
        assert r.content == importlib.resources.files(dashboard_mod).joinpath(name).read_bytes()
    assert {ref.removeprefix("/dashboard/") for ref in refs} == set(ASSETS) - {"index.html"}


def test_the_files_ship_with_the_installed_package() -> None:
    """CI installs the wheel (not editable): the page's files must be package data."""
    root = importlib.resources.files(dashboard_mod)
    for name in ASSETS:
        assert root.joinpath(name).is_file(), f"{name} is missing from the installed package"


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    root = importlib.resources.files(dashboard_mod)
    for name in ASSETS:
        text = root.joinpath(name).read_text(encoding="utf-8")
        # The SVG namespace is a name, not a fetch.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{name} refers to {urls}"
        assert "@import" not in text and "url(" not in text


# ----------------------------------------------------------------- the stats route


async def test_stats_route_answers_what_the_page_needs() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/v1/dashboard/stats")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["status"] == STATUS  # the status route's answer, as is
    assert body["nodes"] == NODES
    assert body["admin_api_address"] == "127.0.0.1:28002"
    assert body["peers"] == {}  # nothing asked yet
    assert isinstance(body["series"], list)
    assert [e["kind"] for e in body["events"]][:1] == ["start"]
    assert body["now_ms"] >= body["started_ms"] > 0


@pytest.mark.parametrize("query", ["since=abc", "since=-1", "since=1&since=2"])
async def test_stats_route_refuses_a_bad_since(query: str) -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get(f"/v1/dashboard/stats?{query}")
    assert r.status_code == 400
    assert "since" in r.json()["error"]


async def test_stats_route_reports_a_failing_node() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(error=RuntimeError("boom"))) as srv:
            r = await srv.client.get("/v1/dashboard/stats")
            page = await srv.client.get("/")
    assert r.status_code == 500
    assert "boom" in r.json()["error"]
    assert page.status_code == 200  # the page still loads, and shows the error


# ---------------------------------------------------------------------- the sampler


class ScriptedNode:
    """A node whose status the test changes between samples (either status shape)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {
            "id": 2, "state": "Follower", "is_leader": False, "current_term": 3,
            "last_log_index": 100, "last_applied": {"index": 100}, "snapshot_last_log_id": None,
            "purged": None, "leader": {"id": 1, "endpoint": {"addr": "127.0.0.1", "port": 1}},
            "replication": None, "voters": [1, 2, 3], "non_voters": [], "last_seq": 50,
        }

    def cluster_status(self) -> dict:
        return self.status

    def config_json(self) -> dict:
        return {"admin_api_address": "127.0.0.1:1", "raft_config": {"cluster_name": "demo"}}

    def cluster_nodes(self) -> list[dict]:
        return []


class WallClock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


async def test_sampler_records_leader_and_membership_changes(autojump_clock: trio.abc.Clock) -> None:
    node = ScriptedNode()
    wall = WallClock()
    board = Dashboard(node, wall_ms=wall)
    board.observe()
    node.status = dict(node.status, leader=None, current_term=4)  # an election starts
    board.observe()
    # The new shape: Node records instead of ids, log ids, a leader record with a name.
    node.status = dict(
        node.status, current_term=4, state="Leader", is_leader=True,
        leader={"name": "2", "endpoint": {"addr": "127.0.0.1", "port": 2}, "grpc_api_advertise_address": None},
        voters=[{"name": str(i), "endpoint": {"addr": "h", "port": i}, "grpc_api_advertise_address": None} for i in (1, 2)],
        non_voters=[{"name": "4", "endpoint": {"addr": "h", "port": 4}, "grpc_api_advertise_address": None}],
        last_applied={"leader_id": {"term": 4, "node_id": 2}, "index": 110},
        snapshot_last_log_id={"leader_id": {"term": 4, "node_id": 2}, "index": 105},
    )
    board.observe()
    texts = [(e["kind"], e["text"], e["leader"], e["term"]) for e in board.events]
    assert texts == [
        ("start", "dashboard sampling started; node 1 leads at term 3", 1, 3),
        ("leader", "no leader at term 4", None, 4),
        ("leader", "node 2 became leader at term 4", 2, 4),
        ("membership", "voters 1, 2, 3 \u2192 1, 2", 2, 4),
        ("membership", "learners none \u2192 4", 2, 4),
    ]


class Link:
    def __init__(self) -> None:
        self.connected = True


async def test_sampler_reports_a_raft_link_that_stays_down_or_up(autojump_clock: trio.abc.Clock) -> None:
    node = ScriptedNode()
    node._links = {1: Link(), 3: Link(), 9: Link()}  # type: ignore[attr-defined]  # 9: not a member
    wall = WallClock()
    board = Dashboard(node, wall_ms=wall)

    async def run(seconds: float) -> None:
        for _ in range(int(seconds / 0.25)):
            board.observe()
            await trio.sleep(0.25)
            wall.ms += 250

    await run(1)
    node._links[3].connected = False  # type: ignore[attr-defined]  # a reconnect: no event
    node._links[9].connected = False  # type: ignore[attr-defined]
    await run(0.5)
    node._links[3].connected = True  # type: ignore[attr-defined]
    await run(2)
    assert [e["kind"] for e in board.events] == ["start"]
    down_at = wall.ms
    node._links[3].connected = False  # type: ignore[attr-defined]
    await run(2)
    node._links[3].connected = True  # type: ignore[attr-defined]
    up_at = wall.ms
    await run(2)
    member = [(e["t"], e["text"], e["node"], e["up"]) for e in board.events if e["kind"] == "member"]
    assert member == [
        (down_at, "raft link to node 3 down: node 3 unreachable", 3, False),
        (up_at, "raft link to node 3 up again", 3, True),
    ]
    assert board.view()["links"] == {"1": {"connected": True}, "3": {"connected": True}, "9": {"connected": False}}


async def test_sampler_makes_one_point_a_second_from_the_applied_index(autojump_clock: trio.abc.Clock) -> None:
    node = ScriptedNode()
    wall = WallClock()
    board = Dashboard(node, wall_ms=wall)
    board.observe()
    for second in range(1, 4):
        await trio.sleep(1.0)
        wall.ms += 1000
        node.status = dict(node.status, last_applied={"index": 100 + 30 * second}, last_seq=50 + 10 * second)
        board.observe()
        board.observe()  # twice within the second: still one point
    points = list(board.series)
    assert len(points) == 3
    assert [p["applied"] for p in points] == [130, 160, 190]
    assert all(p["applied_per_s"] == 30.0 and p["seq_per_s"] == 10.0 for p in points)
    assert all(p["writes_per_s"] == 0.0 and p["read_p99_ms"] is None for p in points)
    view = board.view(since_ms=points[0]["t"])
    assert [p["applied"] for p in view["series"]] == [160, 190]
    assert view["cluster_name"] == "demo"


async def test_sampler_counts_client_requests_from_the_request_stats(autojump_clock: trio.abc.Clock) -> None:
    node = ScriptedNode()
    board = Dashboard(node, wall_ms=WallClock())
    stats = stats_for(node)
    assert stats is not None and board.requests is stats
    board.observe()
    for ms in range(1, 101):
        stats.record("write", ms / 1000, ok=True)
    stats.record("read", 0.002, ok=False)
    await trio.sleep(1.0)
    board.observe()
    (point,) = board.series
    assert point["writes_per_s"] == 100.0
    assert point["write_p50_ms"] == 50.0
    assert point["write_p99_ms"] == 99.0
    assert point["reads_per_s"] == 1.0 and point["read_errors"] == 1
    await trio.sleep(1.0)
    board.observe()
    assert board.series[-1]["writes_per_s"] == 0.0
    assert board.series[-1]["write_p50_ms"] is None  # no request: no latency, not zero


# ---------------------------------------------------------------- request statistics


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_request_stats_bound_their_samples() -> None:
    stats = RequestStats()
    for _ in range(3 * 4096):
        stats.record("read", 0.001, ok=True)
    stats.record("unknown-kind", 1.0, ok=True)  # ignored
    assert len(stats._periods["read"].samples) == 4096
    taken = stats.take()
    assert taken["read"] == {"count": 3 * 4096, "errors": 0, "p50_ms": 1.0, "p99_ms": 1.0}
    assert taken["write"]["count"] == 0 and taken["write"]["p50_ms"] is None
    assert stats.take()["read"]["count"] == 0
    assert stats.totals["read"] == 3 * 4096


def test_stats_are_one_per_node_object() -> None:
    a, b = ScriptedNode(), ScriptedNode()
    assert stats_for(a) is stats_for(a)
    assert stats_for(a) is not stats_for(b)
    assert stats_for(FakeNode()) is None  # unhashable (attrs eq): nothing counted
