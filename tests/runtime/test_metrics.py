"""`/v1/metrics` of real in-process nodes (docs/reference/metrics.md): databend-meta's
names (the ones its admin test `test_metrics` asserts, wherever metanode has the
quantity), counters and histograms that move under load, and `promtool check metrics`
on the exposition of a node under load."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from metanode.client import MetaClient
from metanode.config import load_config
from metanode.metrics import PROMTOOL_LINT_FINDINGS, metrics_for
from metanode.node.node import Node
from metanode.server import open_server
from tests.net import free_port, until

pytestmark = pytest.mark.runtime

LIMIT = 60

#: Sample names databend-meta's admin test asserts, that metanode has the quantity of
#: (left out: its leveled store's snapshot block statistics and primary/expire index
#: counts, which metanode's snapshot format does not have).
DATABEND_SAMPLES = [
    "metasrv_server_leader_changes_total", "metasrv_server_last_log_index", "metasrv_server_proposals_pending",
    "metasrv_server_is_leader", "metasrv_server_node_is_health", "metasrv_server_last_seq",
    "metasrv_server_proposals_applied", "metasrv_server_current_leader_id", "metasrv_server_current_term",
    "metasrv_server_applying_snapshot", "metasrv_server_proposals_failed_total", "metasrv_server_read_failed_total",
    "metasrv_server_watchers",
    "metasrv_server_raft_log_cache_items", "metasrv_server_raft_log_cache_used_size", "metasrv_server_raft_log_size",
    "metasrv_server_raft_log_wal_closed_chunk_count", "metasrv_server_raft_log_wal_closed_chunk_total_size",
    "metasrv_server_raft_log_wal_offset", "metasrv_server_raft_log_wal_open_chunk_size",
    "metasrv_server_snapshot_key_count",
    "metasrv_meta_network_recv_bytes_total", "metasrv_meta_network_req_failed_total",
    "metasrv_meta_network_req_inflights", "metasrv_meta_network_req_success_total",
    "metasrv_meta_network_sent_bytes_total",
    "metasrv_meta_network_rpc_delay_ms_bucket", "metasrv_meta_network_rpc_delay_ms_count",
    "metasrv_meta_network_rpc_delay_ms_sum",
    "metasrv_meta_network_rpc_delay_read_ms_bucket", "metasrv_meta_network_rpc_delay_read_ms_count",
    "metasrv_meta_network_rpc_delay_read_ms_sum",
    "metasrv_meta_network_rpc_delay_write_ms_bucket", "metasrv_meta_network_rpc_delay_write_ms_count",
    "metasrv_meta_network_rpc_delay_write_ms_sum",
    "metasrv_raft_network_active_peers", "metasrv_raft_network_recv_bytes_total",
    "metasrv_raft_network_sent_bytes_total",
    "metasrv_raft_network_append_sent_seconds_bucket", "metasrv_raft_network_append_sent_seconds_count",
    "metasrv_raft_network_append_sent_seconds_sum",
    "metasrv_raft_storage_snapshot_building", "metasrv_raft_storage_snapshot_written_entries_total",
    "metasrv_meta_network_watch_initialization_total", "metasrv_meta_network_watch_change_total",
    "metasrv_meta_network_stream_get_item_sent_total", "metasrv_meta_network_stream_mget_item_sent_total",
    "metasrv_meta_network_stream_list_item_sent_total",
]


class Cluster:
    """Three in-process nodes with their admin and client APIs on loopback."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {i: (free_port(), free_port(), free_port()) for i in (1, 2, 3)}
        self.nodes: dict[int, Node] = {}

    def raft(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i][0]}"

    def admin(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i][1]}"

    def grpc(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i][2]}"

    @asynccontextmanager
    async def node(self, i: int, *extra: str) -> AsyncIterator[Node]:
        args = [
            "--id", str(i), "--raft-dir", str(self.tmp / f"d{i}"), "--log-dir", str(self.tmp / "logs"),
            "--raft-api-port", str(self.ports[i][0]), "--raft-advertise-host", "127.0.0.1",
            "--admin-api-address", self.admin(i), "--grpc-api-address", self.grpc(i),
            "--heartbeat-interval", "50", "--wait-leader-timeout", "5000",
            "--snapshot-logs-since-last", "50", *extra,
        ]
        async with open_server(load_config(args, {})) as n:
            self.nodes[i] = n
            yield n

    @asynccontextmanager
    async def three(self) -> AsyncIterator[Cluster]:
        async with AsyncExitStack() as stack:
            n1 = await stack.enter_async_context(self.node(1, "--single"))
            await until(lambda: n1.core.is_leader, "node 1 leads")
            for i in (2, 3):
                await stack.enter_async_context(self.node(i, "--join", self.raft(1)))
            await until(lambda: len(n1.core.committed_membership.voter_ids) == 3, "three voters")
            yield self


async def scrape(address: str) -> dict[str, dict[tuple, float]]:
    """name -> {labels: value} of every sample of one scrape (text exposition)."""
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://{address}/v1/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def text(address: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://{address}/metrics")).text


def total(samples: dict[str, dict[tuple, float]], name: str) -> float:
    return sum(samples.get(name, {}).values())


async def load(c: Cluster, n: int) -> None:
    """`n` writes and reads through node 2 (a follower: forwarded), and a watch."""
    async with MetaClient.connect([c.grpc(2)]) as client:
        async with client.watch("load/", key_end="load0", initial_flush=True) as events:
            async with trio.open_nursery() as nursery:

                async def writer(w: int) -> None:
                    for k in range(n):
                        await client.upsert(f"load/{w}/{k}", b"v" * 100)
                        await client.get(f"load/{w}/{k}")

                for w in range(4):
                    nursery.start_soon(writer, w)
            seen = 0
            async for _ in events:
                seen += 1
                if seen >= 4 * n:
                    break
        await client.mget(["load/0/0", "load/1/0", "nope"])
        await client.list("load/0/")


async def test_databend_names_and_counters_moving_under_load(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with Cluster(tmp_path).three() as c:
            before = await scrape(c.admin(2))
            missing = [name for name in DATABEND_SAMPLES if name not in before and not name.startswith(
                ("metasrv_meta_network_rpc_delay", "metasrv_raft_network_append_sent_seconds",
                 "metasrv_raft_network_recv_bytes", "metasrv_raft_network_sent_bytes"))]
            # Labelled and observed families have samples once something happened;
            # the rest are there from the start.
            assert not missing, missing
            await load(c, 30)
            leader_before = await scrape(c.admin(1))
            await until(lambda: c.nodes[1].driver.last_snapshot_index > 0, "a snapshot on node 1")
            after = await scrape(c.admin(2))
            leader = await scrape(c.admin(1))
    # Every name on the leader; the follower sends no appends.
    assert not [name for name in DATABEND_SAMPLES if name not in leader]
    assert not [name for name in DATABEND_SAMPLES if name not in after and "append_sent" not in name]
    moved = {
        name: (total(before, name), total(after, name))
        for name in (
            "metasrv_meta_network_recv_bytes_total", "metasrv_meta_network_sent_bytes_total",
            "metasrv_meta_network_req_success_total", "metasrv_meta_network_rpc_delay_ms_count",
            "metasrv_meta_network_rpc_delay_read_ms_count", "metasrv_meta_network_rpc_delay_write_ms_count",
            "metasrv_meta_network_stream_get_item_sent_total", "metasrv_meta_network_stream_mget_item_sent_total",
            "metasrv_meta_network_stream_list_item_sent_total", "metasrv_meta_network_watch_change_total",
            "metasrv_meta_network_watch_initialization_total", "metasrv_raft_network_sent_bytes_total",
            "metasrv_raft_network_recv_bytes_total", "metasrv_server_last_log_index", "metasrv_server_last_seq",
            "metasrv_server_proposals_applied", "metasrv_server_raft_log_size",
        )
    }
    assert all(b > a for a, b in moved.values()), moved
    assert total(after, "metasrv_meta_network_rpc_delay_write_ms_count") - total(
        before, "metasrv_meta_network_rpc_delay_write_ms_count") == 120  # 4 writers x 30 upserts
    assert total(after, "metasrv_meta_network_stream_mget_item_sent_total") - total(
        before, "metasrv_meta_network_stream_mget_item_sent_total") == 3
    assert after["metasrv_meta_network_req_inflights"][()] == 0
    assert after["metasrv_server_last_seq"][()] == 120 and after["metasrv_server_is_leader"][()] == 0
    assert after["metasrv_server_current_leader_id"][()] == 1 and after["metasrv_server_node_is_health"][()] == 1
    assert after["metasrv_server_leader_changes_total"][()] >= 1
    # The follower's link to the leader (its answers go there) is up; the leader's to both.
    assert after["metasrv_raft_network_active_peers"][(("addr", c.raft(1)), ("id", "1"))] == 1.0
    assert leader["metasrv_raft_network_active_peers"] == {
        (("addr", c.raft(2)), ("id", "2")): 1.0, (("addr", c.raft(3)), ("id", "3")): 1.0}
    # The leader sends the appends (timed) and received from both followers.
    assert total(leader, "metasrv_raft_network_append_sent_seconds_count") > 0
    assert {dict(labels)["from"] for labels in leader["metasrv_raft_network_recv_bytes_total"]} >= {"2", "3"}
    assert leader["metasrv_raft_storage_snapshot_written_entries_total"][()] > 0
    assert leader["metasrv_server_is_leader"][()] == 1 and leader["metasrv_server_snapshot_key_count"][()] == 120
    assert leader["metasrv_server_leader_changes_total"][()] == leader_before["metasrv_server_leader_changes_total"][()]
    # metanode's own gauges stay.
    assert leader["metanode_raft_applied_index"][()] >= 120 and leader["metanode_sm_keys"][()] == 120


async def test_read_failures_and_failed_requests_are_counted(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with Cluster(tmp_path).node(1, "--single") as n1:
            c_admin = f"127.0.0.1:{n1.config.admin_api_address.rsplit(':', 1)[1]}"
            await until(lambda: n1.core.is_leader)
            metrics = metrics_for(n1)
            before = metrics.req_failed._value.get()
            async with MetaClient.connect([n1.config.grpc_api_address]) as client:
                with pytest.raises(Exception):
                    await client.list("x", limit=-1)
            after = await scrape(c_admin)
    assert after["metasrv_meta_network_req_failed_total"][()] == before + 1


@pytest.mark.skipif(shutil.which("promtool") is None and not __import__("os").environ.get("CI"),
                    reason="promtool (Debian package prometheus) is not installed; .ci/run installs it")
async def test_promtool_checks_the_exposition_of_a_node_under_load(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with Cluster(tmp_path).three() as c:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load, c, 20)
                await until(lambda: c.nodes[1].sm.last_seq >= 20, "load under way")
                expositions = [await text(c.admin(i)) for i in (1, 2)]
    for exposition in expositions:
        assert "metasrv_raft_network_sent_bytes_total" in exposition
        problems = promtool_problems(exposition)
        # Only lint findings about databend-meta's own names (abbreviated units in
        # "rpc_delay_ms", gauges ending in "_count"): metanode keeps databend's names,
        # which its dashboards read.
        assert problems == PROMTOOL_LINT_FINDINGS, problems - PROMTOOL_LINT_FINDINGS


def promtool_problems(exposition: str) -> set[str]:
    """What `promtool check metrics` reports on `exposition`: exit 0 (clean) or 3
    (lint problems, one a line); a parse error (exit 1) fails the test."""
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode in (0, 3), (result.returncode, result.stdout, result.stderr)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
