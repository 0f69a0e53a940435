"""S-SRV-6: a server that computes wrong checksums is caught at the first copy and its
checksums are not checked from then on (never an EIO for good bytes, never wrong bytes).

moto computes the CRC32C of a copy (and of a multipart object) itself, with the ``crc32c``
package; without it, it silently stores a CRC32 under the CRC32C's name. A moto server started
here with that package hidden is such a server, for real, over HTTP.
"""

from __future__ import annotations

import pytest
from s3servers import S3Bucket, S3Server, bucket_on

from fusionfs.store import Key
from fusionfs.store import checksum as crc
from fusionfs.store.s3 import S3Store

pytestmark = pytest.mark.timeout(90)


def _store(bucket: S3Bucket) -> S3Store:
    return S3Store(bucket.name, endpoint_url=bucket.endpoint, region="us-east-1", deadline_s=10)


def test_a_server_computing_wrong_checksums_is_not_trusted_for_them(
    wrong_crc_moto: S3Server,
) -> None:
    data = b"every byte of this object is right\n" * 1000
    right = crc.compute(crc.UPLOAD_ALGORITHM, data)
    with bucket_on(wrong_crc_moto) as bucket:
        store = _store(bucket)
        try:
            store.put(Key("a"), data)
            assert store.head(Key("a")).checksum is not None
            store.copy(Key("a"), Key("b"), metadata={"x": "1"})
            assert store.trust_server_checksums is False
            assert "checksums right" in store.limits
            # what is reported now is either nothing or the right value, never moto's CRC32
            for key in ("a", "b"):
                got = store.head(Key(key)).checksum
                assert got is None or got.value == right, (key, got)
            store.put(Key("c"), data)  # recorded in metadata from now on, and checked
            got = store.head(Key("c")).checksum
            assert got is not None and got.source == "metadata" and got.value == right
        finally:
            store.close()


def test_a_right_server_stays_trusted(moto: S3Server) -> None:
    data = b"x" * 5000
    with bucket_on(moto) as bucket:
        store = _store(bucket)
        try:
            store.put(Key("a"), data)
            store.copy(Key("a"), Key("b"), metadata={"x": "1"})
            assert store.trust_server_checksums is True, store.limits
            got = store.head(Key("b")).checksum
            assert got is not None and got.value == crc.compute(crc.UPLOAD_ALGORITHM, data)
        finally:
            store.close()
