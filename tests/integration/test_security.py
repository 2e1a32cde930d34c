"""Peer and client security with real processes on 127.0.0.1
(docs/operations/security.md): every port on TLS and a strict raft secret, refusals
of plaintext, of a certificate from another CA and of a wrong secret (term and
membership untouched), a secret rotation by rolling restart that fails no write, and
certificate problems refused at start (exit 2 naming the key, data dir untouched).

Certificates are made in the test (tests/pki.py, trustme). Every process is stopped
by the `cluster` fixture; every wait is bounded.
"""

from __future__ import annotations

import datetime
import ssl
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from metanode.client import MetaError, SyncMetaClient
from metanode.errors import ClientError, TransportError
from metanode.raft.messages import VoteRequest
from metanode.raft.types import LogId
from metanode.transport import Identity, PeerLink, call
from metanode.transport.security import PeerSecurity
from metanode.config import load_config
from metanode.tls import peer_security
from tests.integration.harness import LocalCluster, run_cli, voter_ids, wait_until
from tests.pki import PKI, Pair

pytestmark = pytest.mark.integration

TOKEN = "client-token-1"
ADMIN_TOKEN = "admin-token-1"


def secure_extra(pair: Pair, *, client_tls: bool = True, admin_tls: bool = True) -> str:
    lines = [f'grpc_api_token = "{TOKEN}"', f'admin_api_token = "{ADMIN_TOKEN}"']
    if client_tls:
        lines += [f'grpc_tls_server_cert = "{pair.cert}"', f'grpc_tls_server_key = "{pair.key}"']
    if admin_tls:
        lines += [f'admin_tls_server_cert = "{pair.cert}"', f'admin_tls_server_key = "{pair.key}"']
    return "\n".join(lines)


def secret_toml(secret: str, accepted: tuple[str, ...] = (), strict: bool = True) -> str:
    accepted_list = ", ".join(f'"{s}"' for s in accepted)
    return (f'raft_secret = "{secret}"\nraft_accepted_secrets = [{accepted_list}]\n'
            f"raft_secret_strict = {'true' if strict else 'false'}\n")  # fmt: skip


def client_tls(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_cert))


def start_secure(c: LocalCluster, pki: PKI, secret: str = "the-secret") -> dict[int, Pair]:
    """Three nodes, every port on TLS, a strict secret; node 1 bootstraps."""
    c.admin_ca = str(pki.ca_cert)
    pairs = {i: pki.issue(f"meta{i}") for i in (1, 2, 3)}
    for i in (1, 2, 3):
        raft = pki.raft_toml(pairs[i]) + secret_toml(secret)
        c.add(i, single=i == 1, join=[1] if i > 1 else None, extra=secure_extra(pairs[i]), raft_extra=raft)
        c.wait_healthy(i)
    wait_until(lambda: c.admin(1).node_names() == ["1", "2", "3"], 30, "three members")
    return pairs


def node_log(c: LocalCluster, i: int) -> str:
    path = c.root / f"logs{i}" / f"metanode-{i}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_untouched(c: LocalCluster, before: tuple[int, list[int]]) -> None:
    """The membership is the same and the forged term (+100) never arrived; an election
    of the cluster's own on a loaded machine may still move the term by one or two."""
    term, voters = snapshot_of(c, 1)
    assert voters == before[1] and before[0] <= term < before[0] + 100, (before, (term, voters))


def snapshot_of(c: LocalCluster, i: int) -> tuple[int, list[int]]:
    st = c.admin(i).status()
    return st["current_term"], voter_ids(st)


def attack_with_a_peer_link(c: LocalCluster, target: int, impersonate: int, security: PeerSecurity) -> str:
    """Dial node `target`'s raft port as member `impersonate`, with `security`, and
    send vote requests of a far higher term for a while; returns the link's error."""
    st = c.admin(target).status()
    ident = Identity(impersonate, "metanode", st["cluster_id"], c.raft_address(impersonate))
    term = st["current_term"] + 100

    async def main() -> str:
        link = PeerLink(target, lambda: c.raft_address(target), lambda: ident, security=security,
                        backoff_max=0.2)  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            with trio.move_on_after(2):
                while True:
                    link.send_nowait(VoteRequest(term, impersonate, target, LogId(term, 10_000), pre_vote=False))
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        return link._last_error or ""

    return trio.run(main)


@pytest.mark.slow
def test_every_port_on_tls_with_a_strict_secret(cluster: LocalCluster, tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    start_secure(cluster, pki)
    addresses = cluster.client_addresses()

    # A TLS client with the token writes and reads; the CLI too.
    with SyncMetaClient(addresses, token=TOKEN, tls=client_tls(pki)) as client:
        client.upsert("k", b"v1")
        assert client.get("k").data == b"v1"
    got = run_cli(["kv", "get", "k", "--addr", addresses[1], "--tls-ca", str(pki.ca_cert), "--token", TOKEN],
                  cluster.root)  # fmt: skip
    assert got.returncode == 0 and '"data": "v1"' in got.stdout, got.stderr
    status = run_cli(["status", "--admin", f"127.0.0.1:{cluster.ports[2][1]}", "--tls-ca", str(pki.ca_cert)],
                     cluster.root)  # fmt: skip
    assert status.returncode == 0 and '"cluster_id"' in status.stdout, status.stderr

    # Plaintext on each TLS port is refused.
    with pytest.raises(MetaError):
        SyncMetaClient(addresses[:1], token=TOKEN, timeout=2)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{cluster.ports[1][1]}/v1/health", timeout=5)
    with pytest.raises((TransportError, ClientError)):
        trio.run(partial(call, cluster.raft_address(1), Identity(0, "metanode", None), "leave", b"", timeout=5,
                         security=PeerSecurity()))  # fmt: skip
    wait_until(lambda: "TLS handshake failed" in node_log(cluster, 1), 10, "the refusal in node 1's log")

    # A peer with a certificate of another CA, or with the right certificate and a
    # wrong secret, posing as member 2 with a far higher term: refused, nothing moves.
    before = snapshot_of(cluster, 1)
    other = PKI(tmp_path / "other", "other")
    stranger = peer_security(load_config(["--id", "9", *other.raft_flags(other.issue("x")),
                                          "--raft-secret", "the-secret"], {}))  # fmt: skip
    assert "TLS handshake failed" in attack_with_a_peer_link(cluster, 1, 2, stranger)
    wrong = peer_security(load_config(["--id", "9", *pki.raft_flags(pki.issue("intruder")),
                                       "--raft-secret", "not-the-secret"], {}))  # fmt: skip
    error = attack_with_a_peer_link(cluster, 1, 2, wrong)
    assert "wrong proof of the raft secret" in error or "refused" in error, error
    assert_untouched(cluster, before)
    assert "node 2 gave a wrong proof of the raft secret (raft_secret_strict is set)" in node_log(cluster, 1)
    # A whole node with a wrong secret cannot join.
    pair4 = pki.issue("meta4")
    cluster.add(4, join=[1], extra=secure_extra(pair4), raft_extra=pki.raft_toml(pair4) + secret_toml("nope"))
    assert cluster.procs[4].wait(60) == 1
    assert "wrong proof of the raft secret" in cluster.procs[4].output()
    assert_untouched(cluster, before)
    assert cluster.admin(1).node_names() == ["1", "2", "3"]

    # The leader dies: the others elect one over TLS and keep serving the TLS client.
    leader = wait_until(cluster.leader, 20, "a leader")
    cluster.procs[leader].kill()
    survivors = [i for i in (1, 2, 3) if i != leader]
    wait_until(lambda: cluster.leader(survivors), 20, "a new leader")
    with SyncMetaClient([addresses[i - 1] for i in survivors], token=TOKEN, tls=client_tls(pki)) as client:
        client.upsert("k", b"v2")
        assert client.get("k").data == b"v2"
    cluster.restart(leader)
    cluster.wait_healthy(leader)

    # --leave-id over mutual TLS with the secret, reading both from the node's config.
    gone = 3
    via = [i for i in (1, 2, 3) if i != gone][0]
    left = run_cli(["--leave-id", str(gone), "--leave-via", cluster.raft_address(via),
                    "-c", str(cluster.root / f"node{via}.toml")], cluster.root)  # fmt: skip
    assert left.returncode == 0, left.stderr
    assert f"node {gone} left the cluster" in left.stdout
    assert cluster.procs[gone].wait(30) == 0
    wait_until(lambda: voter_ids(cluster.admin(via).status()) == [1, 2], 20, "voters 1 and 2")
    # Without the config (no certificate): refused.
    bare = run_cli(["--leave-id", "2", "--leave-via", cluster.raft_address(via)], cluster.root)
    assert bare.returncode == 1, bare.stderr
    assert voter_ids(cluster.admin(via).status()) == [1, 2]


@pytest.mark.slow
def test_a_secret_rotation_by_rolling_restart_fails_no_write(cluster: LocalCluster, tmp_path: Path) -> None:
    old, new = "secret-A", "secret-B"
    for i in (1, 2, 3):
        cluster.add(i, single=i == 1, join=[1] if i > 1 else None, raft_extra=secret_toml(old))
        cluster.wait_healthy(i)
    wait_until(lambda: cluster.admin(1).node_names() == ["1", "2", "3"], 30, "three members")
    addresses = cluster.client_addresses()
    # One client per node the writer goes through, made anew after each restart: a
    # client follows the leaders servers name, and must not keep preferring a node
    # that is about to stop (a write in flight there would end with an unknown outcome).
    clients: dict[int, SyncMetaClient] = {}
    lock = threading.Lock()  # held during each write: a node is stopped between writes
    avoid: list[int] = [0]  # the node being restarted: writes go through another
    stop = threading.Event()
    written: list[tuple[str, bytes]] = []
    failures: list[str] = []

    def writer() -> None:
        n = 0
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                via = [i for i in (1, 2, 3) if i != avoid[0]][n % 2]
                key, value = f"w/{n:05d}", str(n).encode()
                try:
                    if via not in clients:
                        clients[via] = SyncMetaClient([addresses[via - 1]], timeout=10)
                    clients[via].upsert(key, value)
                    written.append((key, value))
                except MetaError as e:
                    failures.append(f"{key} via {via}: {type(e).__name__}: {e}")
            n += 1
            time.sleep(0.01)

    def restart(i: int, raft_extra: str) -> None:
        leader = cluster.leader()
        if leader == i:  # hand leadership over first, as an operator would
            r = cluster.admin(i).get("/v1/ctrl/trigger_transfer_leader")
            assert r.status_code == 200, r.text
            wait_until(lambda: cluster.leader([j for j in (1, 2, 3) if j != i]), 20, "another leader")

            def all_follow_another() -> bool:
                leaders = [(cluster.admin(j).status().get("leader") or {}).get("name") for j in (1, 2, 3)]
                return None not in leaders and len(set(leaders)) == 1 and leaders[0] != str(i)

            # ...and every node forwards to the new one before the old one stops
            wait_until(all_follow_another, 20, "every node to follow the new leader")
        with lock:
            avoid[0] = i
            for c in clients.values():
                c.close()
            clients.clear()
        cluster.procs[i].stop()
        cluster.add(i, raft_extra=raft_extra)  # same ports, rewritten config
        cluster.wait_healthy(i)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for raft_extra in (secret_toml(old, (new,)), secret_toml(new, (old,)), secret_toml(new)):
            for i in (1, 2, 3):
                restart(i, raft_extra)
                count = len(written)
                wait_until(lambda count=count: len(written) > count + 5 or failures, 30, "writes going on")
                assert not failures, failures[:5]
    finally:
        stop.set()
        thread.join(30)
        for c in clients.values():
            c.close()
    assert not failures, failures[:5]
    assert len(written) > 50
    for i in (1, 2, 3):  # and no member ever refused another's proof on the way
        log = node_log(cluster, i)
        assert "proof of the raft secret" not in log, [line for line in log.splitlines() if "proof" in line][:3]
    with SyncMetaClient(addresses) as client:
        for key, value in written[-20:]:
            assert client.get(key).data == value
        assert len(client.list("w/")) == len(written)


def test_certificate_problems_stop_the_start_naming_the_key(cluster: LocalCluster, tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    good = pki.issue("meta1")
    expired = pki.issue("old", not_before=datetime.datetime(2020, 1, 1), not_after=datetime.datetime(2021, 1, 1))
    other = PKI(tmp_path / "other", "other").issue("x")
    wrong_key = pki.issue("meta2").key
    cases = [
        ("raft_config.raft_tls_server_cert: ", "expired on", pki.raft_toml(expired), ""),
        ("raft_config.raft_tls_server_cert: ", "is not accepted by peers trusting", pki.raft_toml(other), ""),
        ("raft_config.raft_tls_server_key: ", "is not the private key of",
         pki.raft_toml(Pair(good.cert, wrong_key)), ""),
        ("raft_config.raft_tls_server_root_ca_cert: ", "does not exist",
         pki.raft_toml(good).replace(str(pki.ca_cert), str(tmp_path / "nope.pem")), ""),
        ("grpc_tls_server_key: ", "missing", "", f'grpc_tls_server_cert = "{good.cert}"'),
        ("grpc_tls_server_cert: ", "expired on", "",
         f'grpc_tls_server_cert = "{expired.cert}"\ngrpc_tls_server_key = "{expired.key}"'),
        ("admin_tls_server_key: ", "is not the private key of", "",
         f'admin_tls_server_cert = "{good.cert}"\nadmin_tls_server_key = "{wrong_key}"'),
    ]
    for n, (key, reason, raft_extra, extra) in enumerate(cases, start=1):
        proc = cluster.add(n, single=True, extra=extra, raft_extra=raft_extra)
        assert proc.wait(30) == 2, proc.output()[-2000:]
        lines = [line for line in proc.output().splitlines() if line.startswith("metanode: error: ")]
        assert len(lines) == 1 and lines[0].startswith(f"metanode: error: {key}") and reason in lines[0], lines
        assert not (cluster.root / f"data{n}").exists(), "nothing written to the data dir"
