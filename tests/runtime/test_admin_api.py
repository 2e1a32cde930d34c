"""The admin HTTP API (contract §4) over real HTTP on 127.0.0.1, against a fake node.

Every test is bounded by `trio.fail_after`; slow node calls are driven by events,
never by sleeps.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from metanode.api import AdminNode, admin, create_app, serve_admin
from metanode.errors import BadRequest, ClientError, NotLeader, Timeout, Unavailable

pytestmark = pytest.mark.runtime

LIMIT = 5.0
TOKEN = "s3cret-token"

NODES = [
    {"name": "1", "endpoint": {"addr": "localhost", "port": 28004}, "grpc_api_advertise_address": None},
    {"name": "2", "endpoint": {"addr": "localhost", "port": 28203}, "grpc_api_advertise_address": "10.0.0.2:9191"},
]

NODE_1 = NODES[0]
LOG_ID = {"leader_id": {"term": 3, "node_id": 1}, "index": 10}
STATUS = {
    "id": 1,
    "binary_version": "metanode 0.1.0",
    "data_version": "V001",
    "endpoint": "localhost:28004",
    "raft_log": {
        "cache_items": 10, "cache_used_size": 812, "wal_total_size": 4096, "wal_open_chunk_size": 4096,
        "wal_offset": 4096, "wal_closed_chunk_count": 0, "wal_closed_chunk_total_size": 0,
        "wal_closed_chunk_sizes": {},
    },
    "snapshot_key_count": 2,
    "state": "Leader",
    "is_leader": True,
    "current_term": 3,
    "last_log_index": 10,
    "last_applied": LOG_ID,
    "snapshot_last_log_id": None,
    "purged": None,
    "leader": NODE_1,
    "replication": {"1": LOG_ID, "2": LOG_ID},
    "voters": NODES,
    "non_voters": [],
    "last_seq": 7,
    "cluster_id": "b0c1d2",
}

CONFIG = {
    "log_level": "INFO",
    "admin_api_address": "127.0.0.1:28002",
    "admin_api_token": "<redacted>",
    "raft_config": {"id": 1, "raft_dir": "./.metanode/meta", "join": []},
}

METRICS = {
    "metanode_raft_term": 3,
    "metanode_raft_is_leader": 1,
    "metanode_raft_last_log_index": 10,
    "metanode_raft_commit_index": 10,
    "metanode_raft_applied_index": 9,
    "metanode_raft_leader_id": 1,
    "metanode_kv_keys": 2.5,
}


@attrs.define
class FakeNode:
    """An `AdminNode` whose answers and failures the test sets."""

    error: Exception | None = None
    transfer_error: Exception | None = None
    snapshot_gate: trio.Event | None = None
    snapshot_entered: trio.Event = attrs.Factory(trio.Event)
    snapshots: int = 0
    metric_values: dict[str, float] = attrs.Factory(lambda: dict(METRICS))
    transfers: list[int | None] = attrs.Factory(list)
    not_ready: str | None = None  # the health check's reason; None: ready

    async def health(self) -> str | None:
        return self.not_ready

    def _maybe_fail(self) -> None:
        if self.error is not None:
            raise self.error

    def config_json(self) -> dict:
        self._maybe_fail()
        return CONFIG

    def cluster_nodes(self) -> list[dict]:
        self._maybe_fail()
        return NODES

    def cluster_status(self) -> dict:
        self._maybe_fail()
        return STATUS

    def metrics(self) -> dict[str, float]:
        self._maybe_fail()
        return self.metric_values

    async def trigger_snapshot(self) -> None:
        self._maybe_fail()
        self.snapshot_entered.set()
        if self.snapshot_gate is not None:
            await self.snapshot_gate.wait()
        self.snapshots += 1

    async def transfer_leader(self, to: int | None) -> dict:
        self._maybe_fail()
        if self.transfer_error is not None:
            raise self.transfer_error
        self.transfers.append(to)
        return {"from": 1, "to": to if to is not None else 2, "voter_ids": [1, 2, 3]}


def _check_protocol(node: FakeNode) -> AdminNode:
    return node  # type-checks that FakeNode implements AdminNode


@attrs.define
class Running:
    address: str
    client: httpx.AsyncClient
    shutdown: trio.Event
    finished: trio.Event


@asynccontextmanager
async def running(
    node: FakeNode, *, token: str | None = None, **kwargs: Any
) -> AsyncIterator[Running]:
    shutdown = trio.Event()
    finished = trio.Event()

    kwargs.setdefault("health", node.health)

    async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_admin(node, "127.0.0.1:0", token=token, shutdown=shutdown,
                          task_status=task_status, **kwargs)
        finished.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve)
        scheme = "https" if "certfile" in kwargs else "http"
        async with httpx.AsyncClient(base_url=f"{scheme}://{address}", verify=False) as client:
            yield Running(address, client, shutdown, finished)
        shutdown.set()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------- read routes


async def test_health() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/v1/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == b'{"status":"pass"}'
    assert "server" not in r.headers


async def test_health_is_503_with_the_reason_until_the_node_is_ready() -> None:
    node = FakeNode(not_ready="no leader known")
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            before = await srv.client.get("/v1/health")
            node.not_ready = None
            after = await srv.client.get("/v1/health")
    assert before.status_code == 503 and before.headers["content-type"] == "application/json"
    assert before.json() == {"status": "fail", "reason": "no leader known"}
    assert (after.status_code, after.content) == (200, b'{"status":"pass"}')


async def test_bound_address_is_reported() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            host, port = srv.address.rsplit(":", 1)
            assert host == "127.0.0.1"
            assert int(port) > 0


async def test_config() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/v1/config")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == CONFIG


async def test_cluster_nodes_matches_the_tutorial_shape() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/v1/cluster/nodes")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == (
        b'[{"name":"1","endpoint":{"addr":"localhost","port":28004},"grpc_api_advertise_address":null},'
        b'{"name":"2","endpoint":{"addr":"localhost","port":28203},"grpc_api_advertise_address":"10.0.0.2:9191"}]'
    )
    # The tutorial's fields, in its order, with its types.
    tutorial = [
        {"name": "1", "endpoint": {"addr": "localhost", "port": 28004}},
        {"name": "2", "endpoint": {"addr": "localhost", "port": 28203}},
    ]
    got = r.json()
    assert isinstance(got, list)
    for item, expected in zip(got, tutorial, strict=True):
        assert list(item) == ["name", "endpoint", "grpc_api_advertise_address"]
        assert list(item["endpoint"]) == ["addr", "port"]
        assert {k: item[k] for k in expected} == expected


async def test_cluster_status_is_passed_through() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/v1/cluster/status")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == STATUS
    assert r.content == json.dumps(STATUS, separators=(",", ":")).encode()


@pytest.mark.parametrize("path", ["/v1/metrics", "/metrics"])
async def test_metrics_text_exposition(path: str) -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    # The node's gauges, and databend-meta's metrics (docs/reference/metrics.md).
    assert set(METRICS) <= set(families)
    assert all(name.startswith(("metanode_", "metasrv_")) for name in families)
    assert families["metasrv_server_node_is_health"].samples[0].value == 1.0
    assert families["metasrv_meta_network_req_success"].type == "counter"
    assert families["metasrv_meta_network_rpc_delay_ms"].type == "histogram"
    for name, value in METRICS.items():
        family = families[name]
        assert family.type == "gauge"
        assert family.documentation
        assert [s.value for s in family.samples] == [float(value)]
    assert families["metanode_raft_term"].documentation == "Current raft term of this node."


async def test_metrics_openmetrics_when_asked() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            r = await srv.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(r.text)}
    assert families["metanode_raft_applied_index"].samples[0].value == 9.0


async def test_metrics_are_read_fresh_on_each_scrape() -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            first = await srv.client.get("/metrics")
            node.metric_values["metanode_raft_term"] = 4
            second = await srv.client.get("/metrics")
    value = {
        r: {f.name: f.samples[0].value for f in text_string_to_metric_families(r.text) if f.samples}["metanode_raft_term"]
        for r in (first, second)
    }
    assert (value[first], value[second]) == (3.0, 4.0)


# ---------------------------------------------------------------------- ctrl routes


async def test_trigger_snapshot_answers_null_after_the_snapshot_is_built() -> None:
    node = FakeNode(snapshot_gate=trio.Event())
    responses: list[httpx.Response] = []
    with trio.fail_after(LIMIT):
        async with running(node) as srv, trio.open_nursery() as nursery:

            async def ask() -> None:
                responses.append(await srv.client.get("/v1/ctrl/trigger_snapshot"))

            nursery.start_soon(ask)
            await node.snapshot_entered.wait()
            await trio.sleep(0.05)
            assert responses == []  # still building
            assert node.snapshot_gate is not None
            node.snapshot_gate.set()
    [r] = responses
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == b"null"
    assert node.snapshots == 1


async def test_transfer_leader() -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            chosen = await srv.client.get("/v1/ctrl/trigger_transfer_leader")
            to_3 = await srv.client.get("/v1/ctrl/trigger_transfer_leader", params={"to": "3"})
    assert chosen.status_code == 200
    assert chosen.headers["content-type"] == "application/json"
    assert chosen.content == b'{"from":1,"to":2,"voter_ids":[1,2,3]}'
    assert to_3.json() == {"from": 1, "to": 3, "voter_ids": [1, 2, 3]}
    assert node.transfers == [None, 3]


@pytest.mark.parametrize("leader", [3, None])
async def test_transfer_leader_not_leader_is_404_with_the_leader(leader: int | None) -> None:
    node = FakeNode(transfer_error=NotLeader("node 1 is not the leader", leader=leader))
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            r = await srv.client.get("/v1/ctrl/trigger_transfer_leader")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "node 1 is not the leader", "leader": leader}


@pytest.mark.parametrize("query", ["to=abc", "to=", "to=-1", "to=1.5", "to=1&to=2"])
async def test_transfer_leader_bad_to_is_400_naming_it(query: str) -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            r = await srv.client.get(f"/v1/ctrl/trigger_transfer_leader?{query}")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"]
    assert "'to'" in body["error"]
    assert node.transfers == []


async def test_transfer_leader_bad_target_from_node_is_400() -> None:
    node = FakeNode(transfer_error=BadRequest("node 9 is not a voter"))
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            r = await srv.client.get("/v1/ctrl/trigger_transfer_leader?to=9")
    assert r.status_code == 400
    assert r.json() == {"error": "node 9 is not a voter"}


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Unavailable("no leader yet"), 503),
        (Timeout("timed out waiting for the leader"), 504),
        (BadRequest("bad"), 400),
        (ClientError("something internal"), 500),
    ],
)
async def test_client_errors_get_their_natural_status(error: ClientError, status: int) -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(error=error)) as srv:
            responses = [await srv.client.get(p) for p in
                         ("/v1/cluster/status", "/v1/config", "/v1/ctrl/trigger_snapshot")]
    for r in responses:
        assert r.status_code == status
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": str(error)}


async def test_not_leader_anywhere_is_404_with_leader() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(error=NotLeader("not the leader", leader=2))) as srv:
            r = await srv.client.get("/v1/ctrl/trigger_snapshot")
    assert r.status_code == 404
    assert r.json() == {"error": "not the leader", "leader": 2}


async def test_unexpected_error_is_500_json_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(error=RuntimeError("boom"))) as srv:
            r = await srv.client.get("/v1/cluster/status")
            health = await srv.client.get("/v1/health")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert "boom" in r.json()["error"]
    assert health.status_code == 200  # the server keeps serving
    assert any(rec.name == "metanode.admin" and rec.exc_info for rec in caplog.records)


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/health/extra", "/v1/ctrl/unknown", "/dashboard/nope.js", "/dashboard/index.html", "/static/x"])
async def test_unknown_route_is_404_json(path: str) -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(), token=TOKEN) as srv:
            r = await srv.client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": f"not found: {path}"}


@pytest.mark.parametrize("path", ["/v1/health", "/v1/ctrl/trigger_snapshot"])
async def test_wrong_method_is_405_json(path: str) -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node) as srv:
            r = await srv.client.post(path, json={})
    assert r.status_code == 405
    assert r.headers["content-type"] == "application/json"
    assert "POST" in r.json()["error"]
    assert "GET" in r.headers["allow"]
    assert node.snapshots == 0


# ----------------------------------------------------------------------------- token

CTRL = ["/v1/ctrl/trigger_snapshot", "/v1/ctrl/trigger_transfer_leader"]
READ = ["/v1/health", "/v1/config", "/v1/cluster/nodes", "/v1/cluster/status", "/v1/metrics", "/metrics"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKEN + "x"),
        {"Authorization": "Bearer"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer s\u00e9cret".encode("latin-1")},
        {"Authorization": f"Bearer {TOKEN}\u00e9".encode("latin-1")},
    ],
)
async def test_ctrl_routes_refuse_without_the_token(headers: dict[str, str]) -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node, token=TOKEN) as srv:
            responses = [await srv.client.get(p, headers=headers) for p in CTRL]
    for r in responses:
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/json"
        assert list(r.json()) == ["error"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert node.snapshots == 0
    assert node.transfers == []


async def test_ctrl_routes_accept_the_token() -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node, token=TOKEN) as srv:
            snap = await srv.client.get(CTRL[0], headers=bearer(TOKEN))
            move = await srv.client.get(CTRL[1], headers={"Authorization": f"bearer  {TOKEN}"})
            bad_to = await srv.client.get(CTRL[1] + "?to=x", headers=bearer(TOKEN))
    assert (snap.status_code, snap.content) == (200, b"null")
    assert move.status_code == 200
    assert bad_to.status_code == 400
    assert node.snapshots == 1
    assert node.transfers == [None]


async def test_token_is_checked_before_parameters() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(), token=TOKEN) as srv:
            r = await srv.client.get(CTRL[1] + "?to=abc")
    assert r.status_code == 401


async def test_read_routes_never_need_the_token() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode(), token=TOKEN) as srv:
            responses = [await srv.client.get(p) for p in READ]
            wrong = [await srv.client.get(p, headers=bearer("wrong")) for p in READ]
    assert [r.status_code for r in responses + wrong] == [200] * (2 * len(READ))


async def test_no_token_configured_leaves_ctrl_open() -> None:
    node = FakeNode()
    with trio.fail_after(LIMIT):
        async with running(node, token=None) as srv:
            r = await srv.client.get(CTRL[0], headers=bearer("anything"))
    assert r.status_code == 200
    assert node.snapshots == 1


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="admin_api_token"):
        create_app(FakeNode(), token="")


# -------------------------------------------------------------------------- lifecycle


async def test_shutdown_returns_promptly_with_an_idle_keepalive_connection() -> None:
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            assert (await srv.client.get("/v1/health")).status_code == 200  # kept alive
            start = trio.current_time()
            srv.shutdown.set()
            await srv.finished.wait()
            elapsed = trio.current_time() - start
            assert elapsed < 1.0
            with pytest.raises(httpx.TransportError):
                await srv.client.get("/v1/health")
    # The port is free again (the listening socket was closed): a restart rebinds it.
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            again = await nursery.start(
                partial(serve_admin, FakeNode(), srv.address, token=None, shutdown=shutdown)
            )
            shutdown.set()
    assert again == srv.address


async def raw_get(stream: trio.SocketStream, path: str) -> bytes:
    """One keep-alive HTTP/1.1 GET on a raw stream; the whole response."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = await stream.receive_some(65536)
        assert chunk, "server closed before the response ended"
        data += chunk
    return data


async def test_idle_keepalive_connection_closes_after_keep_alive_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin, "KEEP_ALIVE_TIMEOUT", 0.2)
    with trio.fail_after(LIMIT):
        async with running(FakeNode()) as srv:
            host, port = srv.address.rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                for _ in range(2):  # the timer is re-armed after every request
                    response = await raw_get(stream, "/v1/health")
                    assert response.startswith(b"HTTP/1.1 200")
                start = trio.current_time()
                assert await stream.receive_some(65536) == b""  # closed by the server
                assert trio.current_time() - start < 1.5


async def test_shutdown_lets_an_in_flight_request_finish() -> None:
    node = FakeNode(snapshot_gate=trio.Event())
    responses: list[httpx.Response] = []
    with trio.fail_after(LIMIT):
        async with running(node) as srv, trio.open_nursery() as nursery:

            async def ask() -> None:
                responses.append(await srv.client.get("/v1/ctrl/trigger_snapshot"))

            nursery.start_soon(ask)
            await node.snapshot_entered.wait()
            srv.shutdown.set()
            await trio.sleep(0.05)
            assert not srv.finished.is_set()
            assert node.snapshot_gate is not None
            node.snapshot_gate.set()
            await srv.finished.wait()
    [r] = responses
    assert (r.status_code, r.content) == (200, b"null")


async def test_port_in_use_raises_oserror_naming_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                with pytest.raises(OSError, match=address) as info:
                    await nursery.start(
                        partial(serve_admin, FakeNode(), address, token=None, shutdown=trio.Event())
                    )
    assert "in use" in str(info.value)


async def test_malformed_address_raises_valueerror() -> None:
    with trio.fail_after(LIMIT), pytest.raises(ValueError):
        await serve_admin(FakeNode(), "127.0.0.1", token=None, shutdown=trio.Event())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    with trio.fail_after(LIMIT):
        async with running(FakeNode(), certfile=str(cert), keyfile=str(key)) as srv:
            r = await srv.client.get("/v1/health")
    assert (r.status_code, r.content) == (200, b'{"status":"pass"}')


async def test_cancelling_serve_admin_closes_the_socket() -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                partial(serve_admin, FakeNode(), "127.0.0.1:0", token=None, shutdown=trio.Event())
            )
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            assert await nursery.start(
                partial(serve_admin, FakeNode(), address, token=None, shutdown=shutdown)
            ) == address
            shutdown.set()
