"""Checks `metanode -c FILE` makes before it opens (and possibly creates) the data dir.

They depend on the machine rather than on the configuration alone, so they are not the
loader's (metanode/config.py); each failure is a `ConfigError` naming the key (exit 2,
docs/reference/config.md#checks-exit-code-2), raised before anything is written:

- the TLS certificate and key files that are set exist and can be read (admin, client
  and raft port), and load into TLS contexts (`metanode.tls.check_tls`): PEM
  certificates valid today, each key the private key of its certificate, and the raft
  port's certificate issued by ``raft_tls_server_root_ca_cert``;
- the three ports (`raft_config.raft_api_port` on `raft_listen_host`,
  `admin_api_address`, `grpc_api_address`) can be bound: a port held by another
  process, or given to two of the keys, is named here; port 0 (the OS picks) is not
  probed;
- a `join` list that only named this node's own raft address (skipped by the loader)
  on a data dir that holds no cluster yet.
"""

from __future__ import annotations

import errno
import os
import socket
from contextlib import ExitStack

from metanode.config import Config, format_address, parse_address
from metanode.errors import ConfigError
from metanode.tls import check_readable, check_tls


def check_before_start(config: Config) -> None:
    """Raise ConfigError for the first problem found (see the module doc)."""
    check_tls_files(config)
    check_join_list(config)
    check_ports(config)


def check_tls_files(config: Config) -> None:
    cert, key = config.admin_tls_server_cert, config.admin_tls_server_key
    rc = config.raft_config
    for name, path in (
        ("admin_tls_server_cert", cert),
        ("admin_tls_server_key", key),
        ("grpc_tls_server_cert", config.grpc_tls_server_cert),
        ("grpc_tls_server_key", config.grpc_tls_server_key),
        ("raft_config.raft_tls_server_cert", rc.raft_tls_server_cert),
        ("raft_config.raft_tls_server_key", rc.raft_tls_server_key),
        ("raft_config.raft_tls_server_root_ca_cert", rc.raft_tls_server_root_ca_cert),
    ):
        if path is not None:
            check_readable(name, path)
    check_tls(config)


def check_join_list(config: Config) -> None:
    """An empty data dir with only this node in `join` has nothing to join (the same
    as no join list), unless `single` starts a new cluster."""
    rc = config.raft_config
    if rc.single or rc.join or not rc.join_skipped:
        return
    if os.path.exists(os.path.join(rc.raft_dir, "meta")):
        return  # initialized: needs neither single nor join
    raise ConfigError(
        f"raft_config.join: lists only this node's own raft address ({', '.join(rc.join_skipped)}),"
        f" which is skipped, and {rc.raft_dir} holds no cluster yet: add the address of another"
        " member to join through, or set single = true to start a new cluster"
    )


def check_ports(config: Config) -> None:
    """Bind every configured port (and release it) to find one in use before start."""
    rc = config.raft_config
    wanted = [
        ("raft_config.raft_api_port", rc.raft_listen_host, rc.raft_api_port),
        ("admin_api_address", *parse_address(config.admin_api_address)),
        ("grpc_api_address", *parse_address(config.grpc_api_address)),
    ]
    held: dict[tuple[str, int], str] = {}
    with ExitStack() as stack:
        for name, host, port in wanted:
            if port == 0:
                continue
            address = format_address(host, port)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            except OSError as exc:
                raise ConfigError(f"{name}: cannot listen on {address}: cannot resolve {host!r}: {exc}") from None
            infos.sort(key=lambda info: info[0] != socket.AF_INET)  # as the servers bind
            family, type_, proto, _, sockaddr = infos[0]
            where = (sockaddr[0], port)
            if where in held:
                raise ConfigError(f"{name}: {address} is also {held[where]}: every port needs its own number")
            sock = stack.enter_context(socket.socket(family, type_, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                why = (
                    "the port is in use (another process holds it)"
                    if exc.errno == errno.EADDRINUSE
                    else exc.strerror or str(exc)
                )
                raise ConfigError(f"{name}: cannot listen on {address}: {why}") from None
            held[where] = name


__all__ = ["check_before_start", "check_join_list", "check_ports", "check_tls_files"]
