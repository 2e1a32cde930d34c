"""The client API's `export` op at the protocol level (docs/reference/client-protocol.md):
chunks of whole export lines, then the summary; what it streams reads back as an export."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import trio

from metanode.api import export_stream
from metanode.exportfmt import load_lines
from tests.net import until
from tests.runtime.test_client_api import Cluster, ask

pytestmark = pytest.mark.runtime


async def test_export_streams_chunks_of_whole_lines_then_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_stream, "CHUNK_BYTES", 300)  # several chunks for a few keys
    c = Cluster(tmp_path)
    with trio.fail_after(30):
        async with c.node(1, "--single") as n1, c.socket(1) as ws:
            await until(lambda: n1.core.is_leader)
            for i in range(20):
                assert "ok" in await ask(ws, id=i, op="upsert", key=f"k/{i:02d}", value=b"v" * i)
            await ws.send_message(msgpack.packb({"id": 99, "op": "export"}, use_bin_type=True))
            chunks, final = [], None
            while final is None:
                m = msgpack.unpackb(await ws.get_message(), raw=False)
                assert m["id"] == 99
                if "chunk" in m:
                    chunks.append(m)
                else:
                    final = m
            bad = await ask(ws, id=100, op="export", consistency="nonsense")
    assert len(chunks) > 3 and all(m["chunk"].endswith(b"\n") for m in chunks)
    assert [m["total_keys"] for m in chunks] == [20] * len(chunks) and chunks[-1]["keys"] == 20
    exported = load_lines(b"".join(m["chunk"] for m in chunks).decode().splitlines())
    assert [(k, v.seq, v.data) for k, v in exported.kv] == [(f"k/{i:02d}", i + 1, b"v" * i) for i in range(20)]
    assert final["ok"]["keys"] == 20 and final["ok"]["seq"] == 20
    assert final["ok"]["bytes"] == sum(len(m["chunk"]) for m in chunks)
    assert final["ok"]["last_applied"]["index"] == exported.last_applied.index
    assert bad["error"]["code"] == "bad_request"
