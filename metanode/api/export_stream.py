"""The client API's ``export`` op: an online backup (docs/reference/client-protocol.md).

A member takes one consistent copy of its applied state at one log index, after a
read barrier (so it holds at least everything the leader had committed when the
request arrived), and streams it in the `metanode export` format (metanode/exportfmt.py),
the one `metanode import` restores:

    {"id": n, "chunk": <bytes: whole JSON lines>, "keys": K, "total_keys": T}   (repeated)
    {"id": n, "ok": {"keys": T, "seq": S, "last_applied": {"term", "index"}, "bytes": B}}

The copy is taken in one step (the values are immutable: a list of references), so
writes applied while it streams are not in it; the stream is paced by the socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from metanode.exportfmt import ExportedState, dump_lines

#: Bytes of export lines per chunk message.
CHUNK_BYTES = 1 << 20


def snapshot_state(node: Any) -> ExportedState:
    """The applied state of `node` now, as one consistent `ExportedState` (never waits)."""
    sm = node.sm
    membership = node.applied_membership
    meta = node.meta
    return ExportedState(
        cluster_id=meta.cluster_id if meta is not None else None,
        cluster_name=meta.cluster_name if meta is not None else node.config.raft_config.cluster_name,
        node_id=node.id,
        last_applied=node.applied,
        voters=tuple(sorted(membership.voter_ids)),
        learners=tuple(sorted(membership.learners)),
        nodes=sm.nodes(),
        seq=sm.last_seq,
        log_time_ms=sm.log_time_ms,
        kv=list(sm.items()),
    )


async def stream_export(
    node: Any, rid: int, send: Callable[[dict], Awaitable[None]], chunk_bytes: int | None = None
) -> dict:
    """Send `node`'s state as chunk messages of request `rid` (of about `chunk_bytes`,
    default `CHUNK_BYTES`); the final result."""
    limit = chunk_bytes or CHUNK_BYTES
    exported = snapshot_state(node)
    total = len(exported.kv)  # type: ignore[arg-type]
    parts: list[str] = []
    size = keys = sent = 0

    async def flush() -> None:
        nonlocal parts, size, sent
        data = "".join(parts).encode("utf-8")
        await send({"id": rid, "chunk": data, "keys": keys, "total_keys": total})
        sent += len(data)
        parts, size = [], 0

    for line in dump_lines(exported):
        parts.append(line)
        size += len(line)
        if line.startswith('{"type": "kv"'):
            keys += 1
        if size >= limit:
            await flush()
    if parts:
        await flush()
    la = exported.last_applied
    return {"keys": total, "seq": exported.seq, "last_applied": {"term": la.term, "index": la.index}, "bytes": sent}


__all__ = ["CHUNK_BYTES", "snapshot_state", "stream_export"]
