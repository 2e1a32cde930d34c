"""`metanode export --addr HOST:PORT`: back up a running cluster (docs/reference/cli.md).

Asks one member's client API for an ``export`` stream (metanode/api/export_stream.py:
one consistent copy of its applied state at one log index, taken after a read barrier)
and writes the chunks as they come, in the format `metanode import` restores. A file
(``-o FILE``) is written to ``FILE.tmp``, checked line by line as an import would read
it, fsynced and renamed; stdout gets the bytes as they come.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

import msgpack
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from metanode.trio_util import single_errors

#: The largest message accepted from the node (a chunk is about 1 MiB).
MAX_MESSAGE = 64 << 20
REQUEST_ID = 1


class ExportFailed(Exception):
    """The export could not be taken (the message says why, in one line)."""


Progress = Callable[[int, int, int], None]  # keys so far, total keys, bytes so far


async def fetch_export(
    address: str,
    out: IO[bytes],
    *,
    token: str | None = None,
    timeout: float = 30.0,
    consistency: str = "linearizable",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Stream the export of the member at `address` (its ``grpc_api_address``) into
    `out`; the node's summary (``keys``, ``seq``, ``last_applied``, ``bytes``).
    `timeout` bounds the connect and each message. Raises `ExportFailed`."""
    url = f"ws://{address}/v1"
    stream: Any = None
    try:
        async with single_errors(), open_websocket_url(
            url, max_message_size=MAX_MESSAGE, receive_buffer_size=None, connect_timeout=timeout,
            disconnect_timeout=2,
        ) as ws:
            stream = ws._stream  # trio-websocket leaves its TCP stream open otherwise
            return await _export(ws, address, out, token, timeout, consistency, progress)
    except ConnectionClosed as e:
        raise ExportFailed(f"{address} closed the connection during the export: {e.reason}") from None
    except trio.TooSlowError:
        raise ExportFailed(f"{address}: no answer within {timeout:g} s") from None
    except (OSError, HandshakeError) as e:
        raise ExportFailed(f"cannot connect to {url}: {_describe(e)}") from None
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()


async def _export(
    ws: Any, address: str, out: IO[bytes], token: str | None, timeout: float, consistency: str,
    progress: Progress | None,
) -> dict[str, Any]:
    if token is not None:
        await _ask(ws, {"id": 0, "op": "handshake", "token": token}, timeout, address)
    await ws.send_message(msgpack.packb(
        {"id": REQUEST_ID, "op": "export", "consistency": consistency}, use_bin_type=True))
    written = 0
    while True:
        for message in await _receive(ws, timeout):
            if message.get("id") != REQUEST_ID:
                continue
            if "chunk" in message:
                chunk = message["chunk"]
                out.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(message.get("keys", 0), message.get("total_keys", 0), written)
            elif "error" in message:
                raise ExportFailed(_error_line(address, message["error"]))
            elif "ok" in message:
                return dict(message["ok"])


async def _receive(ws: Any, timeout: float) -> list[dict]:
    with trio.fail_after(timeout):
        raw = await ws.get_message()
    message = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    messages = message if isinstance(message, list) else [message]
    return [m for m in messages if isinstance(m, dict)]


async def _ask(ws: Any, request: dict, timeout: float, address: str) -> dict:
    await ws.send_message(msgpack.packb(request, use_bin_type=True))
    while True:
        for message in await _receive(ws, timeout):
            if message.get("id") == request["id"]:
                if "error" in message:
                    raise ExportFailed(_error_line(address, message["error"]))
                return message


def _error_line(address: str, error: Any) -> str:
    if not isinstance(error, dict):
        return f"{address}: {error}"
    leader = f" (leader: {error['leader']})" if error.get("leader") else ""
    return f"{address} refused: {error.get('code')}: {error.get('message')}{leader}"


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRejected):
        return f"it answered HTTP {e.status_code}, not a WebSocket: is it a client API (grpc_api_address)?"
    while isinstance(e, HandshakeError) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e) or type(e).__name__


def export_to_file(
    address: str, path: str, *, token: str | None, timeout: float, progress: Progress | None
) -> dict[str, Any]:
    """`fetch_export` into `path` (via ``path.tmp``, checked with the import's own
    reader, fsynced, renamed). Returns the summary; raises `ExportFailed` or
    `ValueError` (the written file does not read back) leaving no file behind."""
    from metanode.exportfmt import load_lines

    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            summary = trio.run(lambda: fetch_export(address, f, token=token, timeout=timeout, progress=progress))
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, encoding="utf-8") as f:
            exported = load_lines(f)
        keys = len(exported.kv)  # type: ignore[arg-type]
        if keys != summary.get("keys"):
            raise ValueError(f"{tmp}: {keys} keys written, the node sent {summary.get('keys')}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return summary


def export_to_stream(
    address: str, out: IO[bytes], *, token: str | None, timeout: float, progress: Progress | None
) -> dict[str, Any]:
    """`fetch_export` into `out` (stdout), written as the chunks come."""
    summary = trio.run(lambda: fetch_export(address, out, token=token, timeout=timeout, progress=progress))
    out.flush()
    return summary


__all__ = ["ExportFailed", "export_to_file", "export_to_stream", "fetch_export"]
