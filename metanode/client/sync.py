"""`SyncMetaClient`: the same methods as `MetaClient`, blocking.

A dedicated thread runs a Trio event loop holding one `MetaClient`; each call is handed
to that loop with `trio.from_thread.run` and blocks until it finishes. Thread-safe:
calls from several threads share the one socket. Do not call it from inside the
client's own loop (nor, blocking it, from a Trio task: use `MetaClient` there).
"""

from __future__ import annotations

import builtins
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import trio

from metanode.client.client import Change, MetaClient, SeqV, TxnReply, Watch, WatchEvent
from metanode.client.errors import MetaError

T = TypeVar("T")


class SyncMetaClient:
    """`with SyncMetaClient(addresses, token=None, timeout=10, tls=None) as c: c.upsert(...)`.

    The constructor connects (raising `Unavailable` like `MetaClient.connect`);
    `close()` (or leaving the `with`) closes the socket and ends the thread."""

    def __init__(
        self, addresses: Iterable[str], token: str | None = None, timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._addresses = builtins.list(addresses)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: MetaClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, args=(token, timeout, tls), name="metanode-client", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error

    def _run(self, token: str | None, timeout: float, tls: ssl.SSLContext | None) -> None:
        try:
            trio.run(self._main, token, timeout, tls)
        except BaseException as e:  # reported by the constructor when connecting failed
            self._error = e
        finally:
            self._ready.set()

    async def _main(self, token: str | None, timeout: float, tls: ssl.SSLContext | None) -> None:
        self._stop = trio.Event()
        async with MetaClient.connect(self._addresses, token=token, timeout=timeout, tls=tls) as client:
            self._client = client
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        """Close the socket and end the thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()

    def __enter__(self) -> SyncMetaClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _do(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._closed or self._client is None:
            raise MetaError("the client is closed")
        try:
            return trio.from_thread.run(partial(fn, *args), trio_token=self._token)
        except trio.RunFinishedError:
            raise MetaError("the client is closed") from None

    @property
    def address(self) -> str | None:
        """The address of the current connection, if any."""
        return None if self._client is None else self._client.address

    def upsert(
        self,
        key: str,
        value: bytes | None,
        match_seq: int | Mapping[str, int] | None = None,
        ttl_ms: int | None = None,
        expire_at_ms: int | None = None,
    ) -> Change:
        assert self._client is not None
        return self._do(self._client.upsert, key, value, match_seq, ttl_ms, expire_at_ms)

    def delete(self, key: str, match_seq: int | Mapping[str, int] | None = None) -> Change:
        assert self._client is not None
        return self._do(self._client.delete, key, match_seq)

    def get(self, key: str, consistency: str = "linearizable") -> SeqV | None:
        assert self._client is not None
        return self._do(self._client.get, key, consistency)

    def mget(self, keys: Iterable[str], consistency: str = "linearizable") -> builtins.list[SeqV | None]:
        assert self._client is not None
        return self._do(self._client.mget, builtins.list(keys), consistency)

    def txn(
        self,
        conditions: Iterable[Mapping[str, Any]] = (),
        if_then: Iterable[Mapping[str, Any]] = (),
        else_then: Iterable[Mapping[str, Any]] = (),
    ) -> TxnReply:
        assert self._client is not None
        return self._do(
            self._client.txn, builtins.list(conditions), builtins.list(if_then), builtins.list(else_then)
        )

    def member_list(self) -> builtins.list[str]:
        assert self._client is not None
        return self._do(self._client.member_list)

    def cluster_status(self) -> dict[str, Any]:
        assert self._client is not None
        return self._do(self._client.cluster_status)

    def list(
        self, prefix: str, limit: int | None = None, consistency: str = "linearizable"
    ) -> builtins.list[tuple[str, SeqV]]:
        assert self._client is not None
        return self._do(self._client.list, prefix, limit, consistency)

    @contextmanager
    def watch(
        self,
        key: str,
        key_end: str | None = None,
        filter: str = "all",
        initial_flush: bool = False,
        from_seq: int | None = None,
        consistency: str = "linearizable",
    ) -> Iterator[SyncWatch]:
        """`with c.watch("a", key_end="b") as events: for ev in events: ...`: each
        `next` blocks until the next `WatchEvent` (pulled through the client's loop)."""
        assert self._client is not None
        client = self._client
        stack = AsyncExitStack()

        async def enter() -> Watch:
            return await stack.enter_async_context(
                client.watch(key, key_end, filter, initial_flush, from_seq, consistency)
            )

        watch = self._do(enter)
        try:
            yield SyncWatch(self, watch)
        finally:
            try:
                self._do(stack.aclose)
            except MetaError:
                pass  # the client closed first: the watch ended with it


class SyncWatch:
    """The blocking iterator of `SyncMetaClient.watch`; `flushed` is a bool here."""

    def __init__(self, client: SyncMetaClient, watch: Watch) -> None:
        self._client = client
        self._watch = watch

    def __iter__(self) -> SyncWatch:
        return self

    def __next__(self) -> WatchEvent:
        try:
            return self._client._do(self._watch.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    @property
    def flushed(self) -> bool:
        return self._watch.flushed.is_set()

    @property
    def last_seq(self) -> int | None:
        return self._watch.last_seq


__all__ = ["SyncMetaClient", "SyncWatch"]
