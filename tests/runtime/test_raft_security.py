"""The raft port's peer security over real sockets on 127.0.0.1
(docs/operations/security.md): mutual TLS, the raft secret's challenge-response, its
rotation keys and strictness, replayed proofs. Certificates are made here (tests/pki.py).

Each refusal is checked where it matters: nothing reached the node (`on_message`,
`on_call`, `on_peer`), and the refusal is logged with the peer's address. Every test
is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from metanode.config import load_config
from metanode.errors import ClientError, TransportError, Unauthenticated
from metanode.tls import peer_security
from metanode.transport import CallPool, Hello, PeerLink, call, decode_frame, frame_bytes
from metanode.transport.frames import Auth, Call, CallResult, Challenge, ErrorFrame
from metanode.transport.security import PeerSecurity, current_security, proof, use_security
from metanode.wire import PROTOCOL_VERSION, FrameDecoder
from tests.pki import PKI
from tests.runtime.test_tcp_transport import (
    CLUSTER,
    PEER_ID,
    SERVER_ID,
    RawClient,
    Server,
    assert_no_message,
    hb,
    running_server,
)

pytestmark = pytest.mark.runtime

LIMIT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("other-pki"), "other")


def security(tls: list[str] | None = None, *, secret: str | None = None, accepted: tuple[str, ...] = (),
             strict: bool = False) -> PeerSecurity:  # fmt: skip
    """The `PeerSecurity` a node builds from these settings (metanode.tls, from a config)."""
    argv = ["--id", "1", *(tls or [])]
    if secret is not None:
        argv += ["--raft-secret", secret]
    if accepted:
        argv += ["--raft-accepted-secrets", *accepted]
    if strict:
        argv.append("--raft-secret-strict")
    return peer_security(load_config(argv, {}))


class Recorder:
    """What reached the node behind the port besides raft messages."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.peers: list[tuple[int, str]] = []

    async def on_call(self, method: str, payload: bytes, hello: Hello) -> bytes:
        self.calls.append(method)
        return method.encode() + b":" + payload

    def on_peer(self, node_id: int, address: str) -> None:
        self.peers.append((node_id, address))


@asynccontextmanager
async def guarded_server(sec: PeerSecurity) -> AsyncIterator[tuple[Server, Recorder]]:
    rec = Recorder()
    async with running_server(security=sec, on_call=rec.on_call, on_peer=rec.on_peer) as server:
        yield server, rec


def me(cluster_id: str | None = "c1") -> object:
    """The dialer's identity, with its advertised address (so on_peer would see it)."""
    from metanode.transport import Identity

    return Identity(PEER_ID, CLUSTER, cluster_id, "127.0.0.1:1")


def refusals(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ------------------------------------------------------------------------ mutual TLS


async def test_tls_peers_of_one_ca_talk_both_ways(pki: PKI) -> None:
    server_sec = security(pki.raft_flags(pki.issue("n1")))
    dialer_sec = security(pki.raft_flags(pki.issue("n2")))
    with trio.fail_after(LIMIT):
        async with guarded_server(server_sec) as (server, rec), trio.open_nursery() as nursery:
            assert await call(server.address, me(), "ping", b"x", timeout=LIMIT, security=dialer_sec) == b"ping:x"
            link = PeerLink(SERVER_ID, lambda: server.address, lambda: me(), security=dialer_sec)
            nursery.start_soon(link.run)
            await link.wait_connected()
            assert link.send_nowait(hb(1))
            assert await server.messages.receive() == hb(1)
            pool = CallPool(lambda: me(), security=dialer_sec)
            for i in range(3):
                assert await pool.call(server.address, "m", str(i).encode(), timeout=LIMIT) == f"m:{i}".encode()
            assert pool.connects == 1
            await pool.aclose()
            assert rec.peers and rec.peers[0] == (PEER_ID, "127.0.0.1:1")
            nursery.cancel_scope.cancel()


async def test_a_plaintext_peer_is_refused_by_a_tls_port(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "metanode.transport")
    with trio.fail_after(LIMIT):
        async with guarded_server(security(pki.raft_flags(pki.issue("n1")))) as (server, rec):
            with pytest.raises((TransportError, ClientError)):
                await call(server.address, me(), "ping", b"x", timeout=LIMIT, security=PeerSecurity())
            # A raw plaintext hello and heartbeat: nothing of it is read as a frame.
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(frame_bytes(Hello(PROTOCOL_VERSION, "c1", CLUSTER, PEER_ID, "127.0.0.1:1"))
                                      + frame_bytes(hb(1)))  # fmt: skip
                assert await RawClient(stream).receive_until_closed() == []
            await trio.sleep(0.05)
            assert_no_message(server)
            assert rec.calls == [] and rec.peers == []
    logged = refusals(caplog, "TLS handshake failed")
    assert logged and all("raft port: refused 127.0.0.1:" in line for line in logged)


async def test_a_certificate_from_another_ca_is_refused_both_ways(
    pki: PKI, other_pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = security(other_pki.raft_flags(other_pki.issue("x")))
    with trio.fail_after(LIMIT):
        async with guarded_server(security(pki.raft_flags(pki.issue("n1")))) as (server, rec):
            # The stranger's client refuses our certificate (not from its CA) at once...
            with pytest.raises(TransportError, match="TLS handshake failed"):
                await call(server.address, me(), "ping", b"x", timeout=LIMIT, security=stranger)
            # ...and a stranger that trusts our CA is refused by us for its own.
            half = PeerSecurity(server_ssl=stranger.server_ssl, client_ssl=_client_trusting(pki, other_pki))
            with pytest.raises((TransportError, ClientError)):
                await call(server.address, me(), "ping", b"x", timeout=LIMIT, security=half)
            await trio.sleep(0.05)
            assert_no_message(server)
            assert rec.calls == [] and rec.peers == []
    assert refusals(caplog, "TLS handshake failed"), "the refusal names the peer"


def _client_trusting(pki: PKI, own: PKI) -> object:
    """A dialer's context trusting `pki`'s CA but presenting a certificate of `own`."""
    import ssl

    pair = own.issue("y")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


async def test_a_tls_dialer_to_a_plaintext_port_fails_and_the_port_says_why(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(LIMIT):
        async with guarded_server(PeerSecurity()) as (server, rec):
            with pytest.raises(TransportError, match="TLS handshake failed"):
                await call(server.address, me(), "ping", b"x", timeout=LIMIT,
                           security=security(pki.raft_flags(pki.issue("n2"))))  # fmt: skip
            assert rec.calls == []
    assert refusals(caplog, "a TLS handshake: the peer has raft TLS set and this node does not")


# ----------------------------------------------------------------------- the secret


async def test_the_right_secret_is_accepted_and_never_sent(pki: PKI) -> None:
    sec = security(secret="s3cret-value", strict=True)
    sent = bytearray()
    with trio.fail_after(LIMIT):
        async with guarded_server(sec) as (server, rec):
            assert await call(server.address, me(), "ping", b"x", timeout=LIMIT, security=sec) == b"ping:x"
            assert rec.calls == ["ping"] and rec.peers == [(PEER_ID, "127.0.0.1:1")]
            # By hand, recording every byte the dialer sends: the secret is not in them.
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                raw = RawClient(stream)
                hello = Hello(PROTOCOL_VERSION, "c1", CLUSTER, PEER_ID, None, b"n" * 16)
                body = frame_bytes(hello)
                sent += body
                await stream.send_all(body)
                challenge = await raw.receive_frame()
                assert isinstance(challenge, Challenge) and challenge.node_id == SERVER_ID
                assert challenge.proof == proof(b"s3cret-value", "listener", body[4:], challenge.nonce, SERVER_ID)
                answer = frame_bytes(Auth(proof(b"s3cret-value", "dialer", body[4:], challenge.nonce, SERVER_ID)))
                answer += frame_bytes(Call(7, "echo", b"y"))
                sent += answer
                await stream.send_all(answer)
                result = await raw.receive_frame()
                assert isinstance(result, CallResult) and result.payload == b"echo:y"
    assert b"s3cret-value" not in bytes(sent)


async def test_a_wrong_or_missing_secret_is_refused_when_strict(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "metanode.transport")
    strict = security(secret="right", strict=True)
    with trio.fail_after(LIMIT):
        async with guarded_server(strict) as (server, rec), trio.open_nursery() as nursery:
            for dialer in (security(secret="wrong"), PeerSecurity(), security(accepted=("right",))):
                with pytest.raises(Unauthenticated, match="raft_secret_strict"):
                    await call(server.address, me(), "ping", b"x", timeout=LIMIT, security=dialer)
            # A PeerLink with the wrong secret: refused, its messages never reach the node.
            link = PeerLink(SERVER_ID, lambda: server.address, lambda: me(), security=security(secret="wrong"),
                            rng=random.Random(1))  # fmt: skip
            nursery.start_soon(link.run)
            await link.wait_connected()
            link.send_nowait(hb(1))
            while not any("wrong proof" in r.getMessage() and "link to 1" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
            assert_no_message(server)
            assert rec.calls == [] and rec.peers == [], "no call ran and no address was learned"
    logged = refusals(caplog, "raft port: refused 127.0.0.1:")
    assert any("wrong proof of the raft secret" in line for line in logged)
    assert any("gave no proof of the raft secret" in line for line in logged)


async def test_not_strict_accepts_an_unproven_peer_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "metanode.transport")
    with trio.fail_after(LIMIT):
        async with guarded_server(security(secret="right")) as (server, rec):
            for _ in range(3):
                assert await call(server.address, me(), "p", b"", timeout=LIMIT, security=security(secret="wrong")) == b"p:"
            assert await call(server.address, me(), "q", b"", timeout=LIMIT, security=PeerSecurity()) == b"q:"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "strict is off" in r.getMessage()]
    raft_port = [r for r in warnings if "raft port" in r.getMessage()]
    assert len(raft_port) == 1, [r.getMessage() for r in warnings]  # once per peer, the rest at debug
    assert "wrong proof" in raft_port[0].getMessage() and "127.0.0.1:" in raft_port[0].getMessage()


async def test_accepted_secrets_let_a_rotation_overlap() -> None:
    old, new = "old-secret", "new-secret"
    with trio.fail_after(LIMIT):
        # a node already on the new secret, still accepting the old one
        async with guarded_server(security(secret=new, accepted=(old,), strict=True)) as (server, _):
            # a node still on the old one that already accepts the new one
            dialer = security(secret=old, accepted=(new,), strict=True)
            assert await call(server.address, me(), "ping", b"", timeout=LIMIT, security=dialer) == b"ping:"
        async with guarded_server(security(secret=old, accepted=(new,), strict=True)) as (server, _):
            dialer = security(secret=new, accepted=(old,), strict=True)
            assert await call(server.address, me(), "ping", b"", timeout=LIMIT, security=dialer) == b"ping:"
            # Once the old secret is dropped by the dialer, the old listener's proof is refused.
            with pytest.raises(TransportError, match="wrong proof of the raft secret: refused"):
                await call(server.address, me(), "ping", b"", timeout=LIMIT, security=security(secret=new, strict=True))


async def test_a_strict_dialer_refuses_a_listener_that_cannot_prove_the_secret() -> None:
    with trio.fail_after(LIMIT):
        async with guarded_server(PeerSecurity()) as (server, rec):
            with pytest.raises(TransportError, match="gave no proof of the raft secret: refused"):
                await call(server.address, me(), "ping", b"", timeout=LIMIT, security=security(secret="s", strict=True))
            assert rec.calls == []
            # not strict: it talks anyway
            assert await call(server.address, me(), "ping", b"", timeout=LIMIT, security=security(secret="s")) == b"ping:"


async def test_a_recorded_exchange_cannot_be_replayed() -> None:
    """A dialer's proof covers the listener's fresh nonce: replayed on a new connection
    (same hello, new challenge) it is refused; and a listener's recorded challenge
    does not fool a dialer, whose own nonce is new each time."""
    secret = b"s"
    sec = security(secret="s", strict=True)
    with trio.fail_after(LIMIT):
        async with guarded_server(sec) as (server, rec):
            body = frame_bytes(Hello(PROTOCOL_VERSION, "c1", CLUSTER, PEER_ID, None, b"r" * 16))
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                raw = RawClient(stream)
                await stream.send_all(body)
                recorded = await raw.receive_frame()
                assert isinstance(recorded, Challenge)
                auth = frame_bytes(Auth(proof(secret, "dialer", body[4:], recorded.nonce, SERVER_ID)))
                await stream.send_all(auth + frame_bytes(Call(1, "first", b"")))
                assert isinstance(await raw.receive_frame(), CallResult)
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                raw = RawClient(stream)
                await stream.send_all(body)
                fresh = await raw.receive_frame()
                assert isinstance(fresh, Challenge) and fresh.nonce != recorded.nonce
                await stream.send_all(auth + frame_bytes(Call(2, "replayed", b"")))
                frames = await raw.receive_until_closed()
                assert frames and isinstance(frames[0], ErrorFrame) and frames[0].code == "unauthenticated"
            assert rec.calls == ["first"]

        # A fake listener replaying the recorded challenge (with the real listener's proof).
        async def replay_listener(stream: trio.SocketStream) -> None:
            decoder = FrameDecoder()
            while not decoder.feed(await stream.receive_some(65536)):
                pass
            await stream.send_all(frame_bytes(recorded))
            with trio.move_on_after(LIMIT):
                await stream.receive_some(65536)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, replay_listener, 0)
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(TransportError, match="wrong proof of the raft secret: refused"):
                await call(f"127.0.0.1:{port}", me(), "ping", b"", timeout=LIMIT, security=sec)
            nursery.cancel_scope.cancel()


async def test_nothing_but_the_proof_is_read_after_a_challenge() -> None:
    with trio.fail_after(LIMIT):
        async with guarded_server(security(secret="s", strict=True)) as (server, rec):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                raw = RawClient(stream)
                await stream.send_all(frame_bytes(Hello(PROTOCOL_VERSION, "c1", CLUSTER, PEER_ID, "127.0.0.1:1",
                                                        b"x" * 16)))  # fmt: skip
                assert isinstance(await raw.receive_frame(), Challenge)
                await stream.send_all(frame_bytes(hb(1)) + frame_bytes(Call(1, "sneak", b"")))
                frames = await raw.receive_until_closed()
                assert isinstance(frames[0], ErrorFrame) and "expected an auth frame" in frames[0].message
            assert_no_message(server)
            assert rec.calls == [] and rec.peers == []


async def test_a_peer_link_checks_it_reached_the_node_it_dials() -> None:
    sec = security(secret="s", strict=True)
    from metanode.transport.tcp import _open

    with trio.fail_after(LIMIT):
        async with guarded_server(sec) as (server, _):
            with pytest.raises(TransportError, match="is node 1, not node 5"):
                await _open(server.address, me(), sec, 1 << 20, peer_id=5)


async def test_the_security_of_a_context_is_what_dialers_use_by_default() -> None:
    sec = security(secret="s", strict=True)
    assert current_security() == PeerSecurity()
    with trio.fail_after(LIMIT):
        async with guarded_server(sec) as (server, _):
            with use_security(sec):
                assert current_security() is sec
                assert await call(server.address, me(), "ping", b"", timeout=LIMIT) == b"ping:"
            with pytest.raises(Unauthenticated):
                await call(server.address, me(), "ping", b"", timeout=LIMIT)
    assert current_security() == PeerSecurity()


def test_the_proof_binds_role_hello_nonce_and_listener() -> None:
    base = proof(b"k", "dialer", b"hello", b"n" * 16, 1)
    assert len(base) == 32
    assert base != proof(b"k", "listener", b"hello", b"n" * 16, 1)
    assert base != proof(b"k", "dialer", b"hellO", b"n" * 16, 1)
    assert base != proof(b"k", "dialer", b"hello", b"m" * 16, 1)
    assert base != proof(b"k", "dialer", b"hello", b"n" * 16, 2)
    assert base != proof(b"K", "dialer", b"hello", b"n" * 16, 1)
    # length prefixes: moving a byte between parts changes the proof
    assert proof(b"k", "dialer", b"ab", b"c", 1) != proof(b"k", "dialer", b"a", b"bc", 1)


def test_the_hello_with_a_nonce_and_the_new_frames_round_trip() -> None:
    for frame in (Hello(PROTOCOL_VERSION, None, CLUSTER, 0, None, b"\x00" * 16), Challenge(b"n", 3, b"p"),
                  Challenge(b"n", 3), Auth(b"p"), Auth()):  # fmt: skip
        assert decode_frame(frame_bytes(frame)[4:]) == frame


def test_a_key_file_problem_names_the_key(tmp_path: Path, pki: PKI) -> None:
    from metanode.errors import ConfigError

    pair = pki.issue("n1")
    with pytest.raises(ConfigError, match="^raft_config.raft_tls_server_key: .* is not the private key of"):
        security(["--raft-tls-server-cert", str(pair.cert), "--raft-tls-server-key", str(pki.issue("n2").key),
                  "--raft-tls-server-root-ca-cert", str(pki.ca_cert)])  # fmt: skip


def test_the_banner_names_each_ports_security(pki: PKI) -> None:
    from metanode.node.run import banner

    pair = pki.issue("n1")
    config = load_config(["--id", "1", *pki.raft_flags(pair), "--raft-secret", "s", "--raft-secret-strict",
                          "--grpc-tls-server-cert", str(pair.cert), "--grpc-tls-server-key", str(pair.key),
                          "--admin-tls-server-cert", str(pair.cert), "--admin-tls-server-key", str(pair.key)],
                         {})  # fmt: skip
    lines = banner(config).splitlines()
    assert any(line.startswith("    raft:") and line.endswith(", mutual TLS, raft secret (strict)") for line in lines)
    assert any(line.startswith("    client API:  wss://") for line in lines)
    assert any(line.startswith("    admin API:   https://") for line in lines)
    plain = banner(load_config(["--id", "1"], {})).splitlines()
    assert not any("TLS" in line or "secret" in line for line in plain)


def test_the_dashboard_reaches_tls_peers_by_the_raft_ca_or_the_system_cas(pki: PKI) -> None:
    import ssl

    from metanode.tls import peer_client_api_context

    pair = pki.issue("n1")
    grpc = ["--grpc-tls-server-cert", str(pair.cert), "--grpc-tls-server-key", str(pair.key)]
    assert peer_client_api_context(load_config(["--id", "1"], {})) is None
    by_ca = peer_client_api_context(load_config(["--id", "1", *grpc, *pki.raft_flags(pair)], {}))
    assert by_ca is not None and not by_ca.check_hostname and by_ca.verify_mode == ssl.CERT_REQUIRED
    system = peer_client_api_context(load_config(["--id", "1", *grpc], {}))
    assert system is not None and system.check_hostname


def test_the_leave_client_refuses_a_bad_certificate_with_exit_2(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metanode.node.leave import leave_cluster

    pair = pki.issue("n1")
    config = load_config(["--raft-tls-server-cert", str(pair.cert), "--raft-tls-server-key", str(pair.key),
                          "--raft-tls-server-root-ca-cert", str(tmp_path / "missing.pem")], {},
                         require_id=False)  # fmt: skip
    assert leave_cluster(2, ["127.0.0.1:1"], config) == 2
    err = capsys.readouterr().err
    assert err.startswith("metanode: error: raft_config.raft_tls_server_root_ca_cert: ") and "does not exist" in err
