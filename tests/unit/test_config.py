"""The configuration loader (contract §1-§2): defaults, file and flags, checks, redaction."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from metanode.config import (
    CONFIG_FILE_ENV,
    KEYS,
    Config,
    ConfigError,
    FileLogConfig,
    LogConfig,
    RaftConfigSection,
    StderrLogConfig,
    format_address,
    load_config,
    parse_address,
)
from metanode.logsetup import configure_logging, log_file_path, shutdown_logging

ROOT = Path(__file__).resolve().parents[2]
ETC = ROOT / "etc"
TUTORIAL = Path("/work/shared/reference/cluster-management.en.md")

# The tutorial's databend-meta-7.toml, byte for byte (the reference is not in CI).
TUTORIAL_NODE_7 = """\
# databend-meta-7.toml
log_dir            = "metadata/_logs7"
admin_api_address  = "0.0.0.0:28701"
grpc_api_address   = "0.0.0.0:28702"

[raft_config]
id                  = 7
raft_dir            = "metadata/datas7"
raft_api_port       = 28703
raft_listen_host    = "127.0.0.1"
raft_advertise_host = "localhost"
join                = ["localhost:28004"]
"""


def write(tmp_path: Path, text: str, name: str = "metanode.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(*argv: str, env: dict[str, str] | None = None, **kw: Any) -> Config:
    return load_config(list(argv), env or {}, **kw)


def error_of(*argv: str, env: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(*argv, env=env, **kw)
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    return message


# --------------------------------------------------------------------------- defaults


def test_every_default_as_spec_section_2() -> None:
    config = load("--id", "1")
    assert config.log_level == "INFO"
    assert config.log_dir == "./.metanode/logs"
    assert config.admin_api_address == "127.0.0.1:28002"
    assert config.admin_api_token is None
    assert config.grpc_api_address == "127.0.0.1:9191"
    assert config.grpc_api_advertise_host is None
    assert config.admin_tls_server_cert is None and config.admin_tls_server_key is None
    assert config.grpc_tls_server_cert is None and config.grpc_tls_server_key is None
    assert config.grpc_api_max_message_size == 32 * 1024 * 1024
    assert config.log == LogConfig(
        file=FileLogConfig(on=True, level=None, dir=None, format="json"),
        stderr=StderrLogConfig(on=False, level=None, format="text"),
    )
    assert (config.log_file_level, config.log_file_dir) == ("INFO", "./.metanode/logs")
    assert config.log_stderr_level == "INFO"
    raft = config.raft_config
    assert raft.id == 1
    assert raft.raft_dir == "./.metanode/meta"
    assert raft.raft_api_port == 28004
    assert raft.raft_listen_host == "127.0.0.1"
    assert raft.raft_advertise_host == socket.gethostname()
    assert (raft.single, raft.join, raft.learner) == (False, (), False)
    assert raft.cluster_name == "metanode"
    assert raft.heartbeat_interval == 500
    assert raft.install_snapshot_timeout == 4000
    assert raft.snapshot_logs_since_last == 1024
    assert raft.max_applied_log_to_keep == 1000
    assert raft.snapshot_chunk_size == 4 * 1024 * 1024
    assert raft.wait_leader_timeout == 70000
    assert raft.raft_tls_server_cert is None and raft.raft_tls_server_key is None
    assert raft.raft_secret is None
    assert config == Config(raft_config=RaftConfigSection(id=1))


def test_documented_defaults_match_the_code() -> None:
    """The defaults --help and the docs print are the ones the classes use."""
    config = Config()
    special = {"unset": None, "none, required": None, "log_level": None, "log_dir": None}
    for key in KEYS:
        if key.default == "the machine's hostname":
            assert key.get(config) == socket.gethostname()
            continue
        expected: object
        if key.default in special:
            expected = special[key.default]
        else:
            expected = tomllib.loads(f"v = {_toml_literal(key.default)}")["v"]
        if isinstance(expected, list):
            expected = tuple(expected)
        assert key.get(config) == expected, key.dotted


def _toml_literal(text: str) -> str:
    if text in ("true", "false", "[]") or text.isdigit():
        return text
    return json.dumps(text)


def test_every_key_has_its_kebab_case_flag() -> None:
    flags = [key.flag for key in KEYS]
    assert len(set(flags)) == len(flags)
    for key in KEYS:
        assert key.flag == "--" + (
            "-".join(key.path) if key.path[0] == "log" else key.path[-1]
        ).replace("_", "-")
    for flag in ("--id", "--raft-dir", "--single", "--join", "--raft-api-port",
                 "--raft-listen-host", "--raft-advertise-host", "--admin-api-address",
                 "--grpc-api-address", "--heartbeat-interval", "--log-level", "--log-dir",
                 "--cluster-name", "--learner", "--admin-api-token", "--log-file-level",
                 "--log-stderr-on", "--raft-secret"):  # fmt: skip
        assert flag in flags


# An example value for every key: (flag arguments, expected value).
FLAG_EXAMPLES: dict[str, tuple[list[str], object]] = {
    "log_level": (["debug"], "DEBUG"),
    "log_dir": (["/l"], "/l"),
    "admin_api_address": (["0.0.0.0:1"], "0.0.0.0:1"),
    "admin_api_token": (["t0k"], "t0k"),
    "grpc_api_token": (["c1ient"], "c1ient"),
    "grpc_api_address": (["[::1]:0"], "[::1]:0"),
    "grpc_api_advertise_host": (["meta1"], "meta1"),
    "admin_tls_server_cert": (["a.crt"], "a.crt"),
    "admin_tls_server_key": (["a.key"], "a.key"),
    "grpc_tls_server_cert": (["g.crt"], "g.crt"),
    "grpc_tls_server_key": (["g.key"], "g.key"),
    "grpc_api_max_message_size": (["1024"], 1024),
    "log.file.on": (["false"], False),
    "log.file.level": (["warn"], "WARN"),
    "log.file.dir": (["/f"], "/f"),
    "log.file.format": (["TEXT"], "text"),
    "log.stderr.on": ([], True),
    "log.stderr.level": (["error"], "ERROR"),
    "log.stderr.format": (["json"], "json"),
    "raft_config.id": (["42"], 42),
    "raft_config.raft_dir": (["/d"], "/d"),
    "raft_config.raft_api_port": (["1"], 1),
    "raft_config.raft_listen_host": (["0.0.0.0"], "0.0.0.0"),
    "raft_config.raft_advertise_host": (["meta.example"], "meta.example"),
    "raft_config.single": ([], True),
    "raft_config.join": (["a:1", "b:2"], ("a:1", "b:2")),
    "raft_config.learner": (["yes"], True),
    "raft_config.cluster_name": (["prod"], "prod"),
    "raft_config.heartbeat_interval": (["50"], 50),
    "raft_config.install_snapshot_timeout": (["9"], 9),
    "raft_config.snapshot_logs_since_last": (["7"], 7),
    "raft_config.max_applied_log_to_keep": (["0"], 0),
    "raft_config.snapshot_chunk_size": (["65536"], 65536),
    "raft_config.wal_segment_size": (["1048576"], 1048576),
    "raft_config.wait_leader_timeout": (["1"], 1),
    "raft_config.raft_tls_server_cert": (["r.crt"], "r.crt"),
    "raft_config.raft_tls_server_key": (["r.key"], "r.key"),
    "raft_config.raft_secret": (["s3cret"], "s3cret"),
    "raft_config.raft_tls_server_root_ca_cert": (["ca.crt"], "ca.crt"),
    "raft_config.raft_accepted_secrets": (["old1", "old2"], ("old1", "old2")),
    "raft_config.raft_secret_strict": ([], True),
}

PAIRED = {  # TLS keys come in pairs: give the partner too
    "admin_tls_server_cert": ["--admin-tls-server-key", "x"],
    "admin_tls_server_key": ["--admin-tls-server-cert", "x"],
    "grpc_tls_server_cert": ["--grpc-tls-server-key", "x"],
    "grpc_tls_server_key": ["--grpc-tls-server-cert", "x"],
    # the raft port's TLS is mutual: its pair and the CA come together
    "raft_config.raft_tls_server_cert": ["--raft-tls-server-key", "x", "--raft-tls-server-root-ca-cert", "x"],
    "raft_config.raft_tls_server_key": ["--raft-tls-server-cert", "x", "--raft-tls-server-root-ca-cert", "x"],
    "raft_config.raft_tls_server_root_ca_cert": ["--raft-tls-server-cert", "x", "--raft-tls-server-key", "x"],
    "raft_config.raft_secret_strict": ["--raft-secret", "x"],  # strict needs a secret
}


def test_flag_examples_cover_every_key() -> None:
    assert set(FLAG_EXAMPLES) == {key.dotted for key in KEYS}


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.dotted)
def test_each_flag_sets_its_key(key: Any) -> None:
    values, expected = FLAG_EXAMPLES[key.dotted]
    base = [] if key.dotted == "raft_config.id" else ["--id", "9"]
    config = load(*base, key.flag, *values, *PAIRED.get(key.dotted, []))
    assert key.get(config) == expected


def to_toml(node: dict[str, Any], section: str = "") -> str:
    """A minimal TOML writer for tests: scalars and lists of scalars, nested tables."""
    lines = [f"[{section}]"] if section else []
    tables = []
    for name, value in node.items():
        if isinstance(value, dict):
            tables.append((name, value))
        elif value is not None:
            value = list(value) if isinstance(value, tuple) else value
            lines.append(f"{name} = {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    for name, value in tables:
        text += to_toml(value, f"{section}.{name}" if section else name)
    return text


def nested(values: dict[str, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.dotted)
def test_each_key_is_read_from_the_file(key: Any, tmp_path: Path) -> None:
    """The same example values, written as TOML under the key's section."""
    _, expected = FLAG_EXAMPLES[key.dotted]
    values = {"raft_config.id": 9, key.dotted: expected}
    partner = PAIRED.get(key.dotted, [])
    config = load("-c", write(tmp_path, to_toml(nested(values))), *partner)
    assert key.get(config) == expected


# ---------------------------------------------------------------- file, flags, env

FILE = """\
log_level = "WARN"
admin_api_address = "127.0.0.1:1"

[raft_config]
id = 3
raft_api_port = 7000
join = ["localhost:7001", "localhost:7002"]
heartbeat_interval = 100
"""


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    config = load("-c", path)
    assert (config.log_level, config.admin_api_address) == ("WARN", "127.0.0.1:1")
    assert config.raft_config.id == 3
    assert config.raft_config.join == ("localhost:7001", "localhost:7002")
    config = load("--config-file", path, "--id", "4", "--heartbeat-interval", "250",
                  "--log-level", "info", "--join", "localhost:9")  # fmt: skip
    assert config.raft_config.id == 4
    assert config.raft_config.heartbeat_interval == 250
    assert config.log_level == "INFO"
    assert config.raft_config.join == ("localhost:9",), "a flag list replaces the file's"
    assert config.raft_config.raft_api_port == 7000, "keys without a flag keep the file value"
    assert config.admin_api_address == "127.0.0.1:1"


@pytest.mark.parametrize(
    "argv",
    [
        ["--join", "a:1", "b:2", "c:3"],
        ["--join", "a:1", "--join", "b:2", "--join", "c:3"],
        ["--join", "a:1", "b:2", "--join", "c:3"],
        ["--join=a:1", "--join", "b:2", "c:3"],
    ],
)
def test_list_flags_take_several_values_and_repeat(argv: list[str]) -> None:
    assert load("--id", "1", *argv).raft_config.join == ("a:1", "b:2", "c:3")


def test_bool_flags_bare_or_with_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[raft_config]\nid = 1\nsingle = true\n")
    assert load("-c", path).raft_config.single is True
    assert load("-c", path, "--single=false").raft_config.single is False
    assert load("-c", path, "--single", "no").raft_config.single is False
    assert load("--id", "1", "--single").raft_config.single is True
    assert load("--id", "1", "--single", "--learner=0").raft_config.learner is False


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    other = write(tmp_path, "[raft_config]\nid = 5\n", "other.toml")
    assert load(env={CONFIG_FILE_ENV: path}).raft_config.id == 3
    assert load("-c", other, env={CONFIG_FILE_ENV: path}).raft_config.id == 5, "-c wins"
    assert load("--id", "6", env={CONFIG_FILE_ENV: path}).raft_config.id == 6
    assert load("--id", "6", env={CONFIG_FILE_ENV: ""}).raft_config.id == 6, "empty = unset"


def test_no_file_means_defaults_and_flags() -> None:
    assert load("--id", "1") == Config(raft_config=RaftConfigSection(id=1))


def test_id_is_required_only_when_running_a_node() -> None:
    message = error_of()
    assert message.startswith("raft_config.id: missing")
    assert "--id" in message
    assert load(require_id=False).raft_config.id is None


def test_unknown_keys_give_one_warning_naming_them(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'id = 1\nmetric_api_address = "x"\n[log.file]\nlevl = "INFO"\n'
        "[raft_config]\nid = 2\nno_sync = true\n[extra]\na = 1\n",
    )
    warnings: list[str] = []
    config = load("-c", path, on_warning=warnings.append)
    assert config.raft_config.id == 2
    assert len(warnings) == 1
    (line,) = warnings
    assert "\n" not in line and path in line
    for name in ("id (did you mean raft_config.id?)", "metric_api_address", "log.file.levl",
                 "raft_config.no_sync", "extra"):  # fmt: skip
        assert name in line


def test_unknown_keys_warn_through_the_node_logger_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "bogus = 1\n[raft_config]\nid = 1\n")
    with caplog.at_level(logging.WARNING, logger="metanode.node"):
        load("-c", path)
    assert [r.getMessage() for r in caplog.records] == [
        f"config file {path}: unknown key ignored: bogus"
    ]


def test_known_files_give_no_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    load("-c", write(tmp_path, FILE), on_warning=warnings.append)
    assert warnings == []


# -------------------------------------------------------------------- bad configs

BAD_FILES = [
    # (file text, the key the message must start with, a fragment of the reason)
    ("[raft_config]\nid = -3\n", "raft_config.id:", "must be 0.."),
    ('[raft_config]\nid = "1"\n', "raft_config.id:", "expected an integer"),
    ("[raft_config]\nid = 1.5\n", "raft_config.id:", "expected an integer"),
    ("[raft_config]\nid = true\n", "raft_config.id:", "a boolean (true)"),
    ("[raft_config]\nid = 9223372036854775808\n", "raft_config.id:", "must be 0.."),
    ('[raft_config]\nid = 1\nraft_api_port = "28004"\n', "raft_config.raft_api_port:", "string"),
    ("[raft_config]\nid = 1\nraft_api_port = -1\n", "raft_config.raft_api_port:", "1..65535"),
    ("[raft_config]\nid = 1\nraft_api_port = 65536\n", "raft_config.raft_api_port:", "1..65535"),
    ("[raft_config]\nid = 1\nraft_api_port = 0\n", "raft_config.raft_api_port:", "1..65535"),
    ('admin_api_address = "127.0.0.1"\n[raft_config]\nid = 1\n', "admin_api_address:", "no port"),
    ('admin_api_address = "h:99999"\n[raft_config]\nid = 1\n', "admin_api_address:", "out of range"),
    ('admin_api_address = "h:-1"\n[raft_config]\nid = 1\n', "admin_api_address:", "not a number"),
    ('grpc_api_address = ":9191"\n[raft_config]\nid = 1\n', "grpc_api_address:", "no port"),
    ('grpc_api_address = "::1:9191"\n[raft_config]\nid = 1\n', "grpc_api_address:", "IPv6"),
    ("grpc_api_address = 9191\n[raft_config]\nid = 1\n", "grpc_api_address:", "an integer 9191"),
    ("grpc_api_max_message_size = 0\n[raft_config]\nid = 1\n", "grpc_api_max_message_size:", ">= 1"),
    ("[raft_config]\nid = 1\nheartbeat_interval = 0\n", "raft_config.heartbeat_interval:", ">= 1"),
    ("[raft_config]\nid = 1\nheartbeat_interval = -5\n", "raft_config.heartbeat_interval:", ">= 1"),
    ("[raft_config]\nid = 1\nheartbeat_interval = 0.5\n", "raft_config.heartbeat_interval:", "float"),
    ("[raft_config]\nid = 1\nwait_leader_timeout = 0\n", "raft_config.wait_leader_timeout:", ">= 1"),
    ("[raft_config]\nid = 1\nmax_applied_log_to_keep = -1\n", "raft_config.max_applied_log_to_keep:", ">= 0"),
    ('[raft_config]\nid = 1\njoin = "localhost:28004"\n', "raft_config.join:", "a list"),
    ('[raft_config]\nid = 1\njoin = ["localhost"]\n', "raft_config.join:", "no port"),
    ("[raft_config]\nid = 1\njoin = [28004]\n", "raft_config.join:", "an integer"),
    ('[raft_config]\nid = 1\njoin = ["h:0"]\n', "raft_config.join:", "port 0"),
    ('[raft_config]\nid = 1\nsingle = "true"\n', "raft_config.single:", "true or false"),
    ('[raft_config]\nid = 1\nraft_dir = ""\n', "raft_config.raft_dir:", "empty"),
    ('[raft_config]\nid = 1\ncluster_name = ""\n', "raft_config.cluster_name:", "empty"),
    ('[raft_config]\nid = 1\nraft_advertise_host = "localhost:28004"\n',
     "raft_config.raft_advertise_host:", "without a port"),
    ('[raft_config]\nid = 1\nraft_advertise_host = "0.0.0.0"\n',
     "raft_config.raft_advertise_host:", "wildcard"),
    ('[raft_config]\nid = 1\nraft_listen_host = ""\n', "raft_config.raft_listen_host:", "empty"),
    ('log_level = "verbose"\n[raft_config]\nid = 1\n', "log_level:", "unknown log level"),
    ('[log.file]\nformat = "xml"\n[raft_config]\nid = 1\n', "log.file.format:", "json or text"),
    ('[log.stderr]\non = "yes"\n[raft_config]\nid = 1\n', "log.stderr.on:", "true or false"),
    ("log = 1\n[raft_config]\nid = 1\n", "log:", "expected a table"),
    ("[log]\nfile = true\n[raft_config]\nid = 1\n", "log.file:", "expected a table"),
    ("raft_config = [1]\n", "raft_config:", "expected a table"),
    ('[raft_config]\nid = 1\nsingle = true\njoin = ["a:1"]\n', "raft_config.single:",
     "cannot be combined with raft_config.join"),
    ("[raft_config]\nid = 1\nsingle = true\nlearner = true\n", "raft_config.learner:",
     "cannot be combined with raft_config.single"),
    ('admin_tls_server_cert = "c"\n[raft_config]\nid = 1\n', "admin_tls_server_key:", "missing"),
    ('grpc_tls_server_key = "k"\n[raft_config]\nid = 1\n', "grpc_tls_server_cert:", "missing"),
    ('[raft_config]\nid = 1\nraft_tls_server_cert = "c"\n', "raft_config.raft_tls_server_key:",
     "missing"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "reason"), BAD_FILES)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    message = error_of("-c", path)
    assert message.startswith(key), message
    assert reason in message
    assert path in message, "the file is named too"


BAD_FLAGS = [
    (["--id", "x"], "--id:", "expected an integer"),
    (["--id", "-1"], "--id:", "must be 0.."),
    (["--id", "1", "--raft-api-port", "-1"], "--raft-api-port:", "1..65535"),
    (["--id", "1", "--raft-api-port=70000"], "--raft-api-port:", "1..65535"),
    (["--id", "1", "--raft-api-port", "28004x"], "--raft-api-port:", "expected an integer"),
    (["--id", "1", "--heartbeat-interval", "0"], "--heartbeat-interval:", ">= 1"),
    (["--id", "1", "--admin-api-address", "localhost"], "--admin-api-address:", "no port"),
    (["--id", "1", "--join", "a:1", "nope"], "--join:", "no port"),
    (["--id", "1", "--single", "maybe"], "--single:", "true or false"),
    (["--id", "1", "--single", "--join", "a:1"], "--single:", "cannot be combined with --join"),
    (["--id", "1", "--log-level", "loud"], "--log-level:", "unknown log level"),
    (["--id", "1", "--no-such-flag"], "unrecognized arguments", "--no-such-flag"),
    (["--id"], "argument --id", "expected one argument"),
    (["--joi", "a:1", "--id", "1"], "unrecognized arguments", "--joi"),  # no abbreviations
]  # fmt: skip


@pytest.mark.parametrize(("argv", "key", "reason"), BAD_FLAGS)
def test_bad_flag_values_name_the_flag(argv: list[str], key: str, reason: str) -> None:
    message = error_of(*argv)
    assert message.startswith(key), message
    assert reason in message


def test_a_flag_fixes_a_bad_file_value(tmp_path: Path) -> None:
    """Flags are checked in place of the file's value, so a flag overrides a bad one."""
    path = write(tmp_path, '[raft_config]\nid = "one"\n')
    assert load("-c", path, "--id", "1").raft_config.id == 1


def test_bad_toml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[raft_config]\nid = 1\nraft_dir = "unterminated\n')
    message = error_of("-c", path)
    assert message.startswith(f"config file {path}: bad TOML:")
    assert "line 3, column" in message


def test_duplicate_keys_are_bad_toml(tmp_path: Path) -> None:
    message = error_of("-c", write(tmp_path, "[raft_config]\nid = 1\nid = 2\n"))
    assert "bad TOML" in message and "line 3" in message


def test_a_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    assert error_of("-c", path) == f"config file {path}: does not exist"
    assert error_of(env={CONFIG_FILE_ENV: path}) == f"config file {path}: does not exist"


def test_a_directory_or_unreadable_file(tmp_path: Path) -> None:
    assert error_of("-c", str(tmp_path)).endswith("is a directory, not a file")
    path = write(tmp_path, "[raft_config]\nid = 1\n")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root reads anything
            pytest.skip("running as root: an unreadable file cannot be made")
        assert error_of("-c", path) == f"config file {path}: cannot be read: Permission denied"
    finally:
        os.chmod(path, 0o644)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('cluster_name = "caf\xe9"\n'.encode("latin-1"))
    assert "not UTF-8" in error_of("-c", str(path))


# ------------------------------------------------------------------------ join self

SELF_JOINS = [
    # (raft_listen_host, raft_advertise_host, join entry)
    ("127.0.0.1", "localhost", "localhost:28004"),
    ("127.0.0.1", "localhost", "127.0.0.1:28004"),
    ("127.0.0.1", "localhost", "LOCALHOST:28004"),
    ("127.0.0.1", "meta1", "meta1:28004"),
    ("127.0.0.1", "meta1", "localhost:28004"),
    ("10.0.0.5", "meta1", "10.0.0.5:28004"),
    ("0.0.0.0", "meta1", "127.0.0.1:28004"),
    ("0.0.0.0", "meta1", f"{socket.gethostname()}:28004"),
    ("::", "meta1", "[::1]:28004"),
    ("::1", "meta1", "[::1]:28004"),
]


@pytest.mark.parametrize(("listen", "advertise", "entry"), SELF_JOINS)
def test_join_skips_this_node_s_own_address(listen: str, advertise: str, entry: str) -> None:
    """As databend-meta: one "all members" list works on every node."""
    config = load(
        "--id", "1", "--raft-listen-host", listen, "--raft-advertise-host", advertise,
        "--join", "other:28004", entry, "other2:28004",
    )  # fmt: skip
    assert config.raft_config.join == ("other:28004", "other2:28004")
    assert config.raft_config.join_skipped == (entry,)


def test_join_self_in_the_file_is_skipped_too(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[raft_config]\nid = 1\nraft_advertise_host = "localhost"\n'
        'join = ["localhost:28004", "localhost:28104", "localhost:28204"]\n',
    )
    config = load("-c", path)
    assert config.raft_config.join == ("localhost:28104", "localhost:28204")
    assert config.raft_config.join_skipped == ("localhost:28004",)
    assert config.redacted()["raft_config"]["join"] == ["localhost:28104", "localhost:28204"]


def test_a_join_list_of_only_this_node_is_no_join_list() -> None:
    """`single` with an "all members" list of one is fine: nothing is left to join."""
    config = load("--id", "1", "--raft-advertise-host", "localhost", "--single", "--join", "localhost:28004")
    assert (config.raft_config.single, config.raft_config.join) == (True, ())
    assert config.raft_config.join_skipped == ("localhost:28004",)
    message = error_of("--id", "1", "--raft-advertise-host", "localhost", "--single",
                       "--join", "localhost:28004", "meta2:28004")  # fmt: skip
    assert message.startswith("--single: cannot be combined with --join")


@pytest.mark.parametrize(
    ("listen", "advertise", "entry"),
    [
        ("127.0.0.1", "localhost", "localhost:28005"),  # another port
        ("127.0.0.2", "127.0.0.2", "127.0.0.1:28004"),  # another loopback address
        ("10.0.0.5", "meta1", "meta2:28004"),
        ("10.0.0.5", "meta1", "localhost:28004"),  # not listening on loopback
    ],
)
def test_join_other_nodes_is_fine(listen: str, advertise: str, entry: str) -> None:
    config = load("--id", "1", "--raft-listen-host", listen, "--raft-advertise-host", advertise,
                  "--join", entry)  # fmt: skip
    assert config.raft_config.join == (entry,)


# ------------------------------------------------------------------ derived values


def test_advertise_addresses() -> None:
    config = load("--id", "1", "--raft-advertise-host", "meta1", "--raft-api-port", "29000")
    assert config.raft_advertise_address == "meta1:29000"
    assert config.raft_config.raft_listen_address == "127.0.0.1:29000"
    assert config.grpc_api_advertise_address is None, "no advertise host: null, as databend"
    config = load("--id", "1", "--grpc-api-address", "0.0.0.0:9192",
                  "--grpc-api-advertise-host", "meta1.example")  # fmt: skip
    assert config.grpc_api_advertise_address == "meta1.example:9192"
    config = load("--id", "1", "--raft-advertise-host", "::1", "--grpc-api-address",
                  "[::]:9191", "--grpc-api-advertise-host", "fe80::1")  # fmt: skip
    assert config.raft_advertise_address == "[::1]:28004"
    assert config.grpc_api_advertise_address == "[fe80::1]:9191"


def test_empty_optional_strings_mean_unset(tmp_path: Path) -> None:
    """databend-meta's sample configs write empty TLS paths."""
    path = write(
        tmp_path,
        'admin_tls_server_cert = ""\nadmin_tls_server_key = ""\ngrpc_api_advertise_host = ""\n'
        '[log.file]\nlevel = ""\n[raft_config]\nid = 1\nraft_secret = ""\n',
    )
    config = load("-c", path)
    assert config.admin_tls_server_cert is None and config.admin_tls_server_key is None
    assert config.grpc_api_advertise_host is None and config.raft_config.raft_secret is None
    assert config.log_file_level == "INFO"


def test_log_outputs_inherit_the_top_level(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'log_level = "debug"\nlog_dir = "/top"\n[log.stderr]\nlevel = "ERROR"\n'
    )
    config = load("-c", path, require_id=False)
    assert (config.log_file_level, config.log_file_dir) == ("DEBUG", "/top")
    assert config.log_stderr_level == "ERROR"
    config = load("-c", path, "--log-file-dir", "/own", require_id=False)
    assert config.log_file_dir == "/own"


def test_log_level_and_dir_flags_override_the_sections(tmp_path: Path) -> None:
    """databend-meta: Databend's CI runs `--log-level=DEBUG` over `level = "INFO"`."""
    path = write(
        tmp_path,
        '[log.file]\nlevel = "INFO"\ndir = "/file-dir"\n[log.stderr]\non = true\nlevel = "WARN"\n',
    )
    config = load("-c", path, "--log-level=DEBUG", "--log-dir", "/flag-dir", require_id=False)
    assert (config.log_file_level, config.log_stderr_level, config.log_file_dir) == ("DEBUG", "DEBUG", "/flag-dir")
    assert config.redacted()["log"]["file"]["level"] == "DEBUG"
    # The sections' own flags win over the top-level ones.
    config = load("-c", path, "--log-level", "debug", "--log-file-level", "error", "--log-dir", "/x",
                  "--log-file-dir", "/y", require_id=False)  # fmt: skip
    assert (config.log_file_level, config.log_stderr_level, config.log_file_dir) == ("ERROR", "DEBUG", "/y")
    # In the file, the top-level keys stay defaults: the sections' values win.
    path = write(tmp_path, 'log_level = "DEBUG"\nlog_dir = "/top"\n[log.file]\nlevel = "INFO"\ndir = "/own"\n')
    config = load("-c", path, require_id=False)
    assert (config.log_file_level, config.log_file_dir) == ("INFO", "/own")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:28004", ("localhost", 28004)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9191", ("::1", 9191)),
        ("meta-1.example.com:65535", ("meta-1.example.com", 65535)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert format_address(*expected) == text


@pytest.mark.parametrize(
    "text", ["localhost", ":1", "h:", "h:x", "h:65536", "::1:80", "[zz]:1", "a b:1", "h:+1", "h:١"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


# ------------------------------------------------------------------------ redaction


def test_redacted_hides_secrets_and_keeps_the_toml_shape() -> None:
    config = load(
        "--id", "1", "--admin-api-token", "tok", "--raft-secret", "sec", "--join", "a:1",
        "--admin-tls-server-cert", "a.crt", "--admin-tls-server-key", "a.key",
        "--raft-tls-server-cert", "r.crt", "--raft-tls-server-key", "r.key",
        "--raft-tls-server-root-ca-cert", "ca.crt", "--raft-accepted-secrets", "old1", "old2",
    )  # fmt: skip
    out = config.redacted()
    text = json.dumps(out)
    for secret in ("tok", "sec", "a.key", "r.key", "old1", "old2"):
        assert f'"{secret}"' not in text
    assert out["raft_config"]["raft_accepted_secrets"] == "***"
    assert load("--id", "1").redacted()["raft_config"]["raft_accepted_secrets"] == [], "none: an empty list"
    assert out["raft_config"]["raft_tls_server_root_ca_cert"] == "ca.crt"
    assert out["admin_api_token"] == "***"
    assert out["admin_tls_server_key"] == "***"
    assert out["admin_tls_server_cert"] == "a.crt", "a certificate is public"
    assert out["grpc_tls_server_key"] is None, "unset secrets are null, not ***"
    assert out["raft_config"]["raft_secret"] == "***"
    assert out["raft_config"]["raft_tls_server_key"] == "***"
    assert out["raft_config"]["join"] == ["a:1"]
    assert out["raft_config"]["id"] == 1
    assert out["log"]["file"] == {"on": True, "level": "INFO", "dir": "./.metanode/logs",
                                  "format": "json"}  # fmt: skip

    def leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        found: set[str] = set()
        for name, value in node.items():
            if isinstance(value, dict):
                found |= leaves(value, f"{prefix}{name}.")
            else:
                found.add(prefix + name)
        return found

    assert leaves(out) == {key.dotted for key in KEYS}


def test_redacted_is_a_loadable_config_once_nulls_are_dropped(tmp_path: Path) -> None:
    """Same key names as the TOML: the output (without nulls) loads back to the same config."""
    config = load("--id", "3", "--join", "a:1", "b:2", "--log-level", "warn")
    out = config.redacted()

    path = write(tmp_path, to_toml(out))
    warnings: list[str] = []
    assert load("-c", path, on_warning=warnings.append) == attrs_evolve_logs(config)
    assert warnings == []


def attrs_evolve_logs(config: Config) -> Config:
    """The config with its inherited log values written out, as redacted() shows them."""
    return attrs.evolve(
        config,
        log=LogConfig(
            file=attrs.evolve(
                config.log.file, level=config.log_file_level, dir=config.log_file_dir
            ),
            stderr=attrs.evolve(config.log.stderr, level=config.log_stderr_level),
        ),
    )


# ------------------------------------------------------------------------ etc files


@pytest.mark.parametrize("path", sorted(ETC.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_without_warnings(path: Path) -> None:
    warnings: list[str] = []
    config = load("-c", str(path), on_warning=warnings.append)
    assert warnings == []
    assert config.raft_config.id is not None


def test_the_tutorial_cluster_configs() -> None:
    nodes = {n: load("-c", str(ETC / f"databend-meta-{n}.toml")) for n in (1, 2, 3, 7)}
    assert [c.raft_config.id for c in nodes.values()] == [1, 2, 3, 7]
    assert nodes[1].raft_config.single and not nodes[1].raft_config.join
    assert nodes[1].admin_api_address == "127.0.0.1:28002"
    assert nodes[1].grpc_api_address == "127.0.0.1:9191"
    assert nodes[1].raft_advertise_address == "localhost:28004"
    assert (nodes[2].admin_api_address, nodes[2].grpc_api_address) == (
        "127.0.0.1:28201",
        "127.0.0.1:28202",
    )
    assert nodes[2].raft_advertise_address == "localhost:28203"
    assert nodes[2].raft_config.join == ("localhost:28004",)
    assert (nodes[3].admin_api_address, nodes[3].grpc_api_address) == (
        "127.0.0.1:28301",
        "127.0.0.1:28302",
    )
    assert nodes[3].raft_advertise_address == "localhost:28303"
    assert nodes[3].raft_config.join == ("localhost:28004", "localhost:28203")
    for config in nodes.values():
        assert config.log_dir.startswith("metadata/")
        assert config.raft_config.raft_dir.startswith("metadata/")
    addresses = [
        a for c in nodes.values() for a in (c.admin_api_address, c.grpc_api_address,
                                            c.raft_config.raft_listen_address)
    ]  # fmt: skip
    ports = [parse_address(a)[1] for a in addresses]
    assert len(set(ports)) == len(ports), "four nodes on one machine need distinct ports"
    dirs = [c.raft_config.raft_dir for c in nodes.values()] + [c.log_dir for c in nodes.values()]
    assert len(set(dirs)) == len(dirs)


def test_node_7_is_the_tutorial_text_verbatim() -> None:
    shipped = (ETC / "databend-meta-7.toml").read_text(encoding="utf-8")
    assert shipped.rstrip("\n") == TUTORIAL_NODE_7.rstrip("\n")


def test_node_7_matches_the_reference_tutorial() -> None:
    if not TUTORIAL.exists():
        pytest.skip(f"{TUTORIAL} is not on this machine (only in the development workspace)")
    text = TUTORIAL.read_text(encoding="utf-8")
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    assert block.rstrip("\n") == TUTORIAL_NODE_7.rstrip("\n")


def test_the_example_config_names_every_key() -> None:
    text = (ETC / "metanode.example.toml").read_text(encoding="utf-8")
    section = ""
    seen: set[str] = set()
    for line in text.splitlines():
        stripped = line.lstrip("# ").strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1] + "."
        elif "=" in stripped and not stripped.startswith(("-", "[")):
            name = stripped.split("=", 1)[0].strip()
            if name.isidentifier():
                seen.add(section + name)
    assert {key.dotted for key in KEYS} <= seen
    assert "[log.file]" in text and "[log.stderr]" in text and "[raft_config]" in text


def test_systemd_unit() -> None:
    text = (ETC / "metanode.service").read_text(encoding="utf-8")
    for line in (
        "Type=notify",  # READY=1 once ready, STOPPING=1 (metanode/node/sdnotify.py)
        "NotifyAccess=main",
        "TimeoutStartSec=infinity",
        "ExecStart=/usr/local/bin/metanode -c /etc/metanode/metanode.toml",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
    ):
        assert line in text.splitlines()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at this interpreter.
    text = (ETC / "metanode.service").read_text(encoding="utf-8")
    python = os.path.realpath(sys.executable)
    text = text.replace("/usr/local/bin/metanode", f"{python} -m metanode")
    unit = tmp_path / "metanode.service"
    unit.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "metanode.service" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ docs


def test_the_reference_documents_every_key_and_flag() -> None:
    text = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    for key in KEYS:  # one table row per key: | `name` | `--flag` | default | meaning |
        name = key.attr if key.path[0] == "raft_config" else key.dotted
        assert f"| `{name}` | `{key.flag}` |" in text, key.dotted
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    for flag in ("--cmd", "--leave-id", "--leave-via", "--config-file", CONFIG_FILE_ENV):
        assert flag in cli


# --------------------------------------------------------------------------- logging


@pytest.fixture
def clean_logging() -> Any:
    yield
    shutdown_logging()


def test_json_log_file(tmp_path: Path, clean_logging: None) -> None:
    config = load("--id", "4", "--log-dir", str(tmp_path / "logs"), "--log-level", "debug")
    configure_logging(config)
    logging.getLogger("metanode.raft").debug("%s became leader at term %d", 4, 5)
    logging.getLogger("metanode.storage").info("opened")
    shutdown_logging()
    path = Path(log_file_path(config))
    assert path.parent == tmp_path / "logs" and path.name == "metanode-4.log"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in records] == [
        ("DEBUG", "metanode.raft", "4 became leader at term 5"),
        ("INFO", "metanode.storage", "opened"),
    ]
    assert records[0]["timestamp"].endswith("+00:00")


def test_text_stderr_log_with_its_own_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_logging: None
) -> None:
    config = load("--id", "1", "--log-file-on=false", "--log-stderr-on",
                  "--log-stderr-level", "warn", "--log-dir", str(tmp_path / "unused"))  # fmt: skip
    configure_logging(config)
    logging.getLogger("metanode.node").info("not shown")
    logging.getLogger("metanode.api").warning("shown %d", 1)
    err = capsys.readouterr().err
    assert "not shown" not in err
    assert "WARNING metanode.api: shown 1" in err
    assert not (tmp_path / "unused").exists()


def test_both_outputs_off_print_nothing(
    capsys: pytest.CaptureFixture[str], clean_logging: None
) -> None:
    configure_logging(load("--id", "1", "--log-file-on=false"))
    logging.getLogger("metanode.node").error("silence")
    assert capsys.readouterr().err == ""


def test_configure_twice_replaces_and_shutdown_restores(
    tmp_path: Path, clean_logging: None
) -> None:
    logger = logging.getLogger("metanode")
    before = list(logger.handlers)
    config = load("--id", "1", "--log-dir", str(tmp_path))
    configure_logging(config)
    configure_logging(config)
    assert len(logger.handlers) == len(before) + 1
    shutdown_logging()
    assert logger.handlers == before
    assert logger.level == logging.NOTSET


def test_unwritable_log_dir_is_a_config_error(tmp_path: Path, clean_logging: None) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^log\.file\.dir: cannot write logs in"):
        configure_logging(load("--id", "1", "--log-dir", str(blocker / "logs")))
