"""``fusionfs.verify.verify_object`` (the ``user.fusionfs.verify`` hook, S-CHUNK-10) on a
LocalStore: every mode on a good chunked file and a plain one, then each fault it must name."""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest

from fusionfs.chunked import (
    FOSSILS_PREFIX,
    PACKS_PREFIX,
    ChunkPolicy,
    ChunkWriter,
    encode_manifest,
    pack_key,
    write_manifest,
)
from fusionfs.store import Key, LocalStore
from fusionfs.verify import verify_object

_POLICY = ChunkPolicy(page_size=4096, min_size=8192, avg_size=24576, max_size=65536)
_KEY = Key("snapshots/t/1/pages-1.img")


def _chunked(tmp_path: Path) -> tuple[LocalStore, bytes, list[bytes]]:
    store = LocalStore(tmp_path / "bucket")
    data = os.urandom(3 << 20)
    with ChunkWriter(store, policy=_POLICY, pack_size=1 << 20) as writer:
        for off in range(0, len(data), 1 << 18):
            writer.feed(off, data[off : off + (1 << 18)])
        manifest = writer.finish()
    write_manifest(store, _KEY, manifest)
    assert len(manifest.packs()) >= 2
    return store, encode_manifest(manifest)[-32:], manifest.packs()


def test_good_chunked_and_plain_files_verify_in_every_mode(tmp_path: Path) -> None:
    store, trailer, packs = _chunked(tmp_path)
    etag = store.head(_KEY).etag
    for mode in ("manifest", "quick", "full"):
        result = verify_object(store, _KEY, etag, mode)
        assert result["ok"], result
        assert result["layout"] == "chunked" and result["digest"] == trailer.hex()
        assert result["size"] == 3 << 20 and result["packs"] == len(packs)
    full = verify_object(store, _KEY, etag, "full")
    assert full["checked_bytes"] >= 3 << 20 and full["chunks"] > 10
    part = verify_object(store, _KEY, etag, "full", 0, 1 << 20)  # a range: fewer chunks
    assert part["ok"] and 0 < part["chunks"] < full["chunks"]
    store.put(Key("snapshots/t/1/core-1.img"), b"core bytes", {})
    plain = verify_object(store, Key("snapshots/t/1/core-1.img"), None, "full")
    assert plain["ok"] and plain["layout"] == "plain"
    assert plain["digest"] == blake3.blake3(b"core bytes").hexdigest()


@pytest.mark.allow_logs("failed verification; fetching it again")
def test_each_fault_is_named(tmp_path: Path) -> None:
    store, _, packs = _chunked(tmp_path)
    etag = store.head(_KEY).etag
    root = tmp_path / "bucket"
    path = root / pack_key(packs[1], PACKS_PREFIX)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    st = path.stat()
    path.write_bytes(bytes(blob))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_object(store, _KEY, etag, "quick")["ok"]  # quick reads no chunk
    full = verify_object(store, _KEY, etag, "full")
    assert not full["ok"] and "is corrupt" in full["problem"] and packs[1].hex() in full["problem"]

    path.write_bytes(bytes(blob[: len(blob) // 2]))  # short
    quick = verify_object(store, _KEY, etag, "quick")
    assert not quick["ok"] and "its chunks need" in quick["problem"]
    path.unlink()
    quick = verify_object(store, _KEY, etag, "quick")
    assert not quick["ok"] and f"pack {packs[1].hex()} is missing" in quick["problem"]

    manifest = root / _KEY
    manifest.write_bytes(manifest.read_bytes()[:100])
    changed = verify_object(store, _KEY, etag, "quick")
    assert not changed["ok"] and "changed in the store" in changed["problem"]
    broken = verify_object(store, _KEY, None, "quick")
    assert not broken["ok"] and broken["layout"] == "chunked", broken
    gone = verify_object(store, Key("snapshots/t/1/nope.img"), None, "quick")
    assert not gone["ok"] and "missing" in gone["problem"]


def test_quick_check_lists_many_packs_and_heads_only_what_the_listing_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "bucket")
    data = os.urandom(3 << 20)
    with ChunkWriter(store, policy=_POLICY, pack_size=64 << 10) as writer:
        for off in range(0, len(data), 1 << 18):
            writer.feed(off, data[off : off + (1 << 18)])
        manifest = writer.finish()
    write_manifest(store, _KEY, manifest)
    packs = manifest.packs()
    assert len(packs) >= 32
    etag = store.head(_KEY).etag
    calls = {"head": 0, "list": 0}
    head, list_ = store.head, store.list

    def counting_head(key: Key) -> Any:
        calls["head"] += 1
        return head(key)

    def counting_list(*args: Any, **kwargs: Any) -> Any:
        calls["list"] += 1
        return list_(*args, **kwargs)

    monkeypatch.setattr(store, "head", counting_head)
    monkeypatch.setattr(store, "list", counting_list)
    assert verify_object(store, _KEY, etag, "quick")["ok"]
    assert calls["list"] >= 1 and calls["head"] <= 2, calls  # the object's HEAD, no pack's

    root = tmp_path / "bucket"
    fossil = root / pack_key(packs[3], FOSSILS_PREFIX)  # set aside by GC: still counts
    fossil.parent.mkdir(parents=True, exist_ok=True)
    (root / pack_key(packs[3], PACKS_PREFIX)).rename(fossil)
    calls.update(head=0, list=0)
    assert verify_object(store, _KEY, etag, "quick")["ok"]
    assert calls["head"] <= 4, calls  # the object, then the one pack the listing missed (2 keys)

    short = root / pack_key(packs[-1], PACKS_PREFIX)
    short.write_bytes(short.read_bytes()[:10])
    quick = verify_object(store, _KEY, etag, "quick")
    assert not quick["ok"] and packs[-1].hex() in quick["problem"], quick
    assert "its chunks need" in quick["problem"]
    short.unlink()
    quick = verify_object(store, _KEY, etag, "quick")
    assert not quick["ok"] and f"pack {packs[-1].hex()} is missing" in quick["problem"], quick


def test_quick_check_asks_head_manifest_and_packs_listing_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S-CHUNK-10, what a restore waits for: with the version known, a quick check's HEAD, its
    manifest GET and the first page of the packs' listing are in flight together (each call
    below waits until all three have started: asked one after another, they would time out),
    and a file of few packs costs no HEAD of a pack."""
    store, trailer, packs = _chunked(tmp_path)
    etag = store.head(_KEY).etag
    started = threading.Barrier(3, timeout=5)
    calls: collections.Counter[str] = collections.Counter()

    def together(name: str, call: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            if calls[name] == 1:
                started.wait()
            return call(*args, **kwargs)

        return wrapped

    for name in ("head", "get_range", "list"):
        monkeypatch.setattr(store, name, together(name, getattr(store, name)))
    result = verify_object(store, _KEY, etag, "quick")
    assert result["ok"] and result["digest"] == trailer.hex(), result
    assert result["packs"] == len(packs) < 16
    assert calls == {"head": 1, "get_range": 1, "list": 1}, calls
    # a plain file: the early manifest GET is wasted, the verdict is the HEAD's
    store.put(Key("snapshots/t/1/core-1.img"), b"core bytes", {})
    plain_etag = store.head(Key("snapshots/t/1/core-1.img")).etag
    plain = verify_object(store, Key("snapshots/t/1/core-1.img"), plain_etag, "quick")
    assert plain["ok"] and plain["layout"] == "plain", plain
