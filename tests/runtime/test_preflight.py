"""The checks `metanode -c FILE` makes before it touches the data dir
(metanode/node/preflight.py, docs/reference/config.md#checks-exit-code-2), and the banner
(metanode/node/run.py). They bind real sockets and read real files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from metanode.config import Config, load_config
from metanode.errors import ConfigError
from metanode.node.preflight import check_before_start, check_join_list, check_ports, check_tls_files
from metanode.node.run import banner
from tests.net import free_port

pytestmark = pytest.mark.runtime


def cfg(tmp_path: Path, *argv: str) -> Config:
    return load_config(
        ["--id", "1", "--raft-dir", str(tmp_path / "d"), "--log-dir", str(tmp_path / "l"),
         "--raft-api-port", str(free_port()), "--raft-advertise-host", "127.0.0.1",
         "--admin-api-address", f"127.0.0.1:{free_port()}", "--grpc-api-address", f"127.0.0.1:{free_port()}",
         *argv],
        {},
    )  # fmt: skip


def error(fn: object, config: Config) -> str:
    with pytest.raises(ConfigError) as info:
        fn(config)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_a_good_config_passes_and_writes_nothing(tmp_path: Path) -> None:
    check_before_start(cfg(tmp_path, "--single"))
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("flag", "key"),
    [("--raft-api-port", "raft_config.raft_api_port"), ("--admin-api-address", "admin_api_address"),
     ("--grpc-api-address", "grpc_api_address")],
)
def test_a_port_in_use_names_its_key(tmp_path: Path, listening: socket.socket, flag: str, key: str) -> None:
    port = listening.getsockname()[1]
    value = str(port) if flag == "--raft-api-port" else f"127.0.0.1:{port}"
    message = error(check_ports, cfg(tmp_path, flag, value))
    assert message.startswith(f"{key}: cannot listen on 127.0.0.1:{port}: the port is in use")


def test_the_same_port_for_two_keys_and_port_0(tmp_path: Path) -> None:
    port = free_port()
    message = error(check_ports, cfg(tmp_path, "--admin-api-address", f"127.0.0.1:{port}",
                                     "--grpc-api-address", f"127.0.0.1:{port}"))  # fmt: skip
    assert message.startswith(f"grpc_api_address: 127.0.0.1:{port} is also admin_api_address")
    check_ports(cfg(tmp_path, "--admin-api-address", "127.0.0.1:0", "--grpc-api-address", "127.0.0.1:0"))


def test_an_unresolvable_host_names_its_key(tmp_path: Path) -> None:
    message = error(check_ports, cfg(tmp_path, "--grpc-api-address", "no-such-host.invalid:9191"))
    assert message.startswith("grpc_api_address: cannot listen on no-such-host.invalid:9191: cannot resolve")


def test_tls_files_must_exist_and_be_files(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    missing = error(check_tls_files, cfg(tmp_path, "--admin-tls-server-cert", str(tmp_path / "nope.pem"),
                                         "--admin-tls-server-key", str(key)))  # fmt: skip
    assert missing == f"admin_tls_server_cert: {str(tmp_path / 'nope.pem')!r} does not exist"
    directory = error(check_tls_files, cfg(tmp_path, "--admin-tls-server-cert", str(key),
                                           "--admin-tls-server-key", str(tmp_path)))  # fmt: skip
    assert directory.startswith("admin_tls_server_key: ") and "is a directory" in directory
    ca = ("--raft-tls-server-root-ca-cert", str(key))
    for flag, name, more in (("--grpc-tls-server", "grpc_tls_server", ()),
                             ("--raft-tls-server", "raft_config.raft_tls_server", ca)):  # fmt: skip
        other = error(check_tls_files, cfg(tmp_path, f"{flag}-cert", str(key), f"{flag}-key", str(tmp_path / "k"), *more))
        assert other == f"{name}_key: {str(tmp_path / 'k')!r} does not exist"
    no_ca = error(check_tls_files, cfg(tmp_path, "--raft-tls-server-cert", str(key), "--raft-tls-server-key", str(key),
                                       "--raft-tls-server-root-ca-cert", str(tmp_path / "ca")))  # fmt: skip
    assert no_ca == f"raft_config.raft_tls_server_root_ca_cert: {str(tmp_path / 'ca')!r} does not exist"
    garbage = error(check_tls_files, cfg(tmp_path, "--admin-tls-server-cert", str(key),
                                         "--admin-tls-server-key", str(key)))  # fmt: skip
    assert garbage.startswith("admin_tls_server_cert: ") and "is not a certificate in PEM" in garbage


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: an unreadable file cannot be made")
def test_an_unreadable_tls_key_names_its_key(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    key.chmod(0)
    message = error(check_tls_files, cfg(tmp_path, "--admin-tls-server-cert", str(cert),
                                         "--admin-tls-server-key", str(key)))  # fmt: skip
    assert message.startswith("admin_tls_server_key: ") and "cannot be read" in message


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_real_certificate_and_key_pass(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    check_tls_files(cfg(tmp_path, "--admin-tls-server-cert", str(cert), "--admin-tls-server-key", str(key)))
    swapped = error(check_tls_files, cfg(tmp_path, "--admin-tls-server-cert", str(key),
                                         "--admin-tls-server-key", str(cert)))  # fmt: skip
    assert swapped.startswith("admin_tls_server_cert: ")


def test_a_join_list_of_only_this_node_on_an_empty_dir(tmp_path: Path) -> None:
    config = cfg(tmp_path)
    port = config.raft_config.raft_api_port
    only_me = cfg(tmp_path, "--raft-api-port", str(port), "--join", f"127.0.0.1:{port}", f"localhost:{port}")
    assert only_me.raft_config.join == () and len(only_me.raft_config.join_skipped) == 2
    message = error(check_join_list, only_me)
    assert message.startswith("raft_config.join: lists only this node's own raft address")
    assert "set single = true" in message
    # With single, or once the data dir holds a cluster, there is nothing to say.
    check_join_list(cfg(tmp_path, "--raft-api-port", str(port), "--join", f"127.0.0.1:{port}", "--single"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta").write_bytes(b"")
    check_join_list(only_me)


def test_the_banner_names_what_an_operator_needs(tmp_path: Path) -> None:
    port = free_port()
    config = cfg(tmp_path, "--raft-api-port", str(port), "--join", "meta2:28004", f"127.0.0.1:{port}",
                 "--log-stderr-on", "--grpc-api-advertise-host", "meta1.example")  # fmt: skip
    text = banner(config)
    lines = text.splitlines()
    assert lines[0].startswith("metanode ")
    assert f"    raft:        listen 127.0.0.1:{port}, advertise 127.0.0.1:{port}" in lines
    assert any(line.startswith("    client API:  ws://127.0.0.1:") and "advertise meta1.example:" in line for line in lines)
    assert any(line.startswith("    admin API:   http://127.0.0.1:") for line in lines)
    assert f"    data dir:    {tmp_path / 'd'}" in lines
    assert "    start:       join via meta2:28004" in lines
    assert f"    log:         file {tmp_path / 'l' / 'metanode-1.log'} (INFO, json); stderr (INFO, text)" in lines
    assert f"    join skips:  127.0.0.1:{port} (this node's own raft address)" in lines
    assert "start:       single" in banner(cfg(tmp_path, "--single"))
