"""The chunked layout through a real mount (docs/SEMANTICS.md, S-CHUNK rules).

A directory marked chunked (``fusionfs.client.set_layout``) gets a 64 MiB file written through
the kernel; after an unmount and a remount on an empty cache ("another machine") it reads back
identical, ``ls -l`` shows its logical size, ``.fusion`` is not listed, and a second file that
differs in 10 % of its pages stores few new bytes. Runs over a local directory and moto.
"""

from __future__ import annotations

import os
import random
import subprocess
from typing import Any

import pytest
from mount_support import Target

from fusionfs import client

pytestmark = pytest.mark.mount

MiB = 1 << 20
PAGE = 4096


def _memory_like(n: int, seed: int) -> bytes:
    """Pages of text, zeros and noise in runs of 64 pages (about 3x compressible)."""
    rng = random.Random(seed)
    out = bytearray()
    run = 64 * PAGE
    while len(out) < n:
        kind = rng.randrange(3)
        if kind == 0:
            line = f"record {len(out)} {rng.randrange(10**9)}\n".encode()
            out += (line * (run // len(line) + 1))[:run]
        elif kind == 1:
            out += bytes(run)
        else:
            out += rng.randbytes(run)
    return bytes(out[:n])


def _change_pages(data: bytes, fraction: float, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    n = len(data) // PAGE
    run = 256  # 1 MiB stretches, as a program rewriting some arrays does
    for _ in range(int(n * fraction) // run):
        start = rng.randrange(0, n - run)
        out[start * PAGE : (start + run) * PAGE] = rng.randbytes(run * PAGE)
    return bytes(out)


@pytest.mark.timeout(240)
def test_chunked_dir_through_a_mount(fusion_mount: Any, target: Target) -> None:
    """S-CHUNK-1..4: write, remount on an empty cache, read back; sizes; hidden .fusion."""
    m = fusion_mount(target.source, target.mount_args)
    snap = m.path / "snaps"
    snap.mkdir()
    client.set_layout(snap)
    (snap / "1").mkdir()
    data = _memory_like(64 * MiB, seed=1)
    path = snap / "1" / "pages-1.img"
    with open(path, "wb") as f:
        for off in range(0, len(data), MiB):
            f.write(data[off : off + MiB])
    assert os.stat(path).st_size == len(data)
    first = client.chunk_stats(snap / "1")
    assert first["logical_bytes"] == len(data)
    assert first["new_stored_bytes"] < 0.8 * len(data)  # compressed

    # a second dump: 10 % of the pages changed, in another directory de-duplicated from the first
    (snap / "2").mkdir()
    client.dedup_from(snap / "2", snap / "1")
    changed = _change_pages(data, 0.10, seed=2)
    (snap / "2" / "pages-1.img").write_bytes(changed)
    second = client.chunk_stats(snap / "2")
    # the changed pages are random (incompressible): count in logical terms
    assert second["reused_logical_bytes"] >= 0.8 * len(data), second
    assert second["new_stored_bytes"] <= 0.15 * len(data), second

    m.remount(fresh_cache=True)
    assert sorted(os.listdir(m.path)) == ["snaps"]  # .fusion is hidden
    assert not os.path.exists(m.path / ".fusion")
    listing = subprocess.run(
        ["ls", "-l", str(snap / "1")], capture_output=True, text=True, check=True
    ).stdout
    assert f" {len(data)} " in listing, listing
    assert os.stat(path).st_size == len(data)
    with open(path, "rb") as f:
        back = b"".join(iter(lambda: f.read(MiB), b""))
    assert back == data
    assert (snap / "2" / "pages-1.img").read_bytes() == changed
    assert os.getxattr(snap, "user.fusionfs.layout") == b"chunked"  # persisted
    assert client.layout_of(snap) == "chunked" and client.layout_of(m.path) == "plain"
    if target.kind == "s3":
        meta = target.metadata("snaps/1/pages-1.img")
        assert meta.get("fusion-size") == str(len(data))
    manifest = target.get("snaps/1/pages-1.img")
    assert manifest is not None and len(manifest) < len(data) // 100
    assert any(k.startswith(".fusion/packs/") for k in target.keys(".fusion/"))
