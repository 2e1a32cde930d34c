"""Configuration: frozen attrs classes and the loader (contract §1-§2).

The configuration is a TOML file (``-c/--config-file FILE`` or ``METASRV_CONFIG_FILE``)
with the key names of databend-meta, overridden by command-line flags: every key has a
``--kebab-case`` flag named after its last component (``raft_config.raft_api_port`` is
``--raft-api-port``, ``log.file.level`` is ``--log-file-level``). List flags accept
several values after one flag and accumulate over repeated flags (``--join a b --join
c``); a list given on the command line replaces the file's list. Boolean flags may be
given bare (``--single``, meaning true) or with a value (``--single=false``).

:func:`load_config` returns a :class:`Config` or raises :class:`ConfigError` whose
message is one line naming the key (dotted, ``raft_config.id``) or the flag
(``--raft-api-port``) and what is wrong with it. Unknown keys in the file are not an
error: they are reported in ONE warning line naming them all.

What the loader checks (everything that can be decided from the configuration alone):

- the file exists, can be read, is UTF-8 and valid TOML (tomllib's line and column);
- every value has the right type (a TOML string where an integer is expected is an
  error; TOML integers are never read from strings); sections are tables;
- ports are in range (``raft_api_port`` and join addresses 1..65535; the listen
  addresses ``admin_api_address``/``grpc_api_address`` 0..65535, 0 letting the OS pick);
  addresses are ``host:port`` (``[v6]:port`` for IPv6); hosts are not empty and carry no
  port; ``raft_advertise_host`` is not a wildcard address;
- ``id`` is an integer in 0..2**63-1 (0 is valid, as in databend-meta's shipped config) and, when running a node
  (``require_id=True``), present;
- durations (``heartbeat_interval``, ``install_snapshot_timeout``,
  ``wait_leader_timeout``) and sizes are positive; ``max_applied_log_to_keep`` >= 0;
- log levels are TRACE, DEBUG, INFO, WARN, WARNING, ERROR or CRITICAL (any case); log
  formats are ``json`` or ``text``;
- ``join`` is a list of ``host:port`` strings; entries naming this node's own raft
  address (``raft_advertise_host:raft_api_port``, also the listen host, and the loopback
  names ``localhost``/``127.0.0.1``/``::1`` when the node listens or advertises on one of
  them or on a wildcard address, with the same port) are skipped, as databend-meta does,
  so one "all members" list serves every node (``RaftConfigSection.join_skipped``);
- ``single`` and ``join`` (what is left of it) are not both set; ``learner`` and
  ``single`` are not both set;
- ``--log-level`` and ``--log-dir`` on the command line override the levels of
  ``[log.file]`` and ``[log.stderr]`` and the dir of ``[log.file]`` (as databend-meta:
  a CI run's ``--log-level=DEBUG`` wins over the file's ``level = "INFO"``), unless
  those are given as flags too (``--log-file-level`` and the like);
- TLS certificates and keys come in pairs.

Left to the node layer, because they depend on the data dir (contract §2): "an empty data
dir needs ``single = true`` or a ``join`` list; an initialized one needs neither", and
"the stored node id wins on restart, a differing config ``id`` is an error". Ports in
use and unreadable or uncreatable directories are found when they are opened.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from metanode.errors import ConfigError

__all__ = [
    "CONFIG_FILE_ENV",
    "Config",
    "ConfigError",
    "FileLogConfig",
    "KEYS",
    "LogConfig",
    "RaftConfigSection",
    "StderrLogConfig",
    "add_config_arguments",
    "config_from_args",
    "format_address",
    "load_config",
    "parse_address",
]

CONFIG_FILE_ENV: Final = "METASRV_CONFIG_FILE"
REDACTED: Final = "***"
LOG_LEVELS: Final = ("TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS: Final = ("json", "text")
MAX_ID: Final = 2**63 - 1
MiB: Final = 1024 * 1024

_logger = logging.getLogger("metanode.node")


# --------------------------------------------------------------------------- classes


@attrs.frozen(kw_only=True)
class FileLogConfig:
    """``[log.file]``: the rotating log file. ``None`` inherits the top-level value."""

    on: bool = True
    level: str | None = None  # None: log_level
    dir: str | None = None  # None: log_dir
    format: str = "json"


@attrs.frozen(kw_only=True)
class StderrLogConfig:
    """``[log.stderr]``: log lines on standard error."""

    on: bool = False
    level: str | None = None  # None: log_level
    format: str = "text"


@attrs.frozen(kw_only=True)
class LogConfig:
    """``[log]``: the ``file`` and ``stderr`` outputs."""

    file: FileLogConfig = attrs.Factory(FileLogConfig)
    stderr: StderrLogConfig = attrs.Factory(StderrLogConfig)


def _to_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class RaftConfigSection:
    """``[raft_config]``: this node's identity, raft port, bootstrap and tuning.

    Times are milliseconds. ``id`` is ``None`` only when no id was configured (allowed
    for ``--cmd show-config`` and leave mode, never when running a node).
    """

    id: int | None = None
    raft_dir: str = "./.metanode/meta"
    raft_api_port: int = 28004
    raft_listen_host: str = "127.0.0.1"
    raft_advertise_host: str = attrs.Factory(socket.gethostname)
    single: bool = False
    join: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    learner: bool = False
    cluster_name: str = "metanode"
    heartbeat_interval: int = 500
    install_snapshot_timeout: int = 4000
    snapshot_logs_since_last: int = 1024
    max_applied_log_to_keep: int = 1000
    snapshot_chunk_size: int = 4 * MiB
    wal_segment_size: int = 64 * MiB
    wait_leader_timeout: int = 70000
    raft_tls_server_cert: str | None = None
    raft_tls_server_key: str | None = None
    raft_tls_server_root_ca_cert: str | None = None
    raft_secret: str | None = None
    raft_accepted_secrets: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    raft_secret_strict: bool = False
    # The `join` entries that named this node's own raft address, skipped by the
    # loader (not a configuration key: `join` already holds the rest).
    join_skipped: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)

    @property
    def raft_advertise_address(self) -> str:
        """``raft_advertise_host:raft_api_port``: how peers and ``join`` lists reach us."""
        return format_address(self.raft_advertise_host, self.raft_api_port)

    @property
    def raft_listen_address(self) -> str:
        """``raft_listen_host:raft_api_port``: where the raft server binds."""
        return format_address(self.raft_listen_host, self.raft_api_port)


@attrs.frozen(kw_only=True)
class Config:
    """The whole effective configuration of one ``metanode`` process."""

    log_level: str = "INFO"
    log_dir: str = "./.metanode/logs"
    admin_api_address: str = "127.0.0.1:28002"
    admin_api_token: str | None = None
    grpc_api_token: str | None = None
    grpc_api_address: str = "127.0.0.1:9191"
    grpc_api_advertise_host: str | None = None
    admin_tls_server_cert: str | None = None
    admin_tls_server_key: str | None = None
    grpc_tls_server_cert: str | None = None
    grpc_tls_server_key: str | None = None
    grpc_api_max_message_size: int = 32 * MiB
    log: LogConfig = attrs.Factory(LogConfig)
    raft_config: RaftConfigSection = attrs.Factory(RaftConfigSection)

    @property
    def raft_advertise_address(self) -> str:
        """``raft_advertise_host:raft_api_port`` (see :class:`RaftConfigSection`)."""
        return self.raft_config.raft_advertise_address

    @property
    def grpc_api_advertise_address(self) -> str | None:
        """The client address published in the node record, as databend-meta.

        ``grpc_api_advertise_host`` with the port of ``grpc_api_address``; ``None`` when
        no advertise host is configured.
        """
        if self.grpc_api_advertise_host is None:
            return None
        _, port = parse_address(self.grpc_api_address)
        return format_address(self.grpc_api_advertise_host, port)

    @property
    def log_file_level(self) -> str:
        """``log.file.level``, or ``log_level`` when unset."""
        return self.log.file.level or self.log_level

    @property
    def log_file_dir(self) -> str:
        """``log.file.dir``, or ``log_dir`` when unset."""
        return self.log.file.dir or self.log_dir

    @property
    def log_stderr_level(self) -> str:
        """``log.stderr.level``, or ``log_level`` when unset."""
        return self.log.stderr.level or self.log_level

    def redacted(self) -> dict[str, Any]:
        """The effective config as a JSON-able dict keyed like the TOML file.

        Secrets (``admin_api_token``, ``raft_secret``, the TLS private keys) read
        ``"***"`` when set and ``null`` when not; unset optional values are ``null``;
        the log levels and dir that inherit from the top level show the inherited value.
        Used by ``--cmd show-config`` and ``GET /v1/config``.
        """
        out: dict[str, Any] = {}
        for key in KEYS:
            value = key.get(self)
            if key.secret and value is not None and value != ():
                value = REDACTED
            elif isinstance(value, tuple):
                value = list(value)
            node = out
            for part in key.path[:-1]:
                node = node.setdefault(part, {})
            node[key.path[-1]] = value
        out["log"]["file"]["level"] = self.log_file_level
        out["log"]["file"]["dir"] = self.log_file_dir
        out["log"]["stderr"]["level"] = self.log_stderr_level
        return out


# ----------------------------------------------------------------------- addresses


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into host and port; ValueError if not."""
    if not isinstance(text, str):
        raise ValueError(f"expected a 'host:port' string, got {_describe(text)}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected 'host:port', got {text!r} (no port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        _check_ipv6(host, text)
    elif ":" in host:
        raise ValueError(f"expected 'host:port', got {text!r} (write IPv6 as [addr]:port)")
    _check_host(host)
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"expected 'host:port', got {text!r} (the port is not a number)")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} in {text!r} is out of range (0..65535)")
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, bracketing an IPv6 host: ``[::1]:28004``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is empty")
    if any(ch.isspace() for ch in host) or "/" in host:
        raise ValueError(f"{host!r} is not a host name or address")


# ---------------------------------------------------------------------- key table


def _describe(value: object) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return kind
    if isinstance(value, bool):
        return f"{kind} ({str(value).lower()})"
    return f"{kind} {value!r}"


def _int(value: object, *, low: int, high: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer{what}, got {_describe(value)}")
    if value < low or (high is not None and value > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"must be {rng}{what}, got {value}")
    return value


def _v_id(value: object) -> int:
    return _int(value, low=0, high=MAX_ID, what=" (a node id: 0 or more, as databend-meta's own config has id = 0)")


def _v_port(value: object) -> int:
    return _int(value, low=1, high=65535)


def _v_positive(value: object) -> int:
    return _int(value, low=1)


def _v_nonnegative(value: object) -> int:
    return _int(value, low=0)


def _v_segment_size(value: object) -> int:
    return _int(value, low=64 * 1024, what=" bytes (64 KiB at least)")


def _v_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _v_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    if not value:
        raise ValueError("must not be empty")
    return value


def _v_optional_str(value: object) -> str | None:
    """A string where "" means unset (databend-meta writes empty TLS paths)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value or None


def _v_host(value: object) -> str:
    host = _v_str(value)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected a host without a port, got {value!r}") from None
    _check_host(host)
    return host


def _v_advertise_host(value: object) -> str:
    host = _v_host(value)
    if host in ("0.0.0.0", "::"):
        raise ValueError(
            f"{host} is a wildcard listen address; peers cannot connect to it: "
            "advertise a name or address they can reach"
        )
    return host


def _v_optional_host(value: object) -> str | None:
    if value == "":
        return None
    return _v_host(value)


def _v_listen_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a 'host:port' string, got {_describe(value)}")
    parse_address(value)
    return value


def _v_join(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f'expected a list of "host:port" strings, got {_describe(value)}')
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f'expected a list of "host:port" strings, got {_describe(item)}')
        _, port = parse_address(item)
        if port == 0:
            raise ValueError(f"{item!r}: port 0 cannot be joined (1..65535)")
    return tuple(value)


def _v_secrets(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_describe(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a list of strings, got {_describe(item)}")
        if not item:
            raise ValueError("an accepted secret must not be empty")
    return tuple(value)


def _v_level(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a log level string, got {_describe(value)}")
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {value!r} (one of {', '.join(LOG_LEVELS)})")
    return value.upper()


def _v_optional_level(value: object) -> str | None:
    if value == "":
        return None
    return _v_level(value)


def _v_format(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected json or text, got {_describe(value)}")
    if value.lower() not in LOG_FORMATS:
        raise ValueError(f"unknown log format {value!r} (json or text)")
    return value.lower()


# How a flag's text becomes the TOML-typed raw value that the validator then checks.
def _flag_int(text: str) -> object:
    stripped = text.strip()
    body = stripped[1:] if stripped.startswith(("-", "+")) else stripped
    if not (body.isascii() and body.isdigit()):
        raise ValueError(f"expected an integer, got {text!r}")
    return int(stripped)


def _flag_bool(text: str) -> object:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@attrs.frozen
class Key:
    """One configuration key: where it lives, its flag, how it is checked and documented."""

    path: tuple[str, ...]
    validate: Callable[[object], Any]
    default: str  # as shown by --help and the docs
    help: str
    flag_kind: str = "str"  # str | int | bool | list
    secret: bool = False
    metavar: str | None = None  # of the flag; default from the kind and the key's name

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def attr(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        parts = self.path if self.path[0] == "log" else self.path[-1:]
        return "--" + "-".join(parts).replace("_", "-")

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)

    def get(self, config: Config) -> Any:
        obj: Any = config
        for part in self.path:
            obj = getattr(obj, part)
        return obj


def _k(path: str, validate: Callable[[object], Any], default: str, help: str, **kw: Any) -> Key:
    return Key(tuple(path.split(".")), validate, default, help, **kw)


KEYS: Final[tuple[Key, ...]] = (
    _k("log_level", _v_level, "INFO", "default log level of [log.file] and [log.stderr]"),
    _k(
        "log_dir",
        _v_str,
        "./.metanode/logs",
        "directory of the log files (default of log.file.dir)",
    ),
    _k(
        "admin_api_address",
        _v_listen_address,
        "127.0.0.1:28002",
        "host:port of the admin HTTP API",
    ),
    _k(
        "admin_api_token",
        _v_optional_str,
        "unset",
        "bearer token required by mutating admin routes when set",
        secret=True,
    ),
    _k(
        "grpc_api_address",
        _v_listen_address,
        "127.0.0.1:9191",
        "host:port of the client API (WebSocket+msgpack; the name is databend-meta's)",
    ),
    _k(
        "grpc_api_token",
        _v_optional_str,
        "unset",
        "token clients must present in their first request (handshake) when set",
        secret=True,
    ),
    _k(
        "grpc_api_advertise_host",
        _v_optional_host,
        "unset",
        "host clients should use; published with grpc_api_address's port",
    ),
    _k("admin_tls_server_cert", _v_optional_str, "unset", "TLS certificate file of the admin API"),
    _k(
        "admin_tls_server_key",
        _v_optional_str,
        "unset",
        "TLS private key file of the admin API",
        secret=True,
    ),
    _k("grpc_tls_server_cert", _v_optional_str, "unset", "TLS certificate file of the client API"),
    _k(
        "grpc_tls_server_key",
        _v_optional_str,
        "unset",
        "TLS private key file of the client API",
        secret=True,
    ),
    _k(
        "grpc_api_max_message_size",
        _v_positive,
        str(32 * MiB),
        "largest client message in bytes (32 MiB)",
        flag_kind="int",
    ),
    _k("log.file.on", _v_bool, "true", "write the log file", flag_kind="bool"),
    _k("log.file.level", _v_optional_level, "log_level", "level of the log file"),
    _k("log.file.dir", _v_optional_str, "log_dir", "directory of the log file"),
    _k("log.file.format", _v_format, "json", "format of the log file: json or text"),
    _k("log.stderr.on", _v_bool, "false", "write log lines to stderr", flag_kind="bool"),
    _k("log.stderr.level", _v_optional_level, "log_level", "level of the stderr log"),
    _k("log.stderr.format", _v_format, "text", "format of the stderr log: json or text"),
    _k(
        "raft_config.id",
        _v_id,
        "none, required",
        "this node's id, an integer >= 0",
        flag_kind="int",
    ),
    _k("raft_config.raft_dir", _v_str, "./.metanode/meta", "data directory (log, snapshots)"),
    _k(
        "raft_config.raft_api_port",
        _v_port,
        "28004",
        "port of the raft protocol",
        flag_kind="int",
    ),
    _k("raft_config.raft_listen_host", _v_host, "127.0.0.1", "host the raft port binds to"),
    _k(
        "raft_config.raft_advertise_host",
        _v_advertise_host,
        "the machine's hostname",
        "host peers use to reach the raft port",
    ),
    _k(
        "raft_config.single",
        _v_bool,
        "false",
        "bootstrap a one-voter cluster on an empty data dir",
        flag_kind="bool",
    ),
    _k(
        "raft_config.join",
        _v_join,
        "[]",
        "raft addresses (host:port) of cluster members to join through",
        flag_kind="list",
    ),
    _k("raft_config.learner", _v_bool, "false", "join as a non-voting learner", flag_kind="bool"),
    _k("raft_config.cluster_name", _v_str, "metanode", "name every member must share"),
    _k(
        "raft_config.heartbeat_interval",
        _v_positive,
        "500",
        "ms between heartbeats; election timeout is random in [2x, 3x)",
        flag_kind="int",
    ),
    _k(
        "raft_config.install_snapshot_timeout",
        _v_positive,
        "4000",
        "ms allowed for one snapshot chunk",
        flag_kind="int",
    ),
    _k(
        "raft_config.snapshot_logs_since_last",
        _v_positive,
        "1024",
        "applied entries since the last snapshot that trigger a new one",
        flag_kind="int",
    ),
    _k(
        "raft_config.max_applied_log_to_keep",
        _v_nonnegative,
        "1000",
        "applied entries kept in the log behind a snapshot",
        flag_kind="int",
    ),
    _k(
        "raft_config.snapshot_chunk_size",
        _v_positive,
        str(4 * MiB),
        "bytes per snapshot chunk sent to a follower (4 MiB)",
        flag_kind="int",
    ),
    _k(
        "raft_config.wal_segment_size",
        _v_segment_size,
        str(64 * MiB),
        "bytes after which the WAL starts a new segment file (64 MiB; 64 KiB at least)",
        flag_kind="int",
    ),
    _k(
        "raft_config.wait_leader_timeout",
        _v_positive,
        "70000",
        "ms to wait for a leader at startup",
        flag_kind="int",
    ),
    _k(
        "raft_config.raft_tls_server_cert",
        _v_optional_str,
        "unset",
        "TLS certificate file of the raft port",
    ),
    _k(
        "raft_config.raft_tls_server_key",
        _v_optional_str,
        "unset",
        "TLS private key file of the raft port",
        secret=True,
    ),
    _k(
        "raft_config.raft_tls_server_root_ca_cert",
        _v_optional_str,
        "unset",
        "CA certificate file every raft peer's certificate must be issued by",
    ),
    _k(
        "raft_config.raft_secret",
        _v_optional_str,
        "unset",
        "shared secret peers prove on the raft port (never sent)",
        secret=True,
    ),
    _k(
        "raft_config.raft_accepted_secrets",
        _v_secrets,
        "[]",
        "older secrets still accepted from peers (rotation)",
        flag_kind="list",
        secret=True,
        metavar="SECRET",
    ),
    _k(
        "raft_config.raft_secret_strict",
        _v_bool,
        "false",
        "refuse raft peers without a valid proof of the secret (else warn)",
        flag_kind="bool",
    ),
)

_BY_PATH: Final = {key.path: key for key in KEYS}
_SECTIONS: Final = {
    (): {"log", "raft_config"},
    ("log",): {"file", "stderr"},
}


# -------------------------------------------------------------------------- flags


class _ConfigArgumentParser(argparse.ArgumentParser):
    """The parser of :func:`load_config`: usage errors become ConfigError."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        raise ConfigError(message)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-c/--config-file`` and one flag per configuration key to ``parser``.

    Flag values stay strings (``None`` when absent); :func:`config_from_args` converts
    and checks them, so a bad value is reported like a bad file value, naming the flag.
    """
    parser.add_argument(
        "-c",
        "--config-file",
        metavar="FILE",
        help=f"TOML config file (default: ${CONFIG_FILE_ENV}, else none: defaults and flags)",
    )
    groups = {
        "top": parser.add_argument_group("configuration (top level)"),
        "log": parser.add_argument_group("configuration [log.file] and [log.stderr]"),
        "raft_config": parser.add_argument_group("configuration [raft_config]"),
    }
    for key in KEYS:
        group = groups.get(key.path[0], groups["top"]) if len(key.path) > 1 else groups["top"]
        text = f"{key.help} [{key.dotted}] (default: {key.default})"
        text = text.replace("%", "%%")
        if key.flag_kind == "bool":
            group.add_argument(
                key.flag, dest=key.dest, metavar="BOOL", nargs="?", const="true", help=text
            )
        elif key.flag_kind == "list":
            group.add_argument(
                key.flag, dest=key.dest, metavar=key.metavar or "ADDR", nargs="+", action="extend", help=text
            )
        else:
            metavar = "N" if key.flag_kind == "int" else key.attr.split("_")[-1].upper()
            group.add_argument(key.flag, dest=key.dest, metavar=metavar, help=text)


def _flag_values(args: argparse.Namespace) -> dict[tuple[str, ...], object]:
    """The keys given on the command line, converted to TOML types (unchecked)."""
    values: dict[tuple[str, ...], object] = {}
    for key in KEYS:
        raw = getattr(args, key.dest, None)
        if raw is None:
            continue
        try:
            if key.flag_kind == "int":
                values[key.path] = _flag_int(raw)
            elif key.flag_kind == "bool":
                values[key.path] = _flag_bool(raw)
            elif key.flag_kind == "list":
                values[key.path] = list(raw)
            else:
                values[key.path] = raw
        except ValueError as exc:
            raise ConfigError(f"{key.flag}: {exc}") from None
    return values


# --------------------------------------------------------------------------- file


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fp:
            data = fp.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: bad TOML: {exc}") from None


def _flatten(
    table: Mapping[str, Any], file: str, prefix: tuple[str, ...] = ()
) -> tuple[dict[tuple[str, ...], object], list[str]]:
    """The known keys of a parsed file, and the dotted names of the unknown ones."""
    values: dict[tuple[str, ...], object] = {}
    unknown: list[str] = []
    sections = _SECTIONS.get(prefix, set())
    for name, value in table.items():
        path = (*prefix, name)
        if path in _BY_PATH:
            values[path] = value
        elif name in sections:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{'.'.join(path)}: expected a table ([{'.'.join(path)}]), "
                    f"got {_describe(value)} (config file {file})"
                )
            sub_values, sub_unknown = _flatten(value, file, path)
            values.update(sub_values)
            unknown.extend(sub_unknown)
        else:
            unknown.append(_with_hint(path))
    return values, unknown


def _with_hint(path: tuple[str, ...]) -> str:
    dotted = ".".join(path)
    hints = [key.dotted for key in KEYS if key.attr == path[-1] and key.path != path]
    if len(hints) == 1:
        return f"{dotted} (did you mean {hints[0]}?)"
    return dotted


# ------------------------------------------------------------------------- loader


def config_from_args(
    args: argparse.Namespace,
    env: Mapping[str, str],
    *,
    require_id: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> Config:
    """Build the Config from parsed arguments (see :func:`add_config_arguments`).

    The file is ``args.config_file``, else ``env["METASRV_CONFIG_FILE"]`` when set and
    not empty, else none (defaults and flags only). Flags override the file.
    """
    warn = on_warning if on_warning is not None else _logger.warning
    file = args.config_file or env.get(CONFIG_FILE_ENV) or None
    flags = _flag_values(args)
    file_values: dict[tuple[str, ...], object] = {}
    if file is not None:
        table = _read_file(file)
        file_values, unknown = _flatten(table, file)
        if unknown:
            plural = "key" if len(unknown) == 1 else "keys"
            warn(f"config file {file}: unknown {plural} ignored: {', '.join(unknown)}")

    def name(key: Key) -> str:
        if key.path in flags:
            return key.flag
        return key.dotted

    def where(key: Key) -> str:
        return "" if key.path in flags or file is None else f" (config file {file})"

    checked: dict[tuple[str, ...], object] = {}
    for key in KEYS:
        if key.path in flags:
            raw = flags[key.path]
        elif key.path in file_values:
            raw = file_values[key.path]
        else:
            continue
        try:
            checked[key.path] = key.validate(raw)
        except ValueError as exc:
            raise ConfigError(f"{name(key)}: {exc}{where(key)}") from None

    # databend-meta: --log-level / --log-dir override the sections' level and dir.
    overrides = {
        ("log_level",): [("log", "file", "level"), ("log", "stderr", "level")],
        ("log_dir",): [("log", "file", "dir")],
    }
    for top, paths in overrides.items():
        if top in flags:
            for path in paths:
                if path not in flags:
                    checked[path] = checked[top]

    # Skip this node's own raft address in `join` (databend-meta does the same), so one
    # "all members" list can be given to every node.
    raft_values = {p[-1]: v for p, v in checked.items() if p[:-1] == ("raft_config",)}
    probe = RaftConfigSection(**raft_values)  # type: ignore[arg-type]
    own = _own_raft_addresses(probe)
    kept, skipped = [], []
    for entry in probe.join:
        host, port = parse_address(entry)
        (skipped if (host.lower(), port) in own else kept).append(entry)
    if skipped:
        checked[("raft_config", "join")] = tuple(kept)
        checked[("raft_config", "join_skipped")] = tuple(skipped)

    def section(prefix: tuple[str, ...]) -> dict[str, object]:
        return {p[-1]: v for p, v in checked.items() if p[:-1] == prefix}

    config = Config(
        **section(()),  # type: ignore[arg-type]
        log=LogConfig(
            file=FileLogConfig(**section(("log", "file"))),  # type: ignore[arg-type]
            stderr=StderrLogConfig(**section(("log", "stderr"))),  # type: ignore[arg-type]
        ),
        raft_config=RaftConfigSection(**section(("raft_config",))),  # type: ignore[arg-type]
    )
    _check_combinations(config, require_id, lambda p: _BY_PATH[p], name, where)
    return config


def _check_combinations(
    config: Config,
    require_id: bool,
    key: Callable[[tuple[str, ...]], Key],
    name: Callable[[Key], str],
    where: Callable[[Key], str],
) -> None:
    raft = config.raft_config
    id_key = key(("raft_config", "id"))
    if require_id and raft.id is None:
        raise ConfigError(
            f"{id_key.dotted}: missing: running a node needs its id, an integer >= 0 "
            f"(set [raft_config] id in the config file or pass {id_key.flag} N)"
        )
    single, join, learner = (key(("raft_config", k)) for k in ("single", "join", "learner"))
    if raft.single and raft.join:
        raise ConfigError(
            f"{name(single)}: cannot be combined with {name(join)}: "
            f"single bootstraps a new cluster, join enters an existing one{where(single)}"
        )
    if raft.single and raft.learner:
        raise ConfigError(
            f"{name(learner)}: cannot be combined with {name(single)}: "
            f"a single-node cluster needs a voter{where(learner)}"
        )
    pairs = [
        ("admin_tls_server_cert", "admin_tls_server_key"),
        ("grpc_tls_server_cert", "grpc_tls_server_key"),
        ("raft_config.raft_tls_server_cert", "raft_config.raft_tls_server_key"),
    ]
    for cert_name, key_name in pairs:
        cert_key, key_key = key(tuple(cert_name.split("."))), key(tuple(key_name.split(".")))
        has_cert, has_key = cert_key.get(config) is not None, key_key.get(config) is not None
        if has_cert != has_key:
            present, missing = (cert_key, key_key) if has_cert else (key_key, cert_key)
            raise ConfigError(
                f"{name(missing)}: missing: {name(present)} is set, and TLS needs both "
                f"the certificate and the key{where(present)}"
            )
    raft_cert, raft_ca = key(("raft_config", "raft_tls_server_cert")), key(("raft_config", "raft_tls_server_root_ca_cert"))
    if (raft.raft_tls_server_cert is not None) != (raft.raft_tls_server_root_ca_cert is not None):
        present, missing = (raft_cert, raft_ca) if raft.raft_tls_server_cert is not None else (raft_ca, raft_cert)
        raise ConfigError(
            f"{name(missing)}: missing: {name(present)} is set, and TLS on the raft port is mutual:"
            f" it needs this node's certificate and key and the CA that issues every peer's{where(present)}"
        )
    strict = key(("raft_config", "raft_secret_strict"))
    if raft.raft_secret_strict and raft.raft_secret is None and not raft.raft_accepted_secrets:
        raise ConfigError(
            f"{name(strict)}: needs {name(key(('raft_config', 'raft_secret')))}: a strict node refuses"
            f" every peer that does not prove the secret{where(strict)}"
        )


_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD: Final = frozenset({"0.0.0.0", "::"})


def _own_raft_addresses(raft: RaftConfigSection) -> set[tuple[str, int]]:
    """The (host, port) pairs that would reach this node's own raft port."""
    hosts = {raft.raft_advertise_host.lower(), raft.raft_listen_host.lower()}
    if hosts & _WILDCARD:
        hosts |= _LOOPBACK | {socket.gethostname().lower()}
    if hosts & _LOOPBACK:
        hosts |= _LOOPBACK
    return {(host, raft.raft_api_port) for host in hosts}


def load_config(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    require_id: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> Config:
    """Load the configuration from ``argv`` (config flags only) and ``env``.

    ``argv`` holds ``-c/--config-file`` and the per-key flags (not the program name);
    the file named by ``-c`` or ``$METASRV_CONFIG_FILE`` is read, then the flags
    override it. ``require_id=False`` accepts a config without ``raft_config.id``
    (``--cmd show-config``, leave mode). The unknown-keys warning goes to
    ``on_warning`` (default: the ``metanode.node`` logger). Raises ConfigError.
    """
    parser = _ConfigArgumentParser(prog="metanode", add_help=False, allow_abbrev=False)
    add_config_arguments(parser)
    args = parser.parse_args(list(argv))
    return config_from_args(args, env, require_id=require_id, on_warning=on_warning)
