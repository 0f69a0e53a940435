"""Full-object checksums (``fusionfs.store.checksum``) and what ``S3Store`` sends and learns
about them (S-INTEG-1), against moto's server: as it is (it keeps the checksums), and behind a
botocore hook that answers like a server refusing them (none of moto, s3rver and RGW 16 does:
S-SRV-6, so the refusal is made here, on the real client path)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from hypothesis import given
from hypothesis import strategies as st

from fusionfs.store import Key, S3Store
from fusionfs.store import checksum as cs
from fusionfs.store.s3 import CRC_METADATA

MiB = 1 << 20


@given(st.binary(max_size=300), st.binary(max_size=300), st.sampled_from(cs.ALGORITHMS))
def test_combined_crcs_equal_the_crc_of_the_whole(a: bytes, b: bytes, algorithm: str) -> None:
    """S-INTEG-2: chunk CRCs computed apart and combined in order are the whole body's CRC."""
    whole = cs.compute(algorithm, a + b)
    assert (
        cs.combine(algorithm, cs.compute(algorithm, a), cs.compute(algorithm, b), len(b)) == whole
    )
    assert cs.decode(algorithm, cs.encode(algorithm, whole)) == whole


def test_only_full_object_checksums_are_taken() -> None:
    """S-INTEG-3: a COMPOSITE (per part) checksum cannot be checked without the part boundaries."""
    crc = cs.encode("CRC32C", cs.compute("CRC32C", b"abc"))
    assert cs.from_headers({"ChecksumCRC32C": crc}) == cs.Checksum(
        "CRC32C", cs.compute("CRC32C", b"abc")
    )
    assert cs.from_headers({"ChecksumCRC32C": crc, "ChecksumType": "COMPOSITE"}) is None
    assert cs.from_headers({"ChecksumCRC32C": crc + "-3"}) is None
    assert cs.from_headers({"ChecksumCRC64NVME": "not base64!"}) is None
    assert cs.from_headers({}) is None


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def _refuse_checksums(store: S3Store) -> list[dict[str, str]]:
    """Make ``store``'s client see a server that refuses any request carrying a flexible
    checksum (400 InvalidRequest, as some S3-compatible servers answer an unknown header).
    Returns the checksum headers of every request sent."""
    seen: list[dict[str, str]] = []

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        headers = {
            k.lower(): v.decode() if isinstance(v, bytes) else str(v)
            for k, v in request.headers.items()
            if k.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum"))
        }
        seen.append(headers)
        if any(k != "x-amz-checksum-mode" for k in headers):
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRequest</Code>'
                b"<Message>x-amz-checksum-* is not supported</Message></Error>"
            )
            return AWSResponse(request.url, 400, {"Content-Type": "application/xml"}, _Body(body))
        return None

    store.client.meta.events.register("before-send.s3", before_send)
    return seen


@pytest.fixture
def store(s3_bucket: Any) -> Iterator[S3Store]:
    s = S3Store(s3_bucket.name, endpoint_url=s3_bucket.endpoint, region="us-east-1", deadline_s=10)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_a_server_that_keeps_checksums_gets_them_and_no_metadata_record(
    store: S3Store, s3_bucket: Any
) -> None:
    """S-INTEG-1 on moto: the first PUT carries the CRC32C and, until the server has been seen
    to keep it, the metadata record; after that only the header. HEAD reports the server's."""
    data = os.urandom(3000)
    store.put(Key("a"), data)
    assert store.keeps_checksums is True
    store.put(Key("b"), data)
    raw = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="b", ChecksumMode="ENABLED")
    assert raw["ChecksumCRC32C"] == cs.encode("CRC32C", cs.compute("CRC32C", data))
    assert CRC_METADATA not in raw["Metadata"]
    info = store.head(Key("b"))
    assert info.checksum == cs.Checksum("CRC32C", cs.compute("CRC32C", data))
    assert info.metadata is not None and CRC_METADATA not in info.metadata
    # multipart: FULL_OBJECT, the CRC32C of the whole body
    upload = store.create_multipart(Key("m"))
    parts = [
        store.upload_part(Key("m"), upload, 1, data * 2000),
        store.upload_part(Key("m"), upload, 2, data),
    ]
    assert all(p.checksum for p in parts)
    store.complete_multipart(Key("m"), upload, parts)
    assert store.head(Key("m")).checksum == cs.Checksum("CRC32C", cs.compute("CRC32C", data * 2001))


@pytest.mark.timeout(60)
def test_a_refusal_of_checksums_is_answered_at_once_without_them_and_remembered(
    store: S3Store, s3_bucket: Any
) -> None:
    """S-INTEG-1: a server that refuses the checksum arguments (400, not a mismatch) gets the
    same request without them in the same attempt (no retry, no backoff), the mount sends none
    from then on, and single PUTs record their CRC32C in metadata, which HEAD reports."""
    seen = _refuse_checksums(store)
    data = os.urandom(5000)
    store.put(Key("a"), data)
    assert "flexible checksums" in store.limits
    assert store.keeps_checksums is False
    assert [bool(h) for h in seen] == [True, False]  # refused, then sent at once without
    info = store.head(Key("a"))
    assert info.checksum == cs.Checksum("CRC32C", cs.compute("CRC32C", data), source="metadata")
    seen.clear()
    store.put(Key("b"), data)
    upload = store.create_multipart(Key("m"))
    part = store.upload_part(Key("m"), upload, 1, data)
    assert part.checksum is None
    store.complete_multipart(Key("m"), upload, [part])
    sent = [h for h in seen if any(k != "x-amz-checksum-mode" for k in h)]
    assert sent == []  # nothing refused twice
    raw = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="b")
    assert raw["Metadata"][CRC_METADATA] == cs.encode("CRC32C", cs.compute("CRC32C", data))
    # a copy with new metadata keeps the record of the same bytes
    store.copy(Key("b"), Key("c"), {"mode": "33188"})
    assert store.head(Key("c")).checksum == info.checksum
