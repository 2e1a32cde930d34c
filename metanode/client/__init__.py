"""The Python client of metanode (contract §6; docs/guide/client.md).

```python
async with MetaClient.connect(["127.0.0.1:9191"]) as c:
    await c.upsert("k", b"v")
with SyncMetaClient(["127.0.0.1:9191"]) as c:
    c.get("k")
```
"""

from metanode.client.client import Change, MetaClient, SeqV, TxnReply, Watch, WatchEvent
from metanode.client.errors import (
    BadRequest,
    HistoryCompacted,
    MetaError,
    NotLeader,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from metanode.client.sync import SyncMetaClient

__all__ = [
    "BadRequest",
    "Change",
    "HistoryCompacted",
    "MetaClient",
    "MetaError",
    "NotLeader",
    "SeqV",
    "SyncMetaClient",
    "Timeout",
    "TooLarge",
    "TxnReply",
    "Unauthenticated",
    "Unavailable",
    "Watch",
    "WatchEvent",
]
