"""The errors a client raises: `metanode.errors.ClientError` and its subclasses.

`MetaError` is `ClientError` itself, so `except MetaError` catches every error the
server reports and every failure of the client's own (no server reachable, an unknown
outcome). `error_from_wire` turns a reply's `error` map into one of them.
"""

from __future__ import annotations

from typing import Any

from metanode.errors import BadRequest, ClientError, NotLeader, TooLarge, Timeout, Unauthenticated, Unavailable

MetaError = ClientError

_BY_CODE: dict[str, type[ClientError]] = {
    cls.code: cls for cls in (NotLeader, Unavailable, TooLarge, Unauthenticated, BadRequest, Timeout)
}


class HistoryCompacted(BadRequest):
    """A watch cannot resume: the server no longer keeps the changes after its last
    revision. Watch again with `initial_flush=True` to get the current values."""


def error_from_wire(error: Any, address: str | None = None) -> MetaError:
    """The exception for a reply's `{"code", "message", "leader"}` (an unknown code or
    `internal` gives a plain `MetaError`); the message names the server that said it."""
    if not isinstance(error, dict):
        return MetaError(f"malformed error reply from {address}: {error!r}")
    code = error.get("code")
    message = error.get("message") or code or "error"
    if address is not None:
        message = f"{message} (from {address})"
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is NotLeader:
        leader = error.get("leader")
        return NotLeader(message, leader=leader if isinstance(leader, str) else None)
    if cls is None:  # `internal`, or a code this client does not know
        exc = MetaError(message)
        if isinstance(code, str):
            exc.code = code
        return exc
    return cls(message)


__all__ = [
    "BadRequest",
    "HistoryCompacted",
    "MetaError",
    "NotLeader",
    "Timeout",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "error_from_wire",
]
