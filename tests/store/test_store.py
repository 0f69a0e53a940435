"""One suite against every store: LocalStore, S3Store on a moto server, FaultyStore(LocalStore).

The shared tests (``store`` fixture) hold every backend to the same contract. Directory markers
are created explicitly where listings are compared, because LocalStore has one for every
directory while S3 has only those somebody put. Backend-specific behaviour (LocalStore's
natural mapping, S3Store's error translation and retries, FaultyStore's injections,
``open_store``) follows in its own sections.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import http.client
import io
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import urllib3.exceptions
from botocore.response import StreamingBody
from helpers import free_port, wait_for
from s3servers import S3Server, bucket_on

from fusionfs.stats import Stats
from fusionfs.store import (
    ETag,
    FaultyStore,
    Key,
    LocalStore,
    NotFound,
    NotSupported,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    Transient,
    UploadPart,
    iter_list,
    open_store,
)
from fusionfs.store.faulty import OPS
from fusionfs.store.s3 import S3Store, _Payload, translate_error

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
K = Key  # short alias for readability below


def _data(n: int, seed: int = 0) -> bytes:
    pattern = bytes((i * 7 + seed) % 251 for i in range(4096))
    return (pattern * (n // len(pattern) + 1))[:n]


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def _s3_store(bucket: Any, **kwargs: Any) -> S3Store:
    return S3Store(
        bucket.name, endpoint_url=bucket.endpoint, region="us-east-1", deadline_s=10, **kwargs
    )


@pytest.fixture
def stats() -> Stats:
    return Stats()


@pytest.fixture(params=["local", "moto", "faulty", "s3rver", "rgw"])
def store(
    request: pytest.FixtureRequest,
    local_root: Path,
    stats: Stats,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ObjectStore]:
    """Each backend in turn, empty, reporting to the ``stats`` fixture: S3Store on moto, on
    s3rver and on Ceph RGW (``<name>_server``, whose credentials go into the environment for
    the test)."""
    if request.param == "local":
        yield LocalStore(local_root, stats=stats)
    elif request.param == "faulty":
        yield FaultyStore(LocalStore(local_root, stats=stats))
    elif request.param == "moto":
        bucket = request.getfixturevalue("s3_bucket")
        s3 = _s3_store(bucket, stats=stats)
        try:
            yield s3
        finally:
            s3.close()
    else:
        server: S3Server = request.getfixturevalue(f"{request.param}_server")
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        with bucket_on(server) as bucket:
            s3 = _s3_store(bucket, stats=stats)
            if request.param == "s3rver":
                _S3RVER_STORES.add(s3)
            try:
                yield s3
            finally:
                s3.close()


@pytest.fixture
def s3_store(s3_bucket: Any) -> Iterator[S3Store]:
    s3 = _s3_store(s3_bucket, stats=Stats())
    try:
        yield s3
    finally:
        s3.close()


def _is_s3(store: ObjectStore) -> bool:
    return isinstance(store, S3Store)


_S3RVER_STORES: weakref.WeakSet[S3Store] = weakref.WeakSet()


def _is_s3rver(store: ObjectStore) -> bool:
    """S3Store on s3rver, whose documented differences (S-SRV-5) some tests allow for."""
    return store in _S3RVER_STORES


def _page_items(
    store: ObjectStore, prefix: str, delimiter: str | None, max_keys: int
) -> tuple[list[list[str]], list[str]]:
    """All pages of a listing: (items per page, in order), and the flat list of items."""
    pages: list[list[str]] = []
    token: str | None = None
    for _ in range(1000):
        page = store.list(K(prefix), delimiter=delimiter, continuation=token, max_keys=max_keys)
        items: list[str] = sorted(
            [str(o.key) for o in page.objects] + [str(p) for p in page.prefixes],
            key=lambda k: k.encode(),
        )
        pages.append(items)
        token = page.continuation
        if token is None:
            break
    else:
        raise AssertionError("listing never ended")
    return pages, [item for page in pages for item in page]


# ============================================================================================
# the shared contract


def test_is_an_object_store(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    assert store.description
    assert "testing" not in store.description  # the dummy secret key never shows


def test_check_passes_on_a_usable_store(store: ObjectStore) -> None:
    store.check()


def test_put_head_and_metadata(store: ObjectStore) -> None:
    data = _data(1000)
    etag = store.put(K("a/b.txt"), data, {"Color": "Blue", "x-y": "1"})
    info = store.head(K("a/b.txt"))
    assert info.key == "a/b.txt"
    assert info.size == 1000
    assert info.etag == etag
    assert info.metadata == {"color": "Blue", "x-y": "1"}
    assert abs(info.mtime_ns - time.time_ns()) < 3600 * 10**9
    assert store.get_range(K("a/b.txt"), 0, 1000) == data


def test_get_head_is_head_plus_the_first_bytes(store: ObjectStore) -> None:
    data = _data(1000)
    etag = store.put(K("small"), data, {"mode": "33188"})
    info, first = store.get_head(K("small"), 4096)
    assert (info.key, info.size, info.etag) == ("small", 1000, etag)
    assert info.metadata == {"mode": "33188"}
    assert info == store.head(K("small"))
    assert first == data
    info, first = store.get_head(K("small"), 100)  # bigger than asked: the size is still whole
    assert info.size == 1000 and first == data[:100]
    store.put(K("empty"), b"")
    info, first = store.get_head(K("empty"), 4096)
    assert info.size == 0 and first == b""
    with pytest.raises(NotFound):
        store.get_head(K("nope"), 4096)


def test_put_memoryview_and_empty(store: ObjectStore) -> None:
    data = _data(3000)
    store.put(K("mv"), memoryview(data)[1000:2000])
    assert store.get_range(K("mv"), 0, 5000) == data[1000:2000]
    store.put(K("empty"), b"")
    info = store.head(K("empty"))
    assert info.size == 0
    assert info.metadata == {}
    assert store.get_range(K("empty"), 0, 10) == b""


def test_put_of_several_buffers_stores_them_back_to_back(store: ObjectStore) -> None:
    """A tuple body (a pack of chunks) is stored as if joined, empty pieces included."""
    data = _data(300_000, 3)
    pieces = (data[:1000], b"", memoryview(data)[1000:250_000], bytearray(data[250_000:]))
    etag = store.put(K("t"), pieces)
    assert store.head(K("t")).size == len(data) and store.head(K("t")).etag == etag
    assert store.get_range(K("t"), 0, len(data) + 10) == data
    store.put(K("t0"), ())
    assert store.head(K("t0")).size == 0


def test_payload_reads_and_seeks_across_its_buffers() -> None:
    payload = _Payload((b"abc", b"", memoryview(b"defgh")[1:], b"ij"))
    assert len(payload) == 9
    assert bytes(payload.read(2)) == b"ab"
    assert bytes(payload.read(5)) == b"c"  # a read stops at the end of a buffer
    assert bytes(payload.read(3)) == b"efg" and payload.tell() == 6
    assert bytes(payload.read()) == b"hij" and bytes(payload.read(4)) == b""
    assert payload.seek(4) == 4 and bytes(payload.read(1)) == b"f"
    assert payload.seek(-2, 2) == 7 and bytes(payload.read(10)) == b"ij"
    assert payload.seek(0) == 0 and bytes(payload.read()) == b"abcefghij"


def test_overwrite_changes_etag_and_replaces_metadata(store: ObjectStore) -> None:
    first = store.put(K("f"), b"one", {"k": "v"})
    second = store.put(K("f"), b"two")
    assert first != second
    info = store.head(K("f"))
    assert info.etag == second
    assert info.metadata == {}
    assert store.get_range(K("f"), 0, 10) == b"two"


def test_same_size_rewrites_get_new_etags(store: ObjectStore) -> None:
    etags = [store.put(K("same"), bytes([i]) * 10) for i in range(20)]
    assert len(set(etags)) == len(etags)


def test_get_range_middle_end_and_past_end(store: ObjectStore) -> None:
    data = _data(10_000)
    store.put(K("r"), data)
    assert store.get_range(K("r"), 1000, 500) == data[1000:1500]
    assert store.get_range(K("r"), 9000, 5000) == data[9000:]  # short only at the end
    assert store.get_range(K("r"), 10_000, 10) == b""
    assert store.get_range(K("r"), 20_000, 10) == b""
    assert store.get_range(K("r"), 5, 0) == b""
    assert store.get_range(K("r"), 0, 10_000) == data


def test_get_into_streams_ranges(store: ObjectStore) -> None:
    data = _data(3 * MiB + 123)
    store.put(K("big"), data)
    out = io.BytesIO()
    assert store.get_into(K("big"), 0, len(data), out) == len(data)
    assert out.getvalue() == data
    out = io.BytesIO()
    assert store.get_into(K("big"), MiB - 7, MiB + 20, out) == MiB + 20
    assert out.getvalue() == data[MiB - 7 : 2 * MiB + 13]
    out = io.BytesIO()
    assert store.get_into(K("big"), len(data) - 10, 100, out) == 10
    assert out.getvalue() == data[-10:]
    assert store.get_into(K("big"), len(data) + 1, 100, io.BytesIO()) == 0


def test_if_match_fails_after_overwrite(store: ObjectStore) -> None:
    old = store.put(K("v"), b"version one")
    assert store.get_range(K("v"), 0, 7, etag=old) == b"version"
    new = store.put(K("v"), b"version two")
    with pytest.raises(PreconditionFailed):
        store.get_range(K("v"), 0, 7, etag=old)
    with pytest.raises(PreconditionFailed):
        store.get_into(K("v"), 0, 7, io.BytesIO(), etag=old)
    assert store.get_range(K("v"), 8, 3, etag=new) == b"two"


def test_not_found_everywhere(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.head(K("nope"))
    with pytest.raises(NotFound):
        store.get_range(K("nope"), 0, 10)
    with pytest.raises(NotFound):
        store.get_into(K("nope"), 0, 10, io.BytesIO())
    with pytest.raises(NotFound):
        store.copy(K("nope"), K("dst"))
    with pytest.raises(NotFound):
        store.head(K("dir/nope"))
    store.delete(K("nope"))  # deleting an absent key is fine
    store.abort_multipart(K("nope"), "0123456789abcdef")  # so is aborting an unknown upload
    page = store.list(K("nope/"))
    assert page.objects == [] and page.prefixes == [] and page.continuation is None


def _populate_tree(store: ObjectStore) -> None:
    for marker in ("dir/", "dir/sub/", "other/"):
        store.put(K(marker), b"")
    for key in ("top.txt", "dir/a.txt", "dir/b.txt", "dir/sub/c.txt", "dirx.txt", "other/d"):
        store.put(K(key), key.encode())


def test_list_with_delimiter_rolls_up_prefixes(store: ObjectStore) -> None:
    _populate_tree(store)
    page = store.list(K(""))
    assert [o.key for o in page.objects] == ["dirx.txt", "top.txt"]
    assert page.prefixes == ["dir/", "other/"]
    assert page.continuation is None
    assert {o.key: o.size for o in page.objects} == {"dirx.txt": 8, "top.txt": 7}
    assert all(o.metadata is None and o.etag for o in page.objects)

    page = store.list(K("dir/"))
    assert [o.key for o in page.objects] == ["dir/", "dir/a.txt", "dir/b.txt"]
    assert page.prefixes == ["dir/sub/"]

    page = store.list(K("di"))
    assert [o.key for o in page.objects] == ["dirx.txt"]
    assert page.prefixes == ["dir/"]

    page = store.list(K("dir/s"))
    assert page.objects == [] and page.prefixes == ["dir/sub/"]

    page = store.list(K("dir/sub/c"))
    assert [o.key for o in page.objects] == ["dir/sub/c.txt"]


def test_list_without_delimiter_is_flat_and_sorted(store: ObjectStore) -> None:
    _populate_tree(store)
    page = store.list(K(""), delimiter=None)
    keys = [o.key for o in page.objects]
    assert keys == [
        "dir/",
        "dir/a.txt",
        "dir/b.txt",
        "dir/sub/",
        "dir/sub/c.txt",
        "dirx.txt",
        "other/",
        "other/d",
        "top.txt",
    ]
    assert page.prefixes == []
    page = store.list(K("dir/"), delimiter=None)
    assert [o.key for o in page.objects] == [
        "dir/",
        "dir/a.txt",
        "dir/b.txt",
        "dir/sub/",
        "dir/sub/c.txt",
    ]


def test_list_order_is_by_utf8_bytes(store: ObjectStore) -> None:
    keys = ["Z", "a.txt", "a/", "a/x", "a0", "b", "\u00e4b", "\u00e4/", "\u00e4/\u20ac", "~"]
    for key in keys:
        store.put(K(key), b"")
    _, items = _page_items(store, "", None, 1000)
    assert items == sorted(keys, key=lambda k: k.encode())
    page = store.list(K(""), delimiter=None)
    listed = [o.key for o in page.objects]
    if _is_s3rver(store):  # S-SRV-5: s3rver lists in its directory walk's order
        listed.sort(key=lambda k: k.encode())
    assert listed == sorted(keys, key=lambda k: k.encode())


def test_pagination_is_complete_and_ordered(store: ObjectStore) -> None:
    # moto takes 10-20 ms per PUT on this 2-core machine (2500 keys: ~30-50 s), so the S3 run
    # uses 250 keys in pages of 100: the same continuation-token path, a tenth of the keys.
    count, max_keys = (250, 100) if _is_s3(store) else (2500, 1000)
    keys = [f"many/{i}" for i in range(count)]  # not zero-padded: order is by bytes
    store.put(K("many/"), b"")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put(K(k), b"x"), keys))
    expected = sorted(["many/", *keys], key=lambda k: k.encode())

    pages, items = _page_items(store, "many/", None, max_keys)
    sizes = [len(p) for p in pages]
    assert sizes == [max_keys, max_keys, count + 1 - 2 * max_keys]
    assert items == expected

    pages, items = _page_items(store, "many/", "/", max_keys)
    assert items == expected

    all_items = [o.key for p in iter_list(store, K("many/"), delimiter=None) for o in p.objects]
    assert all_items == expected


def test_pagination_counts_prefixes(store: ObjectStore) -> None:
    store.put(K("p/"), b"")
    for i in range(5):
        store.put(K(f"p/d{i}/"), b"")
        store.put(K(f"p/d{i}/x"), b"x")
        store.put(K(f"p/d{i}/y"), b"y")
    for i in range(3):
        store.put(K(f"p/f{i}"), b"f")
    pages, items = _page_items(store, "p/", "/", 2)
    expected = ["p/", *[f"p/d{i}/" for i in range(5)], *[f"p/f{i}" for i in range(3)]]
    assert items == expected
    # S-SRV-5: s3rver counts MaxKeys over keys only, not over the rolled-up prefixes
    assert [len(p) for p in pages] == ([7, 2] if _is_s3rver(store) else [2, 2, 2, 2, 1])


def test_delete(store: ObjectStore) -> None:
    store.put(K("d/x"), b"1")
    store.delete(K("d/x"))
    with pytest.raises(NotFound):
        store.head(K("d/x"))
    store.delete(K("d/x"))
    store.put(K("e/"), b"")
    store.head(K("e/"))
    store.delete(K("e/"))
    with pytest.raises(NotFound):
        store.head(K("e/"))


def test_copy_keeps_or_replaces_metadata(store: ObjectStore) -> None:
    data = _data(5000)
    etag = store.put(K("src"), data, {"a": "1"})
    store.copy(K("src"), K("dst/kept"))
    assert store.get_range(K("dst/kept"), 0, 10_000) == data
    assert store.head(K("dst/kept")).metadata == {"a": "1"}
    new_etag = store.copy(K("src"), K("dst/replaced"), metadata={"B": "2"}, src_etag=etag)
    info = store.head(K("dst/replaced"))
    assert info.metadata == {"b": "2"}
    assert info.etag == new_etag
    assert store.get_range(K("dst/replaced"), 0, 10_000) == data
    store.copy(K("src"), K("dst/emptied"), metadata={})
    assert store.head(K("dst/emptied")).metadata == {}
    assert store.head(K("src")).etag == etag  # the source is untouched


def test_copy_with_stale_src_etag_fails(store: ObjectStore) -> None:
    old = store.put(K("src"), b"old")
    store.put(K("src"), b"new")
    with pytest.raises(PreconditionFailed):
        store.copy(K("src"), K("dst"), src_etag=old)
    with pytest.raises(NotFound):
        store.head(K("dst"))


def test_multipart_upload(store: ObjectStore) -> None:
    parts_data = [_data(5 * MiB, 1), _data(5 * MiB, 2), _data(1234, 3)]
    upload = store.create_multipart(K("mp/obj"), {"Kind": "multi"})
    # uploaded out of order, and part 2 twice (the later one wins)
    p3 = store.upload_part(K("mp/obj"), upload, 3, parts_data[2])
    store.upload_part(K("mp/obj"), upload, 2, b"wrong" * 1000)
    p2 = store.upload_part(K("mp/obj"), upload, 2, memoryview(parts_data[1]))
    p1 = store.upload_part(K("mp/obj"), upload, 1, parts_data[0])
    assert (p1.number, p2.number, p3.number) == (1, 2, 3)
    with pytest.raises(NotFound):
        store.head(K("mp/obj"))  # nothing is visible before completion
    etag = store.complete_multipart(K("mp/obj"), upload, [p3, p1, p2])
    info = store.head(K("mp/obj"))
    assert info.size == sum(map(len, parts_data))
    assert info.etag == etag
    assert info.metadata == {"kind": "multi"}
    whole = b"".join(parts_data)
    assert store.get_range(K("mp/obj"), 0, len(whole)) == whole
    assert store.get_range(K("mp/obj"), 5 * MiB - 3, 6) == whole[5 * MiB - 3 : 5 * MiB + 3]


def test_etags_from_writes_are_those_head_and_list_show(store: ObjectStore) -> None:
    """[S-STORE-1] The ETag put, copy and complete_multipart return is the one HEAD and LIST
    give for the object (RGW answers a completion with an empty ETag and a copy with an
    unquoted one)."""
    returned = {
        "put": store.put(K("put"), _data(1000)),
        "copy": store.copy(K("put"), K("copy"), metadata={"m": "1"}),
    }
    upload = store.create_multipart(K("mp"))
    src = store.put(K("src"), _data(6 * MiB, 4))
    second = (  # s3rver has no UploadPartCopy (S-SRV-5): a plain part there
        store.upload_part(K("mp"), upload, 2, _data(6 * MiB, 4))
        if _is_s3rver(store)
        else store.upload_part_copy(K("mp"), upload, 2, K("src"), 0, 6 * MiB, src_etag=src)
    )
    parts = [store.upload_part(K("mp"), upload, 1, _data(5 * MiB, 5)), second]
    returned["mp"] = store.complete_multipart(K("mp"), upload, parts)
    listed = {str(o.key): o.etag for o in store.list(K(""), delimiter=None).objects}
    for key, etag in returned.items():
        assert etag, key
        assert store.head(K(key)).etag == etag, key
        assert listed[key] == etag, key
        assert store.get_range(K(key), 0, 10, etag=etag) == store.get_range(K(key), 0, 10)


def test_multipart_small_middle_part_is_refused(store: ObjectStore) -> None:
    upload = store.create_multipart(K("small"))
    p1 = store.upload_part(K("small"), upload, 1, b"a" * 100)
    p2 = store.upload_part(K("small"), upload, 2, b"b" * 100)
    if _is_s3rver(store):  # S-SRV-5: s3rver accepts it (fusionfs never sends one)
        store.abort_multipart(K("small"), upload)
        return
    with pytest.raises(StoreError):
        store.complete_multipart(K("small"), upload, [p1, p2])
    store.abort_multipart(K("small"), upload)
    with pytest.raises(NotFound):
        store.head(K("small"))


def test_multipart_abort(store: ObjectStore) -> None:
    upload = store.create_multipart(K("ab"))
    store.upload_part(K("ab"), upload, 1, b"data")
    store.abort_multipart(K("ab"), upload)
    store.abort_multipart(K("ab"), upload)  # twice is fine
    with pytest.raises(NotFound):
        store.head(K("ab"))
    assert store.list(K(""), delimiter=None).objects == []


def test_upload_part_copy(store: ObjectStore) -> None:
    src = _data(6 * MiB, 9)
    src_etag = store.put(K("src"), src)
    upload = store.create_multipart(K("grown"))
    if _is_s3rver(store):  # S-WRITE-5: s3rver has no UploadPartCopy; callers fall back
        with pytest.raises(NotSupported):
            store.upload_part_copy(K("grown"), upload, 1, K("src"), 0, 5 * MiB)
        return
    p1 = store.upload_part_copy(K("grown"), upload, 1, K("src"), 0, 5 * MiB, src_etag=src_etag)
    p2 = store.upload_part(K("grown"), upload, 2, b"appended")
    store.complete_multipart(K("grown"), upload, [p1, p2])
    assert store.get_range(K("grown"), 0, 10 * MiB) == src[: 5 * MiB] + b"appended"


def test_upload_part_copy_with_stale_etag(
    store: ObjectStore, request: pytest.FixtureRequest
) -> None:
    old = store.put(K("src"), _data(6 * MiB))
    store.put(K("src"), _data(6 * MiB, 1))
    upload = store.create_multipart(K("dst"))
    try:
        if _is_s3rver(store):  # no UploadPartCopy at all (S-WRITE-5)
            with pytest.raises(NotSupported):
                store.upload_part_copy(K("dst"), upload, 1, K("src"), 0, 5 * MiB, src_etag=old)
        elif _is_s3(store):
            # moto and RGW 16 ignore x-amz-copy-source-if-match on UploadPartCopy: check that
            # we send it, at least
            sent = _capture_params(store, "UploadPartCopy")
            store.upload_part_copy(K("dst"), upload, 1, K("src"), 0, 5 * MiB, src_etag=old)
            assert sent[0]["CopySourceIfMatch"] == old
        else:
            with pytest.raises(PreconditionFailed):
                store.upload_part_copy(K("dst"), upload, 1, K("src"), 0, 5 * MiB, src_etag=old)
    finally:
        store.abort_multipart(K("dst"), upload)


def test_long_key_component(store: ObjectStore) -> None:
    if _is_s3rver(store):
        pytest.skip(
            "S-SRV-5: s3rver cannot store a key component of 234+ bytes (a PUT of 241+ kills it)"
        )
    key = K("long/" + "n" * 250)
    store.put(K("long/"), b"")
    store.put(key, b"long name")
    assert store.head(key).size == 9
    assert store.get_range(key, 0, 100) == b"long name"
    assert [o.key for o in store.list(K("long/")).objects] == ["long/", key]


@pytest.mark.allow_logs("the server cannot do CopyObject")
def test_copy_of_keys_holding_equals_signs(store: ObjectStore) -> None:
    """S-SRV-2: a copy from a key holding "=" (s3rver answers NoSuchKey: its copy-source
    decoding) is done through this host, metadata replaced or kept as asked; a source that is
    really gone is still NotFound."""
    data = _data(3000)
    etag = store.put(K("m/a2V5="), data, {"mode": "33188"})
    new = store.copy(K("m/a2V5="), K("m/a2V5="), metadata={"mode": "33200"}, src_etag=etag)
    info = store.head(K("m/a2V5="))
    assert info.metadata == {"mode": "33200"} and info.etag == new
    assert store.get_range(K("m/a2V5="), 0, 10_000) == data
    store.copy(K("m/a2V5="), K("m/x=y/kept"))  # metadata kept
    assert store.head(K("m/x=y/kept")).metadata == {"mode": "33200"}
    assert store.get_range(K("m/x=y/kept"), 0, 10_000) == data
    store.put(K("m/e="), b"")
    store.copy(K("m/e="), K("m/e="), metadata={"mode": "33152"})
    assert store.head(K("m/e=")).metadata == {"mode": "33152"}
    if _is_s3(store):  # moto copies server-side; only s3rver needed the fallback
        assert store.limits == ({"CopyObject of some keys"} if _is_s3rver(store) else set())
    store.put(K("m/a2V5="), b"replaced")
    with pytest.raises(PreconditionFailed):
        store.copy(K("m/a2V5="), K("m/z"), src_etag=new)
    with pytest.raises(NotFound):
        store.copy(K("m/gone="), K("m/z"))


def test_keys_with_spaces_and_unicode(store: ObjectStore) -> None:
    key = K("dir with space/\u00fc \u20ac+%20&?.txt")
    store.put(K("dir with space/"), b"")
    store.put(key, b"x", {"m": "v"})
    assert store.head(key).metadata == {"m": "v"}
    assert [o.key for o in store.list(K("dir with space/")).objects] == ["dir with space/", key]
    assert store.list(K("")).prefixes == ["dir with space/"]


def test_requests_are_counted(store: ObjectStore, stats: Stats) -> None:
    store.put(K("c"), b"12345")
    store.get_range(K("c"), 0, 5)
    store.head(K("c"))
    assert stats.requests.get("put") == 1
    assert stats.requests.get("get_range") == 1
    assert stats.requests.get("head") == 1
    assert stats.bytes_uploaded == 5
    assert stats.bytes_fetched == 5


# ============================================================================================
# LocalStore: the natural mapping onto a directory


def test_local_existing_files_appear_as_they_are(local_root: Path) -> None:
    (local_root / "docs").mkdir()
    (local_root / "docs" / "readme.md").write_bytes(b"hello")
    (local_root / "top").write_bytes(b"t")
    store = LocalStore(local_root)
    page = store.list(K(""))
    assert [o.key for o in page.objects] == ["top"]
    assert page.prefixes == ["docs/"]
    assert store.get_range(K("docs/readme.md"), 0, 5) == b"hello"
    assert store.head(K("docs/")).size == 0
    with pytest.raises(NotFound):
        store.head(K("docs"))  # the directory is the key "docs/", not "docs"
    with pytest.raises(NotFound):
        store.head(K("top/"))


def test_local_put_creates_files_and_parents(local_root: Path) -> None:
    store = LocalStore(local_root)
    store.put(K("x/y/z.bin"), b"zz")
    assert (local_root / "x" / "y" / "z.bin").read_bytes() == b"zz"
    store.put(K("m/"), b"")
    assert (local_root / "m").is_dir()
    with pytest.raises(StoreError):
        store.put(K("n/"), b"not empty")
    with pytest.raises(StoreError):
        store.put(K("x/y/z.bin/below"), b"")  # a file is in the way
    assert not list((local_root / ".fusionfs-tmp").glob("tmp-*"))  # no temp file left


def test_local_delete_of_directory_markers(local_root: Path) -> None:
    store = LocalStore(local_root)
    store.put(K("full/file"), b"1")
    store.delete(K("full/"))  # not empty: a no-op
    assert (local_root / "full" / "file").exists()
    store.delete(K("full"))  # the key "full" does not exist
    assert (local_root / "full").is_dir()
    store.delete(K("full/file"))
    store.delete(K("full/"))
    assert not (local_root / "full").exists()


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "./a", "a/./b", "../x", "a/../../b", "a/..", "nul\0byte"]
)
def test_local_rejects_keys_escaping_root(local_root: Path, key: str) -> None:
    store = LocalStore(local_root)
    with pytest.raises(StoreError) as info:
        store.put(K(key), b"x")
    assert not isinstance(info.value, NotFound)
    with pytest.raises(StoreError):
        store.head(K(key))
    assert not (local_root.parent / "x").exists()


def test_local_hides_its_own_directory(local_root: Path) -> None:
    store = LocalStore(local_root)
    store.put(K("a"), b"1")
    upload = store.create_multipart(K("b"))
    store.upload_part(K("b"), upload, 1, b"x")
    assert (local_root / ".fusionfs-tmp").is_dir()
    assert [o.key for o in store.list(K(""), delimiter=None).objects] == ["a"]
    assert store.list(K(".fusionfs-tmp/"), delimiter=None).objects == []
    with pytest.raises(NotFound):
        store.head(K(".fusionfs-tmp/uploads/"))
    with pytest.raises(StoreError):
        store.put(K(".fusionfs-tmp/x"), b"")


def test_local_etag_follows_outside_changes(local_root: Path) -> None:
    store = LocalStore(local_root)
    etag = store.put(K("f"), b"abc")
    path = local_root / "f"
    with open(path, "r+b") as f:  # an in-place rewrite by another program, same size
        f.write(b"xyz")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert store.head(K("f")).etag != etag
    with pytest.raises(PreconditionFailed):
        store.get_range(K("f"), 0, 3, etag=etag)
    assert store.get_range(K("f"), 0, 3) == b"xyz"


def test_local_special_files_and_symlinks(local_root: Path) -> None:
    os.mkfifo(local_root / "fifo")
    (local_root / "real").write_bytes(b"target")
    (local_root / "dir").mkdir()
    os.symlink("real", local_root / "link")
    os.symlink("dir", local_root / "dirlink")
    os.symlink("missing", local_root / "dangling")
    store = LocalStore(local_root)
    page = store.list(K(""))
    assert [o.key for o in page.objects] == ["link", "real"]
    assert page.prefixes == ["dir/"]
    with pytest.raises(NotFound):
        store.head(K("fifo"))
    with pytest.raises(NotFound):
        store.get_range(K("fifo"), 0, 1)  # must not block on the FIFO
    assert store.get_range(K("link"), 0, 10) == b"target"


def test_local_metadata_in_sidecars(local_root: Path) -> None:
    store = LocalStore(local_root, use_xattrs=False)
    store.put(K("f"), b"1", {"k": "v"})
    store.put(K("d/"), b"", {"dir": "yes"})
    assert store.head(K("f")).metadata == {"k": "v"}
    assert store.head(K("d/")).metadata == {"dir": "yes"}
    with pytest.raises(OSError) as info:
        os.getxattr(local_root / "f", "user.fusionfs.meta")
    assert info.value.errno == errno.ENODATA
    assert list((local_root / ".fusionfs-tmp" / "meta").glob("*.json"))
    (local_root / "f").write_bytes(b"changed by someone else")
    assert store.head(K("f")).metadata == {}  # a sidecar never applies to another version
    store.copy(K("d/"), K("e/"))
    assert store.head(K("e/")).metadata == {"dir": "yes"}
    store.delete(K("f"))
    store.put(K("f"), b"1")
    assert store.head(K("f")).metadata == {}


def test_local_metadata_in_xattrs(local_root: Path) -> None:
    store = LocalStore(local_root)
    store.put(K("f"), b"1", {"K": "v"})
    assert os.getxattr(local_root / "f", "user.fusionfs.meta") == b'{"k": "v"}'


def test_local_read_pins_the_version_it_opened(local_root: Path) -> None:
    store = LocalStore(local_root)
    etag = store.put(K("f"), _data(3 * MiB))

    class Replacing(io.BytesIO):
        """Replaces the object after the first chunk arrives."""

        replaced = False

        def write(self, b: Any) -> int:
            if not self.replaced:
                self.replaced = True
                store.put(K("f"), _data(3 * MiB, 5))
            return super().write(b)

    out = Replacing()
    store.get_into(K("f"), 0, 3 * MiB, out, etag=etag)
    assert out.getvalue() == _data(3 * MiB)


def test_local_check(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        LocalStore(tmp_path / "missing").check()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="not a directory"):
        LocalStore(tmp_path / "file").check()


def test_local_errors_are_translated(local_root: Path) -> None:
    store = LocalStore(local_root)
    with pytest.raises(StoreError, match="name too long"):
        store.put(K("x" * 300), b"")
    with pytest.raises(NotFound):
        store.head(K("y" * 300))


# ============================================================================================
# S3Store: prefix, SSE, multipart copy, retries, check


def test_s3_prefix_is_added_and_stripped(s3_bucket: Any) -> None:
    """[S-MAP-1] the key of a path is PREFIX/path, PREFIX the part of s3://BUCKET/PREFIX after the
    bucket; nothing outside the prefix is seen."""
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="outside", Body=b"o")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="pre/fix/", Body=b"")
    store = _s3_store(s3_bucket, prefix="/pre/fix")
    try:
        assert store.prefix == "pre/fix/"
        assert store.description == (
            f"s3://{s3_bucket.name}/pre/fix (endpoint {s3_bucket.endpoint})"
        )
        store.put(K("a/b"), b"1")
        assert s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="pre/fix/a/b")
        page = store.list(K(""))
        assert page.objects == [] and page.prefixes == ["a/"]
        assert [o.key for o in store.list(K(""), delimiter=None).objects] == ["a/b"]
        store.copy(K("a/b"), K("c"))
        assert (
            s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="pre/fix/c")["Body"].read()
            == b"1"
        )
        with pytest.raises(NotFound):
            store.head(K("outside"))
    finally:
        store.close()


def test_s3_endpoint_from_the_environment(s3_bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)  # honoured by boto3 itself
    store = S3Store(s3_bucket.name, "p")
    try:
        assert store.description == f"s3://{s3_bucket.name}/p (endpoint {s3_bucket.endpoint})"
        store.put(K("k"), b"v")
        assert store.head(K("k")).size == 1
        store.check()
    finally:
        store.close()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    aws = S3Store("bucket", region="eu-west-1")  # AWS itself: virtual-hosted, no endpoint shown
    try:
        assert aws.description == "s3://bucket"
        assert aws.client.meta.endpoint_url.endswith(".amazonaws.com")
    finally:
        aws.close()


def test_s3_sse_is_sent(s3_bucket: Any) -> None:
    store = _s3_store(s3_bucket, sse="AES256")
    try:
        store.put(K("enc"), b"secret")
        head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="enc")
        assert head.get("ServerSideEncryption") == "AES256"
        sent = _capture_params(store, "CopyObject", "CreateMultipartUpload")
        store.copy(K("enc"), K("enc2"))
        upload = store.create_multipart(K("enc3"))
        store.abort_multipart(K("enc3"), upload)
        assert [p.get("ServerSideEncryption") for p in sent] == ["AES256", "AES256"]
    finally:
        store.close()


def _capture_params(store: ObjectStore, *operations: str) -> list[dict[str, Any]]:
    """Record the parameters of the given S3 API calls made through ``store``'s client."""
    assert isinstance(store, S3Store)
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    for operation in operations:
        store.client.meta.events.register(f"provide-client-params.s3.{operation}", record)
    return sent


def _refuse(store: S3Store, operation: str, code: str, status: int) -> list[int]:
    """Make ``operation`` fail with an S3 error answer; returns a list counting refusals."""
    refused: list[int] = []

    def handler(**_: Any) -> None:
        refused.append(1)
        raise botocore.exceptions.ClientError(
            {
                "Error": {"Code": code, "Message": "refused by the test"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            operation,
        )

    store.client.meta.events.register(f"before-call.s3.{operation}", handler)
    return refused


def test_s3_copy_above_the_single_copy_limit_goes_part_by_part(s3_bucket: Any) -> None:
    store = _s3_store(s3_bucket, max_single_copy=6 * MiB, stats=Stats())
    try:
        data = _data(13 * MiB, 4)
        etag = store.put(K("big"), data, {"m": "1"})
        sent = _capture_params(store, "UploadPartCopy", "CopyObject")
        store.copy(K("big"), K("big2"), src_etag=etag)
        assert store.get_range(K("big2"), 0, 20 * MiB) == data
        assert store.head(K("big2")).metadata == {"m": "1"}
        assert [p["CopySourceRange"] for p in sent] == [
            f"bytes=0-{6 * MiB - 1}",
            f"bytes={6 * MiB}-{12 * MiB - 1}",
            f"bytes={12 * MiB}-{13 * MiB - 1}",
        ]
        assert all(p["CopySourceIfMatch"] == etag for p in sent)
    finally:
        store.close()


def test_s3_part_copy_falls_back_when_not_supported(s3_bucket: Any) -> None:
    stats = Stats()
    store = _s3_store(s3_bucket, max_single_copy=6 * MiB, stats=stats)
    try:
        data = _data(13 * MiB, 6)
        store.put(K("big"), data)
        refused = _refuse(store, "UploadPartCopy", "NotImplemented", 501)
        upload = store.create_multipart(K("direct"))
        with pytest.raises(NotSupported):
            store.upload_part_copy(K("direct"), upload, 1, K("big"), 0, 5 * MiB)
        store.abort_multipart(K("direct"), upload)
        store.copy(K("big"), K("big2"), metadata={"new": "yes"})
        assert store.get_range(K("big2"), 0, 20 * MiB) == data
        assert store.head(K("big2")).metadata == {"new": "yes"}
        assert len(refused) == 2  # one direct call, then the copy tried once and switched
        assert stats.requests.get("upload_part") == 3
        assert (
            s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []
        )
    finally:
        store.close()


def test_s3_failed_multipart_copy_aborts_its_upload(s3_bucket: Any) -> None:
    store = _s3_store(s3_bucket, max_single_copy=6 * MiB)
    try:
        store.put(K("big"), _data(13 * MiB))
        _refuse(store, "UploadPartCopy", "AccessDenied", 403)
        with pytest.raises(StoreError, match="access denied"):
            store.copy(K("big"), K("big2"))
        uploads = s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name)
        assert uploads.get("Uploads", []) == []
    finally:
        store.close()


def _cut_body_once(store: S3Store, cut: int) -> list[int]:
    """The first GetObject answer's body breaks off after ``cut`` bytes (a dropped connection)."""
    cuts: list[int] = []

    def handler(parsed: dict[str, Any], **_: Any) -> None:
        if cuts or "Body" not in parsed:
            return
        body = parsed["Body"]
        whole = body.read()
        body.close()
        cuts.append(1)
        parsed["Body"] = StreamingBody(io.BytesIO(whole[:cut]), len(whole))

    store.client.meta.events.register("after-call.s3.GetObject", handler)
    return cuts


def test_s3_body_cut_midway_is_retried(s3_bucket: Any) -> None:
    stats = Stats()
    store = _s3_store(s3_bucket, stats=stats)
    try:
        data = _data(3 * MiB, 2)
        store.put(K("obj"), data)
        cuts = _cut_body_once(store, MiB + MiB // 2)
        assert store.get_range(K("obj"), 100, 3 * MiB) == data[100:]
        assert cuts == [1] and stats.retries == 1

        cuts = _cut_body_once(store, MiB + MiB // 2)
        out = io.BytesIO()
        assert store.get_into(K("obj"), 0, 3 * MiB, out) == 3 * MiB
        assert out.getvalue() == data
        assert cuts == [1] and stats.retries == 2
    finally:
        store.close()


def test_s3_get_into_resume_refuses_to_mix_versions(s3_bucket: Any) -> None:
    store = _s3_store(s3_bucket)
    try:
        store.put(K("obj"), _data(3 * MiB))
        cuts: list[int] = []

        def handler(parsed: dict[str, Any], **_: Any) -> None:
            if cuts or "Body" not in parsed:
                return
            whole = parsed["Body"].read()
            parsed["Body"].close()
            cuts.append(1)
            store.put(K("obj"), _data(3 * MiB, 1))  # replaced while the body was cut off
            parsed["Body"] = StreamingBody(io.BytesIO(whole[: 2 * MiB]), len(whole))

        store.client.meta.events.register("after-call.s3.GetObject", handler)
        out = io.BytesIO()
        with pytest.raises(PreconditionFailed):
            store.get_into(K("obj"), 0, 3 * MiB, out)
        assert out.getvalue() == _data(3 * MiB)[: 2 * MiB]
    finally:
        store.close()


@pytest.mark.allow_logs("giving up on head")
def test_s3_server_errors_are_retried_then_raised_as_transient(s3_bucket: Any) -> None:
    """[S-FAIL-1] a 503 SlowDown is retried within the deadline, then raised as Transient (EIO)."""
    stats = Stats()
    store = S3Store(s3_bucket.name, endpoint_url=s3_bucket.endpoint, deadline_s=0.5, stats=stats)
    try:
        store.put(K("k"), b"v")
        refused = _refuse(store, "HeadObject", "SlowDown", 503)
        started = time.monotonic()
        with pytest.raises(Transient, match="SlowDown"):
            store.head(K("k"))
        assert time.monotonic() - started < 3
        assert len(refused) >= 2 and stats.retries == len(refused) - 1
    finally:
        store.close()


def test_s3_upload_retried_after_its_body_was_read_sends_it_whole(s3_bucket: Any) -> None:
    """A PUT or UploadPart whose first attempt read (part of) its body, then failed, sends the
    whole body again (botocore rewinds the body with ``seek`` before it sends it again)."""
    store = S3Store(s3_bucket.name, endpoint_url=s3_bucket.endpoint, deadline_s=30)
    failed: dict[str, int] = {}

    def read_then_fail(request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        if operation not in failed:  # the first attempt of each operation
            failed[operation] = len(request.body.read(3 * MiB))
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3.PutObject", read_then_fail)
    store.client.meta.events.register("before-send.s3.UploadPart", read_then_fail)
    started = time.monotonic()
    try:
        data = _data(6 * MiB, 7)
        store.put(K("k"), memoryview(data)[MiB:])
        assert store.get_range(K("k"), 0, 8 * MiB) == data[MiB:]
        del failed["PutObject"]  # a body of several buffers: the first read returns 1 MiB
        store.put(K("t"), (data[:MiB], memoryview(data)[MiB : 4 * MiB], data[4 * MiB :]))
        assert store.get_range(K("t"), 0, 8 * MiB) == data
        assert failed == {"PutObject": MiB}  # and sent whole by the second attempt
        upload = store.create_multipart(K("m"))
        part = store.upload_part(K("m"), upload, 1, data)
        store.complete_multipart(K("m"), upload, [part])
        assert store.get_range(K("m"), 0, 8 * MiB) == data
        assert failed == {"PutObject": MiB, "UploadPart": 3 * MiB}
        # not an attempt that sent only the rest of the body and waited out the read timeout
        assert time.monotonic() - started < 10
    finally:
        store.close()


@pytest.mark.allow_logs("giving up on")
def test_s3_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("bucket", endpoint_url=url, deadline_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(Transient):
            store.head(K("k"))
        with pytest.raises(StoreError, match="cannot reach S3 endpoint"):
            store.check()
        assert time.monotonic() - started < 10
    finally:
        store.close()


def test_s3_check_messages(s3_bucket: Any) -> None:
    store = _s3_store(s3_bucket)
    missing_bucket = S3Store("no-such-bucket-here", endpoint_url=s3_bucket.endpoint)
    try:
        store.check()
        with pytest.raises(NotFound, match="bucket 'no-such-bucket-here' does not exist at http"):
            missing_bucket.check()
    finally:
        store.close()
        missing_bucket.close()


def test_s3_bad_credentials_message(s3_bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(s3_bucket.name, endpoint_url=s3_bucket.endpoint)
    try:
        with pytest.raises(StoreError, match="no usable AWS credentials") as info:
            store.head(K("k"))
        assert not isinstance(info.value, Transient)
        with pytest.raises(StoreError, match="no usable AWS credentials"):
            store.check()
    finally:
        store.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sign", [False, True])
def test_upload_bodies_are_hashed_into_the_signature_only_when_asked(
    s3_bucket: Any, sign: bool
) -> None:
    """UNSIGNED-PAYLOAD by default (no SHA-256 pass over every body); ``sign_payload`` (the
    mount's ``--sign-payload``) puts the body's SHA-256 in the signature. The server takes both.
    """
    import hashlib

    store = S3Store(s3_bucket.name, "p", endpoint_url=s3_bucket.endpoint, sign_payload=sign)
    seen: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        value = request.headers.get("X-Amz-Content-SHA256")
        seen.append(value.decode() if isinstance(value, bytes) else str(value))

    store.client.meta.events.register("before-send.s3.PutObject", capture)
    store.client.meta.events.register("before-send.s3.UploadPart", capture)
    try:
        body = b"x" * (1 << 20)
        store.put(K("a"), body)
        upload = store.create_multipart(K("b"))
        part = store.upload_part(K("b"), upload, 1, body)
        store.complete_multipart(K("b"), upload, [part])
        assert store.get_range(K("a"), 0, 10) == b"x" * 10
        assert store.head(K("b")).size == len(body)
    finally:
        store.close()
    want = hashlib.sha256(body).hexdigest() if sign else "UNSIGNED-PAYLOAD"
    assert seen == [want, want]


# ============================================================================================
# S3Store: error translation, by hand-built botocore errors (no server needed)


def _client_error(code: str, status: int, message: str = "msg") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchKey", 404, NotFound),
        ("404", 404, NotFound),
        ("NoSuchBucket", 404, NotFound),
        ("NoSuchUpload", 404, NotFound),
        ("PreconditionFailed", 412, PreconditionFailed),
        ("412", 412, PreconditionFailed),
        ("NotImplemented", 501, NotSupported),
        ("InternalError", 500, Transient),
        ("502", 502, Transient),
        ("ServiceUnavailable", 503, Transient),
        ("SlowDown", 503, Transient),
        ("504", 504, Transient),
        ("RequestTimeout", 400, Transient),
        ("Throttling", 400, Transient),
        ("InvalidRequest", 400, StoreError),
        ("EntityTooSmall", 400, StoreError),
        ("InvalidRange", 416, StoreError),
    ],
)
def test_translate_client_errors(code: str, status: int, expected: type[StoreError]) -> None:
    err = translate_error(_client_error(code, status), location="s3://b/p/k", what="get_range")
    assert type(err) is expected
    assert "s3://b/p/k" in str(err) and "get_range" in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_translate_access_errors_without_secrets(code: str) -> None:
    err = translate_error(
        _client_error(code, 403, "AWSAccessKeyId AKIDEXAMPLE StringToSign SECRETSTUFF"),
        location="s3://bucket/prefix",
    )
    assert isinstance(err, StoreError)
    assert not isinstance(err, (Transient, NotFound))
    assert str(err) == "access denied to s3://bucket/prefix: check credentials"


def test_translate_missing_credentials() -> None:
    err = translate_error(botocore.exceptions.NoCredentialsError(), location="s3://b")
    assert isinstance(err, StoreError)
    assert not isinstance(err, (Transient, NotFound, PreconditionFailed, NotSupported))
    assert "no usable AWS credentials for s3://b" in str(err)


@pytest.mark.parametrize(
    "native",
    [
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://h"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="http://h"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://h"),
        botocore.exceptions.ConnectTimeoutError(endpoint_url="http://h"),
        botocore.exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2),
        botocore.exceptions.ResponseStreamingError(error="reset"),
        urllib3.exceptions.ProtocolError("Connection broken"),
        http.client.IncompleteRead(b"partial", 10),
        ConnectionResetError(errno.ECONNRESET, "reset"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_translate_transport_errors_are_transient(native: BaseException) -> None:
    assert type(translate_error(native, location="s3://b/k")) is Transient


def test_translate_tls_and_unknown_errors_are_permanent() -> None:
    tls = botocore.exceptions.SSLError(endpoint_url="https://h", error="bad certificate")
    assert type(translate_error(tls, location="s3://b")) is StoreError
    assert type(translate_error(ValueError("odd"), location="s3://b")) is StoreError
    already = NotFound("x")
    assert translate_error(already, location="s3://b") is already


# ============================================================================================
# FaultyStore


@pytest.fixture
def faulty(local_root: Path) -> FaultyStore:
    return FaultyStore(LocalStore(local_root))


def test_faulty_covers_every_protocol_method() -> None:
    protocol = {
        name
        for name in vars(ObjectStore)
        if not name.startswith("_") and callable(getattr(ObjectStore, name))
    }
    assert protocol == set(OPS)
    for name in OPS:
        assert name in vars(FaultyStore), f"FaultyStore does not wrap {name}"


def _call_each(store: FaultyStore) -> dict[str, Callable[[], Any]]:
    """One call per operation, all valid against a store holding "src" (6 MiB)."""
    upload = store.inner.create_multipart(K("mp"))
    return {
        "check": store.check,
        "head": lambda: store.head(K("src")),
        "get_head": lambda: store.get_head(K("src"), 4096),
        "get_range": lambda: store.get_range(K("src"), 0, 1),
        "get_into": lambda: store.get_into(K("src"), 0, 1, io.BytesIO()),
        "put": lambda: store.put(K("p"), b"1"),
        "list": lambda: store.list(K("")),
        "delete": lambda: store.delete(K("p")),
        "copy": lambda: store.copy(K("src"), K("c")),
        "create_multipart": lambda: store.create_multipart(K("m2")),
        "upload_part": lambda: store.upload_part(K("mp"), upload, 1, b"1"),
        "upload_part_copy": lambda: store.upload_part_copy(K("mp"), upload, 2, K("src"), 0, 10),
        "complete_multipart": lambda: store.complete_multipart(
            K("mp"), upload, [UploadPart(1, ETag("x"))]
        ),
        "abort_multipart": lambda: store.abort_multipart(K("mp"), upload),
    }


def test_faulty_fail_injects_into_every_operation(faulty: FaultyStore) -> None:
    faulty.inner.put(K("src"), _data(6 * MiB))
    calls = _call_each(faulty)
    assert set(calls) == set(OPS)
    for op, call in calls.items():
        faulty.fail(op, Transient)
        with pytest.raises(Transient, match=f"injected failure in {op}"):
            call()
        assert faulty.calls[op] == 1


def test_faulty_nth_and_times(faulty: FaultyStore) -> None:
    faulty.put(K("k"), b"v")
    faulty.fail("head", NotFound("gone"), nth=2, times=2)
    results = []
    for _ in range(5):
        try:
            faulty.head(K("k"))
            results.append("ok")
        except NotFound:
            results.append("fail")
    assert results == ["ok", "fail", "fail", "ok", "ok"]
    assert faulty.calls["head"] == 5


def test_faulty_fail_rate_is_reproducible(faulty: FaultyStore) -> None:
    faulty.put(K("k"), b"v")

    def pattern(seed: int) -> list[bool]:
        faulty.fail_rate("head", 0.5, Transient, seed=seed)
        out = []
        for _ in range(40):
            try:
                faulty.head(K("k"))
                out.append(True)
            except Transient:
                out.append(False)
        return out

    first = pattern(7)
    assert pattern(7) == first
    assert 5 < first.count(False) < 35
    faulty.clear("head")
    faulty.head(K("k"))


def test_faulty_stall_until_event(faulty: FaultyStore) -> None:
    faulty.put(K("k"), b"v")
    gate = threading.Event()
    faulty.stall("get_range", gate)
    results: list[bytes] = []
    worker = threading.Thread(target=lambda: results.append(faulty.get_range(K("k"), 0, 1)))
    worker.start()
    try:
        wait_for(lambda: faulty.waiting("get_range") == 1, 5, "the call to block")
        time.sleep(0.1)  # not synchronisation: the call must stay blocked a while, not just start
        assert results == [] and worker.is_alive()
        faulty.head(K("k"))  # other operations are not stalled
    finally:
        gate.set()
        worker.join(5)
    assert results == [b"v"]
    assert faulty.waiting("get_range") == 0


def test_faulty_stall_for_seconds_and_release(faulty: FaultyStore) -> None:
    faulty.put(K("k"), b"v")
    faulty.stall("head", seconds=0.2)
    started = time.monotonic()
    faulty.head(K("k"))
    assert 0.15 < time.monotonic() - started < 2
    faulty.stall("list")
    done = threading.Event()

    def lister() -> None:
        faulty.list(K(""))
        done.set()

    worker = threading.Thread(target=lister)
    worker.start()
    wait_for(lambda: faulty.waiting("list") == 1, 5, "list to block")
    faulty.release("list")
    worker.join(5)
    assert done.is_set()


def test_faulty_corrupt(faulty: FaultyStore) -> None:
    data = _data(1000)
    faulty.put(K("k"), data)
    faulty.corrupt("get_range", times=1)
    bad = faulty.get_range(K("k"), 0, 1000)
    assert bad != data and len(bad) == len(data)
    assert sum(a != b for a, b in zip(bad, data, strict=True)) == 1
    assert faulty.get_range(K("k"), 0, 1000) == data  # only once
    faulty.corrupt("get_into")
    out = io.BytesIO()
    assert faulty.get_into(K("k"), 0, 1000, out) == 1000
    assert out.getvalue() != data
    faulty.clear()
    out = io.BytesIO()
    faulty.get_into(K("k"), 0, 1000, out)
    assert out.getvalue() == data


def test_faulty_rejects_unknown_operations(faulty: FaultyStore) -> None:
    with pytest.raises(ValueError, match="unknown store operation 'get'"):
        faulty.fail("get", Transient)
    with pytest.raises(ValueError):
        faulty.stall("gett")
    with pytest.raises(ValueError):
        faulty.corrupt("head")


def test_faulty_is_thread_safe(faulty: FaultyStore) -> None:
    faulty.put(K("k"), b"v")
    faulty.fail("head", Transient, nth=50, times=100)
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            try:
                faulty.head(K("k"))
                kind = "ok"
            except Transient:
                kind = "fail"
            with lock:
                outcomes[kind] += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert faulty.calls["head"] == 400
    assert outcomes == {"ok": 300, "fail": 100}


# ============================================================================================
# open_store


def test_open_store_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = open_store("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store)
    try:
        assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
        assert s3.description == "s3://bucket/some/prefix (endpoint http://127.0.0.1:1)"
    finally:
        s3.close()
    bare = open_store("s3://bucket", endpoint_url="http://127.0.0.1:1")
    assert isinstance(bare, S3Store) and bare.prefix == ""
    bare.close()
    local = open_store(f"file://{tmp_path}")
    assert isinstance(local, LocalStore) and local.root == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = open_store("data/dir")
    assert isinstance(rel, LocalStore) and rel.root == str(tmp_path / "data" / "dir")


@pytest.mark.parametrize("source", ["gs://bucket", "http://host/x", "s3://", "file://host/x", ""])
def test_open_store_rejects_other_sources(source: str) -> None:
    with pytest.raises(ValueError, match="unsupported source"):
        open_store(source)
