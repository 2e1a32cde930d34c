"""Operator subcommands (contract §1, beyond databend-meta): `metanode kv|status|...`.

    metanode kv get KEY [--consistency local]      metanode status
    metanode kv put KEY VALUE [--match-seq N] [--ttl-ms MS]
    metanode kv delete KEY [--match-seq N]         metanode transfer-leader [--to ID]
    metanode kv list [PREFIX] [--limit N]          metanode trigger-snapshot
    metanode kv watch KEY [--key-end E] [--filter F] [--initial-flush] [--from-seq N] [--count N]
    metanode export --addr HOST:PORT [-o FILE]      (a running cluster)
    metanode export --raft-dir D [-o FILE]          (a stopped node)
    metanode import --raft-dir D --id N --initial-cluster ID=HOST:PORT ... [-i FILE] [--format databend]
    metanode bench [--addr HOST:PORT ...] [--concurrency 1,16,64] [--seconds 5] [--runs 1] [--format json]

`kv` talks to the client API (`--addr`, repeatable, default 127.0.0.1:9191) through
`SyncMetaClient` (`--token` for grpc_api_token; `--tls-ca FILE`, and `--tls-cert`/
`--tls-key` when a client certificate is wanted, for a client API on wss://); the others
to a node's admin API (`--admin`, default 127.0.0.1:28002, `--token` for the ctrl
routes; https:// with `--tls-ca` or `--admin https://HOST:PORT`). `export --addr` backs
up a running cluster through a member's client API (`metanode.online_export`); `export
--raft-dir` and `import` work offline on a data dir (`metanode.backup`, format in
`metanode.exportfmt`; `import --format databend` reads `databend-metactl export` files,
`metanode.databend_import`). `bench` (`metanode.bench`, its own parser) measures a
running cluster or a local one it starts. Output is JSON by default (values as UTF-8
text, or `{"base64": ...}` when they are not text); `--format table` prints aligned
columns for people. Exit codes: 0 ok, 1 the operation failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import urllib.error
import urllib.parse
import urllib.request

SUBCOMMANDS = ("kv", "status", "transfer-leader", "trigger-snapshot", "export", "import", "bench")


def _value(data: bytes) -> Any:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _seqv(v: Any) -> dict | None:
    if v is None:
        return None
    return {"seq": v.seq, "data": _value(v.data), "expire_at_ms": v.expire_at_ms}


def _change(c: Any) -> dict:
    return {"prev": _seqv(c.prev), "result": _seqv(c.result)}


def _print(obj: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(obj, ensure_ascii=False))
        return
    rows: list[list[str]]
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        cols = list(obj[0])
        rows = [cols] + [[json.dumps(r.get(c), ensure_ascii=False) if not isinstance(r.get(c), str) else r[c] for c in cols] for r in obj]
    elif isinstance(obj, dict):
        rows = [["field", "value"]] + [[k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)] for k, v in obj.items()]
    else:
        print(json.dumps(obj, ensure_ascii=False))
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


_TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key")


def _add_tls_arguments(p: argparse.ArgumentParser, what: str, *, suffix: str = "", leaf: bool = False) -> None:
    """--tls-ca, --tls-cert, --tls-key (docs/operations/security.md)."""
    default = argparse.SUPPRESS if leaf else None
    p.add_argument("--tls-ca", metavar="FILE", dest="tls_ca" + suffix, default=default,
                   help=f"CA certificate that issued the certificate of {what}: speak TLS, verifying it"
                        " (default: plaintext)")
    p.add_argument("--tls-cert", metavar="FILE", dest="tls_cert" + suffix, default=default,
                   help="client certificate to present when the server asks for one (implies TLS)")
    p.add_argument("--tls-key", metavar="FILE", dest="tls_key" + suffix, default=default,
                   help="private key of --tls-cert")


def _tls_context(args: argparse.Namespace, *, https: bool = False) -> Any:
    """The client TLS context of --tls-ca/--tls-cert/--tls-key (the system's CAs when
    only `https` asks for TLS); None for plaintext."""
    ca, cert, key = (getattr(args, name, None) for name in _TLS_OPTIONS)
    if ca is None and cert is None and key is None and not https:
        return None
    from metanode.errors import ConfigError
    from metanode.tls import client_context

    try:
        return client_context(ca, cert, key)
    except ConfigError as e:
        raise _Usage(str(e)) from None


def add_client_options(p: argparse.ArgumentParser, *, leaf: bool) -> None:
    """The client API connection options of `kv`: on `kv` itself and again on each
    `kv` subcommand, so they may come after its positional arguments (``kv get k
    --addr A``; the subcommand's values are kept in ``*_after`` and merged)."""
    suffix = "_after" if leaf else ""
    p.add_argument("--addr", action="append", metavar="HOST:PORT", dest="addr" + suffix,
                   default=argparse.SUPPRESS if leaf else None,
                   help="client API address (grpc_api_address); repeatable; default 127.0.0.1:9191")
    p.add_argument("--timeout", type=float, dest="timeout" + suffix, metavar="SECONDS",
                   default=argparse.SUPPRESS if leaf else 10.0, help="seconds per request (default 10)")
    p.add_argument("--token", dest="token" + suffix, default=argparse.SUPPRESS if leaf else None,
                   help="grpc_api_token, when the client API requires one")
    _add_tls_arguments(p, "the client API (wss://)", suffix=suffix, leaf=leaf)
    p.add_argument("--format", choices=("json", "table"), default=argparse.SUPPRESS,
                   help="output: JSON (default) or a table for people")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metanode", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("json", "table"), default="json")
    sub = parser.add_subparsers(dest="command", required=True)

    kv = sub.add_parser("kv", help="read and write keys through the client API", allow_abbrev=False)
    add_client_options(kv, leaf=False)
    kvs = kv.add_subparsers(dest="op", required=True)

    def leaf(name: str, **kw: Any) -> argparse.ArgumentParser:
        p = kvs.add_parser(name, allow_abbrev=False, **kw)
        add_client_options(p, leaf=True)
        return p

    get = leaf("get")
    get.add_argument("key")
    get.add_argument("--consistency", choices=("linearizable", "local"), default="linearizable")
    put = leaf("put", help="write a value; exit 1 when --match-seq did not match (nothing written)")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--match-seq", type=_nonneg_int, help="write only if the key's seq is this (0: absent)")
    put.add_argument("--ttl-ms", type=_nonneg_int)
    delete = leaf("delete")
    delete.add_argument("key")
    delete.add_argument("--match-seq", type=_nonneg_int, help="delete only if the key's seq is this")
    watch = leaf("watch", help="print changes as JSON lines until interrupted (Ctrl-C) or --count")
    watch.add_argument("key")
    watch.add_argument("--key-end", help="watch the range [key, key-end) instead of one key")
    watch.add_argument("--filter", choices=("all", "update", "delete"), default="all")
    watch.add_argument("--initial-flush", action="store_true", help="print the current values first")
    watch.add_argument("--from-seq", type=_nonneg_int, help="resume after this revision")
    watch.add_argument("--count", type=_nonneg_int, help="stop after this many events")
    lst = leaf("list")
    lst.add_argument("prefix", nargs="?", default="")
    lst.add_argument("--limit", type=_nonneg_int)
    lst.add_argument("--consistency", choices=("linearizable", "local"), default="linearizable")

    for name, help_ in (
        ("status", "GET /v1/cluster/status of a node"),
        ("transfer-leader", "ask the leader to hand over leadership"),
        ("trigger-snapshot", "make a node build a snapshot now"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--admin", default="127.0.0.1:28002", metavar="HOST:PORT", help="admin_api_address of a node")
        p.add_argument("--token", help="admin_api_token, for transfer-leader and trigger-snapshot")
        _add_tls_arguments(p, "the admin API (https://)")
        p.add_argument("--format", choices=("json", "table"), default=argparse.SUPPRESS)
        if name == "transfer-leader":
            p.add_argument("--to", type=int, help="the voter to hand over to (default: the most up-to-date)")

    exp = sub.add_parser("export", allow_abbrev=False,
                         help="back up a running cluster (--addr) or a stopped node's data dir (--raft-dir)")
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument("--addr", metavar="HOST:PORT",
                        help="a member's client API (grpc_api_address): an online, consistent backup")
    source.add_argument("--raft-dir", metavar="DIR", help="the data dir of a stopped node (offline)")
    exp.add_argument("-o", "--output", metavar="FILE", help="write here (replaced atomically) instead of stdout")
    exp.add_argument("--token", help="grpc_api_token of the cluster, with --addr")
    exp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="with --addr: for the connection and for each part of the stream (default 30)")
    # listed for --help only: `bench` is parsed by metanode.bench (see _main)
    sub.add_parser("bench", add_help=False, help="throughput, latency and CPU per op (metanode bench --help)")
    imp = sub.add_parser("import", help="build a new data dir from an export (offline)")
    imp.add_argument("--raft-dir", required=True, metavar="DIR", help="a new or empty dir")
    imp.add_argument("--id", required=True, type=int, help="this node's id; must be in --initial-cluster")
    imp.add_argument("--initial-cluster", required=True, nargs="+", action="extend", metavar="ID=HOST:PORT",
                     help="every voter of the new cluster with its raft address; the same list on every member")
    imp.add_argument("-i", "--input", metavar="FILE", help="read the export from here instead of stdin")
    imp.add_argument("--format", dest="input_format", choices=("metanode", "databend"), default="metanode",
                     help="the export's format: metanode's (default), or a `databend-metactl export` file")
    ids = imp.add_mutually_exclusive_group()
    ids.add_argument("--new-cluster-id", action="store_true",
                     help="give the cluster a new random id instead of the export's (one-node clusters;"
                          " give every member the same --cluster-id otherwise)")
    ids.add_argument("--cluster-id", help="give the cluster this id instead of the export's")
    imp.add_argument("--cluster-name", help="the cluster name (default: the export's); must match the nodes' config")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one operator subcommand; the exit code (0 ok, 1 failed, 2 bad usage,
    130 interrupted by Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C (ends `kv watch`): no traceback; 130 as a shell reports SIGINT.
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the line the terminal echoed ^C on
        return 130
    except BrokenPipeError:
        # `| head` closed our stdout: point it at devnull so the exit flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


def _main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "bench":  # its own parser: metanode.bench
        from metanode.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.command in ("export", "import"):
        return _offline(args)
    if args.command == "kv":
        args.addr = (args.addr or []) + getattr(args, "addr_after", [])
        args.timeout = getattr(args, "timeout_after", args.timeout)
        for name in ("token", *_TLS_OPTIONS):  # given after the subcommand: those win
            setattr(args, name, getattr(args, name + "_after", getattr(args, name)))
    try:
        result = _kv(args) if args.command == "kv" else _admin(args)
    except _Failed as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 1
    except _Usage as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 2
    if result is _NOTHING:
        return 0
    if args.command == "status" and args.format == "table" and isinstance(result, dict):
        print("\n".join(status_table(result)))
    else:
        _print(result, args.format)
    if isinstance(result, _NotApplied):
        print(f"metanode: error: {result.why}", file=sys.stderr)
        return 1
    return 0


class _NotApplied(dict):
    """A change that a --match-seq kept from being applied: printed, then exit 1."""

    def __init__(self, change: dict, why: str) -> None:
        super().__init__(change)
        self.why = why


def _checked(change: dict, key: str, op: str, match_seq: int | None) -> dict:
    """`change` (``{"prev", "result"}``) as is, or `_NotApplied` when a --match-seq
    did not match: then nothing changed and ``prev == result``."""
    if match_seq is None or change["prev"] != change["result"]:
        return change
    if op == "delete" and change["prev"] is None and match_seq == 0:
        return change  # deleting an absent key "if absent": nothing to do, as asked
    seq = change["prev"]["seq"] if change["prev"] else 0
    return _NotApplied(change, f"kv {op} {key!r}: not applied: --match-seq {match_seq}, but the key's seq is {seq}"
                       + (" (absent)" if seq == 0 else ""))


def _log_id(lid: Any) -> str:
    """``{"leader_id": {"term": T, ...}, "index": I}`` as ``T-I``; ``-`` for null."""
    if not isinstance(lid, dict):
        return "-"
    return f"{lid.get('leader_id', {}).get('term', '?')}-{lid.get('index', '?')}"


def _endpoint(node: Any) -> str:
    endpoint = node.get("endpoint") if isinstance(node, dict) else None
    if not isinstance(endpoint, dict):
        return "-"
    addr = str(endpoint.get("addr"))
    return f"[{addr}]:{endpoint.get('port')}" if ":" in addr else f"{addr}:{endpoint.get('port')}"


def status_table(st: dict) -> list[str]:
    """`metanode status --format table`: this node on two lines, then one row per
    member (the status document is described in docs/reference/admin-api.md)."""
    leader = st.get("leader") or {}
    log = st.get("raft_log") or {}
    lines = [
        (
            f"node {st.get('id')}: {st.get('state')}, term {st.get('current_term')}, "
            f"leader {leader.get('name', '-')}, raft {st.get('endpoint')}, cluster {st.get('cluster_id')}, "
            f"{st.get('binary_version')}, data {st.get('data_version')}"
        ),
        (
            f"log: last {st.get('last_log_index')}, applied {_log_id(st.get('last_applied'))}, "
            f"snapshot {_log_id(st.get('snapshot_last_log_id'))}, purged {_log_id(st.get('purged'))}, "
            f"seq {st.get('last_seq')}, keys {st.get('snapshot_key_count')}, "
            f"wal {log.get('wal_total_size')} bytes in {(log.get('wal_closed_chunk_count') or 0) + 1} segments"
        ),
        "",
    ]
    replication = st.get("replication")
    rows = [["name", "raft", "role", "leader"] + (["matched"] if isinstance(replication, dict) else [])]
    members = [(n, "voter") for n in st.get("voters") or []] + [(n, "learner") for n in st.get("non_voters") or []]
    for node, role in members:
        name = str(node.get("name"))
        row = [name, _endpoint(node), role, "*" if name == leader.get("name") else ""]
        if isinstance(replication, dict):
            row.append(_log_id(replication.get(name)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


class _Failed(Exception):
    pass


class _Usage(Exception):
    pass


def _kv(args: argparse.Namespace) -> Any:
    from metanode.client import MetaError, SyncMetaClient

    addresses = args.addr or ["127.0.0.1:9191"]
    tls = _tls_context(args)
    try:
        with SyncMetaClient(addresses, token=args.token, timeout=args.timeout, tls=tls) as c:
            if args.op == "get":
                return _seqv(c.get(args.key, consistency=args.consistency))
            if args.op == "put":
                # os.fsencode: the value's bytes as given, even when they are not UTF-8
                change = _change(c.upsert(args.key, os.fsencode(args.value), match_seq=args.match_seq,
                                          ttl_ms=args.ttl_ms))
                return _checked(change, args.key, "put", args.match_seq)
            if args.op == "delete":
                return _checked(_change(c.delete(args.key, match_seq=args.match_seq)), args.key, "delete",
                                args.match_seq)
            if args.op == "watch":
                _watch(c, args)
                return _NOTHING
            items = c.list(args.prefix, limit=args.limit, consistency=args.consistency)
            return [dict({"key": k}, **(_seqv(v) or {})) for k, v in items]
    except MetaError as e:
        raise _Failed(f"{type(e).__name__}: {e}") from None
    except (ValueError, TypeError) as e:  # a bad --addr, --timeout, --match-seq, ...
        raise _Usage(str(e)) from None
    raise AssertionError(args.op)


_NOTHING = object()  # the command printed its own output


def _watch(c: Any, args: argparse.Namespace) -> None:
    seen = 0
    with c.watch(args.key, key_end=args.key_end, filter=args.filter, initial_flush=args.initial_flush,
                 from_seq=args.from_seq) as events:
        for ev in events:
            print(json.dumps({"key": ev.key, "seq": ev.seq, "init": ev.init, "prev": _seqv(ev.prev),
                              "current": _seqv(ev.current)}, ensure_ascii=False), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return


def _admin(args: argparse.Namespace) -> Any:
    path = {
        "status": "/v1/cluster/status",
        "transfer-leader": "/v1/ctrl/trigger_transfer_leader",
        "trigger-snapshot": "/v1/ctrl/trigger_snapshot",
    }[args.command]
    query = f"?{urllib.parse.urlencode({'to': args.to})}" if getattr(args, "to", None) is not None else ""
    scheme, sep, admin = args.admin.partition("://")
    if not sep:  # a bare HOST:PORT: https when a TLS option is given
        tls_given = any(getattr(args, name) is not None for name in _TLS_OPTIONS)
        scheme, admin = ("https" if tls_given else "http"), args.admin
    if scheme not in ("http", "https"):
        raise _Usage(f"--admin: expected HOST:PORT or https://HOST:PORT, got {args.admin!r}")
    context = _tls_context(args, https=scheme == "https")
    if scheme == "http" and context is not None:
        raise _Usage("--admin: http:// cannot be combined with --tls-ca/--tls-cert/--tls-key")
    request = urllib.request.Request(f"{scheme}://{admin}{path}{query}")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            status, ctype, raw = r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, raw = e.code, e.headers.get("content-type", ""), e.read()
    except (urllib.error.URLError, OSError) as e:
        raise _Failed(f"cannot reach the admin API at {args.admin}: {e}") from None
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text) if ctype.startswith("application/json") else text
    except ValueError:
        body = text
    if status != 200:
        raise _Failed(f"{args.admin}{path} answered {status}: {_error_text(body)}")
    return body


def _error_text(body: Any) -> str:
    """An admin API error body (``{"error": message, ...}``) as one human line."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        extra = ", ".join(f"{k}: {v}" for k, v in body.items() if k != "error" and v is not None)
        return body["error"] + (f" ({extra})" if extra else "")
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return " ".join(text.split())[:500] or "(empty answer)"


# ---------------------------------------------------------------- export / import


def _progress(what: str) -> Any:
    """A progress callback printing to stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    return lambda n: print(f"metanode: {what} {n} keys", file=sys.stderr, flush=True)


def _parse_initial_cluster(items: Sequence[str]) -> dict[int, tuple[str, int]]:
    from metanode.config import parse_address
    from metanode.errors import ConfigError

    out: dict[int, tuple[str, int]] = {}
    for item in items:
        id_text, sep, address = item.partition("=")
        if not sep or not id_text.isdigit() or int(id_text) < 0:
            raise ConfigError(f"--initial-cluster: expected ID=HOST:PORT with a positive ID, got {item!r}")
        try:
            host, port = parse_address(address)
        except ValueError as e:
            raise ConfigError(f"--initial-cluster: {item!r}: {e}") from None
        if port == 0:
            raise ConfigError(f"--initial-cluster: {item!r}: port 0 cannot be reached (1..65535)")
        if int(id_text) in out:
            raise ConfigError(f"--initial-cluster: node {id_text} is listed twice")
        out[int(id_text)] = (host, port)
    return out


def _offline(args: argparse.Namespace) -> int:
    from metanode.errors import ConfigError, FatalError

    try:
        if args.command == "export":
            _export(args)
        else:
            _import(args)
    except ConfigError as e:
        print(f"metanode {args.command}: error: {e}", file=sys.stderr)
        return 2
    except _Failed as e:
        print(f"metanode {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (FatalError, ValueError, OSError) as e:
        print(f"metanode {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> None:
    if args.addr is not None:
        _export_online(args)
        return
    if args.token is not None:
        from metanode.errors import ConfigError

        raise ConfigError("--token: only with --addr (an offline export reads the data dir)")

    from metanode import backup, exportfmt

    exported, sm = backup.read_state(args.raft_dir)
    progress = _progress("exported")

    def write(out: Any) -> None:
        n = 0
        for line in exportfmt.dump_lines(exported):
            out.write(line)
            if progress is not None and line.startswith('{"type": "kv"'):
                n += 1
                if n % 100_000 == 0:
                    progress(n)
        out.flush()

    if args.output is None:
        write(sys.stdout)
    else:
        tmp = f"{args.output}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            os.fsync(f.fileno())
        os.replace(tmp, args.output)
    print(f"metanode export: {len(sm)} keys, seq {sm.last_seq}, applied {exported.last_applied}"
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)


def _export_online(args: argparse.Namespace) -> None:
    from metanode.config import parse_address
    from metanode.errors import ConfigError
    from metanode.online_export import ExportFailed, export_to_file, export_to_stream

    try:
        parse_address(args.addr)
    except ValueError as e:
        raise ConfigError(f"--addr: {e}") from None
    progress = None
    if sys.stderr.isatty():
        def progress(keys: int, total: int, nbytes: int) -> None:
            print(f"\rmetanode export: {keys}/{total} keys, {nbytes / (1 << 20):.1f} MiB", end="",
                  file=sys.stderr, flush=True)
    try:
        if args.output is None:
            summary = export_to_stream(args.addr, sys.stdout.buffer, token=args.token, timeout=args.timeout,
                                       progress=progress)
        else:
            summary = export_to_file(args.addr, args.output, token=args.token, timeout=args.timeout,
                                     progress=progress)
    except ExportFailed as e:
        raise _Failed(str(e)) from None
    finally:
        if progress is not None:
            print(file=sys.stderr)
    la = summary.get("last_applied") or {}
    print(f"metanode export: {summary.get('keys')} keys, seq {summary.get('seq')}, applied"
          f" {la.get('term')}-{la.get('index')} from {args.addr}"
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)


def _import(args: argparse.Namespace) -> None:
    import uuid
    from pathlib import Path

    from metanode import backup, exportfmt
    from metanode.errors import ConfigError

    cluster = _parse_initial_cluster(args.initial_cluster)
    if args.id not in cluster:
        raise ConfigError(f"--id: {args.id} is not in --initial-cluster {sorted(cluster)}")
    if not backup.is_empty_dir(Path(args.raft_dir)):
        raise ConfigError(f"--raft-dir: {args.raft_dir!r} is not empty: import only into a new or empty dir")
    source = args.input or "stdin"
    if args.input_format == "databend":
        from metanode.databend_import import load_databend_lines as load
    else:
        load = exportfmt.load_lines
    try:
        if args.input is None:
            exported = load(sys.stdin, _progress("read"))
        else:
            with open(args.input, encoding="utf-8") as f:
                exported = load(f, _progress("read"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if exported.cluster_id is None and args.cluster_id is None and not args.new_cluster_id and len(cluster) > 1:
        raise ConfigError(
            "--cluster-id: the export names no cluster id (a databend-metactl export, or a dir never"
            " initialized): give every member the same --cluster-id ID"
        )
    sm = backup.write_state(
        args.raft_dir, exported, node_id=args.id, initial_cluster=cluster,
        cluster_id=uuid.uuid4().hex if args.new_cluster_id else args.cluster_id,
        cluster_name=args.cluster_name,
    )
    print(f"metanode import: {len(sm)} keys, seq {sm.last_seq} into {args.raft_dir} as node {args.id}"
          f" of {sorted(cluster)}", file=sys.stderr)
