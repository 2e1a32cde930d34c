"""The error hierarchy (design §6). Pure: importable from raft/, wire/ and sm/."""


class MetanodeError(Exception):
    """Base of every error metanode raises on purpose."""


class ConfigError(MetanodeError):
    """Bad configuration or usage; the message names the key or flag. Exit code 2."""


class ClientError(MetanodeError):
    """An error a client sees; serializable as a code plus a message."""

    code = "internal"


class NotLeader(ClientError):
    """This node cannot serve the request because it is not the leader."""

    code = "not_leader"

    def __init__(self, message: str = "not the leader", leader: int | str | None = None) -> None:
        # A node id inside a node; the leader's "host:port" once it crossed the wire.
        super().__init__(message)
        self.leader = leader


class Unavailable(ClientError):
    code = "unavailable"


class TooLarge(ClientError):
    code = "too_large"


class Unauthenticated(ClientError):
    code = "unauthenticated"


class BadRequest(ClientError):
    code = "bad_request"


class Timeout(ClientError):
    code = "timeout"


class TransportError(MetanodeError):
    """A connection-level failure; never escapes a connection task."""


class FatalError(MetanodeError):
    """Corrupt storage, failed fsync: the node stops loudly."""


class SnapshotFailed(MetanodeError):
    """A snapshot built here could not be written (a full disk): nothing else was
    touched (the WAL, the current snapshot), so the node keeps serving and tries again."""


class RaftInvariantError(AssertionError):
    """A bug of ours inside raft/: an invariant of the algorithm was broken."""
