"""File-system helpers of the storage: durable writes, atomic replacement, the dir lock.

Blocking code, no trio. Durability rules used throughout `metanode.storage`:

- data appended to a file is durable after `fdatasync` (Linux flushes the size with
  it: it is needed to read the data back); `os.fsync` where `fdatasync` is missing;
- a new, renamed or deleted directory entry is durable after an fsync of the directory;
- a file is replaced atomically by writing a temporary file in the same directory,
  fsyncing it, renaming it over the target, then fsyncing the directory.

A failed fsync is never retried (the kernel may have dropped the dirty pages): the
caller turns it into `FatalError` and the node stops.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from metanode.errors import ConfigError

fdatasync = getattr(os, "fdatasync", os.fsync)
_IOV_MAX = 1024


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` at the file's position; `os.write` may write less."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_parts(fd: int, parts: list[bytes]) -> int:
    """Write the concatenation of `parts` with one `os.writev` (no joining copy);
    returns the bytes written. Finishes a short write with `write_all`."""
    total = sum(map(len, parts))
    if not parts:
        return 0
    n = os.writev(fd, parts) if len(parts) <= _IOV_MAX else 0
    if n < total:
        write_all(fd, b"".join(parts)[n:])
    return total


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (created, renamed, deleted files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_EVERY = 8 << 20  # write_file_atomic flushes every this many bytes


def write_file_atomic(path: Path, chunks: Iterable[bytes], tmp: Path | None = None) -> int:
    """Replace `path` with `chunks` atomically and durably; returns the bytes written.

    `tmp` (default ``<path>.tmp``) must be in the same directory. Raises `OSError`.
    """
    tmp = tmp or path.with_name(path.name + ".tmp")
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            unsynced = 0
            for chunk in chunks:
                for start in range(0, max(len(chunk), 1), SYNC_EVERY):
                    piece = memoryview(chunk)[start : start + SYNC_EVERY]
                    write_all(fd, piece)
                    written += len(piece)
                    unsynced += len(piece)
                    if unsynced >= SYNC_EVERY:
                        # A big file flushed in one go holds up the WAL's fsyncs behind
                        # it (a snapshot of a large state machine): flush as we go.
                        os.fdatasync(fd)
                        unsynced = 0
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return written


def describe_os_error(exc: OSError) -> str:
    """`[Errno 13] Permission denied` without the file name (we print our own)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    return f"{reason} ({name})" if name else reason


class DirLock:
    """An exclusive `flock` on ``<raft_dir>/LOCK``, held while a store is open.

    `flock` locks belong to the open file description, so a second `acquire` of the
    same directory fails even inside one process. The lock file holds the pid of
    its owner, for the error message of the next one.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, raft_dir: Path) -> DirLock:
        """Create `raft_dir` if missing and lock it; `ConfigError` naming the dir if
        it cannot be created or written, or another process holds the lock."""
        try:
            raft_dir.mkdir(parents=True, exist_ok=True)
            path = raft_dir / "LOCK"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"raft_dir {str(raft_dir)!r} is not usable: {describe_os_error(exc)}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.pread(fd, 32, 0).decode().strip())
                owner = f" (pid {pid})"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"raft_dir {str(raft_dir)!r} is in use: {path} is locked by another"
                    f" open store{owner}"
                ) from exc
            raise ConfigError(
                f"raft_dir {str(raft_dir)!r}: cannot lock {path}: {describe_os_error(exc)}"
            ) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"raft_dir {str(raft_dir)!r} is not writable: {describe_os_error(exc)}"
            ) from exc
        return cls(path, fd)

    def release(self) -> None:
        """Unlock (closing the file drops the lock). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
