"""systemd's notification protocol (sd_notify) with the standard library only.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to a Unix datagram socket path; a
leading ``@`` means Linux's abstract namespace. metanode sends ``READY=1`` once it is
ready (metanode/node/ready.py) and ``STOPPING=1`` when it starts shutting down
(docs/operations/cluster.md#run-under-systemd). Without ``NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("metanode.node")

ENV = "NOTIFY_SOCKET"


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (``"READY=1"``, ``"STOPPING=1"``, ...) to systemd; True when sent.

    A missing ``NOTIFY_SOCKET`` is not an error (not run by systemd); a socket that
    cannot be reached is logged and ignored: the service keeps running.
    """
    path = (os.environ if env is None else env).get(ENV)
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify systemd (%s=%s) of %s: %s", ENV, path, state.split("\n")[0], exc)
        return False
    return True


__all__ = ["ENV", "notify"]
