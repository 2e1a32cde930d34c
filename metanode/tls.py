"""TLS contexts and the raft port's security from the configuration
(docs/operations/security.md), each problem a `ConfigError` naming its key.

- `check_tls(config)`: every certificate problem of the three ports, before the data
  dir is touched (metanode/node/preflight.py): a file missing or unreadable, not a PEM
  certificate, a certificate expired or not yet valid, a key that is not a PEM private
  key or does not match its certificate, and on the raft port a certificate that the
  configured CA did not issue (checked by a TLS handshake with itself in memory, both
  ways, exactly as a peer would).
- `peer_security(config)`: the `PeerSecurity` of the raft port (mutual TLS verified
  against ``raft_tls_server_root_ca_cert``, by CA only: ``check_hostname`` is off,
  since peers dial each other by whatever address they advertise; the secrets).
- `client_api_context(config)`: the server context of the client API (``wss://``).
- `client_context(ca, cert, key)`: a client's context (the CLI's ``--tls-*``).
- `peer_client_api_context(config)`: how the dashboard reaches peers' client APIs.
"""

from __future__ import annotations

import ssl
import time

from metanode.config import Config
from metanode.errors import ConfigError
from metanode.transport.security import PeerSecurity

__all__ = ["check_readable", "check_tls", "client_api_context", "client_context", "peer_client_api_context", "peer_security"]

_RAFT = "raft_config."


def check_readable(name: str, path: str) -> None:
    """ConfigError naming `name` unless `path` is a readable file."""
    try:
        with open(path, "rb") as fp:
            fp.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{name}: {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: {path!r} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: {path!r} cannot be read: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    return getattr(exc, "verify_message", None) or exc.reason or str(exc)


def check_certificate(name: str, path: str, *, now: float | None = None) -> None:
    """`path` can be read, holds PEM certificates, and the first one is valid now."""
    check_readable(name, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{name}: {path!r} is not a certificate in PEM: {_reason(exc)}") from None
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - CPython has it; the handshakes still check
        return
    try:
        info = decode(path)
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
    except (ssl.SSLError, KeyError, ValueError):  # pragma: no cover - loaded above
        return
    now = time.time() if now is None else now
    if now >= not_after:
        raise ConfigError(f"{name}: {path!r} expired on {info['notAfter']}")
    if now < not_before:
        raise ConfigError(f"{name}: {path!r} is not valid before {info['notBefore']}")


def _load_pair(context: ssl.SSLContext, cert_name: str, key_name: str, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_name}: {key!r} is not the private key of {cert_name} {cert!r}") from None
        raise ConfigError(
            f"{key_name}: {key!r} is not a private key in PEM (for {cert_name} {cert!r}): {_reason(exc)}"
        ) from None
    except OSError as exc:  # pragma: no cover - read just before
        raise ConfigError(f"{key_name}: {key!r} cannot be read: {exc.strerror or exc}") from None


def server_context(cert_name: str, key_name: str, cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS context for the pair, every problem named by its key."""
    check_certificate(cert_name, cert)
    check_readable(key_name, key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_pair(context, cert_name, key_name, cert, key)
    return context


def _raft_contexts(config: Config) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    rc = config.raft_config
    cert, key, ca = rc.raft_tls_server_cert, rc.raft_tls_server_key, rc.raft_tls_server_root_ca_cert
    if cert is None or key is None or ca is None:
        return None  # the loader refuses a partial setting
    cert_name, key_name, ca_name = (
        _RAFT + "raft_tls_server_cert", _RAFT + "raft_tls_server_key", _RAFT + "raft_tls_server_root_ca_cert"
    )
    check_certificate(ca_name, ca)
    server = server_context(cert_name, key_name, cert, key)
    server.verify_mode = ssl.CERT_REQUIRED  # mutual: every dialer presents a certificate
    server.load_verify_locations(cafile=ca)
    # The dialer's side: the peer's certificate must come from our CA; no hostname
    # check (peers are dialed by their advertised address, often an IP).
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_REQUIRED
    _load_pair(client, cert_name, key_name, cert, key)
    try:
        _handshake_in_memory(server, client)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_name}: {cert!r} is not accepted by peers trusting {ca_name} {ca!r}: {_reason(exc)}"
        ) from None
    return server, client


def _handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """A TLS handshake between the two contexts over memory buffers (both verify)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False)
    done = {"s": False, "c": False}
    for _ in range(50):
        for side, obj, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            return
    raise ssl.SSLError("the TLS handshake did not finish")  # pragma: no cover


def peer_security(config: Config) -> PeerSecurity:
    """The raft port's `PeerSecurity` (see the module doc); raises ConfigError."""
    rc = config.raft_config
    contexts = _raft_contexts(config)
    server, client = contexts if contexts is not None else (None, None)
    return PeerSecurity(
        server_ssl=server,
        client_ssl=client,
        secret=rc.raft_secret.encode() if rc.raft_secret is not None else None,
        accepted=tuple(s.encode() for s in rc.raft_accepted_secrets),
        strict=rc.raft_secret_strict,
    )


def client_api_context(config: Config) -> ssl.SSLContext | None:
    """The client API's server context (``wss://``), None without its TLS keys."""
    cert, key = config.grpc_tls_server_cert, config.grpc_tls_server_key
    if cert is None or key is None:
        return None
    return server_context("grpc_tls_server_cert", "grpc_tls_server_key", cert, key)


def check_tls(config: Config) -> None:
    """Every certificate problem of the admin API, the client API and the raft port."""
    cert, key = config.admin_tls_server_cert, config.admin_tls_server_key
    if cert is not None and key is not None:
        server_context("admin_tls_server_cert", "admin_tls_server_key", cert, key)
    client_api_context(config)
    _raft_contexts(config)


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None,
                   *, names: tuple[str, str, str] = ("--tls-ca", "--tls-cert", "--tls-key")) -> ssl.SSLContext:
    """A client's context: the server's certificate verified against `ca` (else the
    system's CAs) and its host name checked; our certificate `cert`/`key` presented
    when the server asks. Problems raise ConfigError naming the flag in `names`."""
    ca_name, cert_name, key_name = names
    if (cert is None) != (key is None):
        present, missing = (cert_name, key_name) if cert is not None else (key_name, cert_name)
        raise ConfigError(f"{missing}: missing: {present} is given, and a client certificate needs its key")
    if ca is not None:
        check_certificate(ca_name, ca)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert is not None and key is not None:
        check_certificate(cert_name, cert)
        check_readable(key_name, key)
        _load_pair(context, cert_name, key_name, cert, key)
    return context


def peer_client_api_context(config: Config) -> ssl.SSLContext | None:
    """How a node talks to its peers' client APIs (the dashboard's status polls) when
    its own is on TLS: their certificates verified against the raft port's CA when
    one is set (by CA only, as on the raft port), else against the system's CAs with
    the host name checked. None when this node's client API has no TLS."""
    if config.grpc_tls_server_cert is None:
        return None
    ca = config.raft_config.raft_tls_server_root_ca_cert
    if ca is None:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.check_hostname = False
    return context
