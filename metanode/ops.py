"""Operator subcommands (SPEC §1, beyond databend-meta): `metanode kv|status|...`.

    metanode kv get KEY [--consistency local]      metanode status
    metanode kv put KEY VALUE [--match-seq N] [--ttl-ms MS]
    metanode kv delete KEY [--match-seq N]         metanode transfer-leader [--to ID]
    metanode kv list [PREFIX] [--limit N]          metanode trigger-snapshot

`kv` talks to the client API (`--addr`, repeatable, default 127.0.0.1:9191) through
`SyncMetaClient`; the others to a node's admin API (`--admin`, default
127.0.0.1:28002, `--token` for the ctrl routes). Output is JSON by default (values as
UTF-8 text, or `{"base64": ...}` when they are not text); `--format table` prints
aligned columns for people. Exit codes: 0 ok, 1 the operation failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from typing import Any

import urllib.error
import urllib.parse
import urllib.request

SUBCOMMANDS = ("kv", "status", "transfer-leader", "trigger-snapshot")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metanode", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("json", "table"), default="json")
    sub = parser.add_subparsers(dest="command", required=True)

    kv = sub.add_parser("kv", help="read and write keys through the client API")
    kv.add_argument("--addr", action="append", metavar="HOST:PORT",
                    help="client API address (grpc_api_address); repeatable; default 127.0.0.1:9191")
    kv.add_argument("--timeout", type=float, default=10.0)
    kv.add_argument("--format", choices=("json", "table"), default=argparse.SUPPRESS)
    kvs = kv.add_subparsers(dest="op", required=True)
    get = kvs.add_parser("get")
    get.add_argument("key")
    get.add_argument("--consistency", choices=("linearizable", "local"), default="linearizable")
    put = kvs.add_parser("put")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--match-seq", type=int)
    put.add_argument("--ttl-ms", type=int)
    delete = kvs.add_parser("delete")
    delete.add_argument("key")
    delete.add_argument("--match-seq", type=int)
    lst = kvs.add_parser("list")
    lst.add_argument("prefix", nargs="?", default="")
    lst.add_argument("--limit", type=int)
    lst.add_argument("--consistency", choices=("linearizable", "local"), default="linearizable")

    for name, help_ in (
        ("status", "GET /v1/cluster/status of a node"),
        ("transfer-leader", "ask the leader to hand over leadership"),
        ("trigger-snapshot", "make a node build a snapshot now"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--admin", default="127.0.0.1:28002", metavar="HOST:PORT", help="admin_api_address of a node")
        p.add_argument("--token", help="admin_api_token, for transfer-leader and trigger-snapshot")
        p.add_argument("--format", choices=("json", "table"), default=argparse.SUPPRESS)
        if name == "transfer-leader":
            p.add_argument("--to", type=int, help="the voter to hand over to (default: the most up-to-date)")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result = _kv(args) if args.command == "kv" else _admin(args)
    except _Failed as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 1
    _print(result, args.format)
    return 0


class _Failed(Exception):
    pass


def _kv(args: argparse.Namespace) -> Any:
    from metanode.client import MetaError, SyncMetaClient

    addresses = args.addr or ["127.0.0.1:9191"]
    try:
        with SyncMetaClient(addresses, timeout=args.timeout) as c:
            if args.op == "get":
                return _seqv(c.get(args.key, consistency=args.consistency))
            if args.op == "put":
                return _change(c.upsert(args.key, args.value.encode(), match_seq=args.match_seq, ttl_ms=args.ttl_ms))
            if args.op == "delete":
                return _change(c.delete(args.key, match_seq=args.match_seq))
            items = c.list(args.prefix, limit=args.limit, consistency=args.consistency)
            return [dict({"key": k}, **(_seqv(v) or {})) for k, v in items]
    except MetaError as e:
        raise _Failed(f"{type(e).__name__}: {e}") from None
    raise AssertionError(args.op)


def _admin(args: argparse.Namespace) -> Any:
    path = {
        "status": "/v1/cluster/status",
        "transfer-leader": "/v1/ctrl/trigger_transfer_leader",
        "trigger-snapshot": "/v1/ctrl/trigger_snapshot",
    }[args.command]
    query = f"?{urllib.parse.urlencode({'to': args.to})}" if getattr(args, "to", None) is not None else ""
    request = urllib.request.Request(f"http://{args.admin}{path}{query}")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, ctype, raw = r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, raw = e.code, e.headers.get("content-type", ""), e.read()
    except (urllib.error.URLError, OSError) as e:
        raise _Failed(f"cannot reach the admin API at {args.admin}: {e}") from None
    text = raw.decode("utf-8", "replace")
    body = json.loads(text) if ctype.startswith("application/json") else text
    if status != 200:
        raise _Failed(f"{args.admin}{path} answered {status}: {body}")
    return body
