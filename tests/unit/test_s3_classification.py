"""What S3Store retries and what it takes as the server's answer (docs/SEMANTICS.md, "S3
servers' quirks": S-SRV-1, S-SRV-2, S-SRV-4). No server: a stub stands in for the boto3
client, so each case is exactly the response a server was seen to send."""

from __future__ import annotations

import errno
import http.client
from typing import Any

import botocore.exceptions as bce
import pytest

from fusionfs.errors import errno_for
from fusionfs.store import ETag, Key, NotFound, NotSupported, PreconditionFailed, StoreError
from fusionfs.store.s3 import S3Store, _classify, _empty_or_malformed, _is_transient, _Malformed


def _client_error(code: str, status: int, op: str = "GetObject") -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        op,
    )


@pytest.mark.parametrize(
    ("code", "status", "cls", "err_no"),
    [
        ("NoSuchKey", 404, NotFound, errno.ENOENT),  # an answer, even for a key just listed
        ("NotImplemented", 501, NotSupported, errno.EIO),  # UploadPartCopy on s3rver
        ("MethodNotAllowed", 405, NotSupported, errno.EIO),  # AbortMultipartUpload on s3rver
        ("PreconditionFailed", 412, PreconditionFailed, errno.ESTALE),
        ("InternalError", 500, None, errno.EIO),  # weather: retried
        ("SlowDown", 503, None, errno.EIO),
    ],
)
def test_client_errors_are_answers_or_weather(
    code: str, status: int, cls: type[StoreError] | None, err_no: int
) -> None:
    """S-SRV-4: NoSuchKey, 501 and 405 are answers (never retried); 5xx are weather."""
    err = _client_error(code, status)
    assert _is_transient(err) is (cls is None)
    if cls is not None:
        assert _classify(err) is cls
        assert errno_for(cls("x")) == err_no


def test_an_empty_objects_malformed_range_is_the_answer_empty() -> None:
    """S-SRV-1: s3rver's 206 for a ranged GET of an empty object (``bytes 0-0/0``, one byte
    promised, none sent) means "empty"; a range past its own total is malformed, not weather."""
    assert _empty_or_malformed({"ContentRange": "bytes 0-0/0"}, "GET k") is True
    assert _empty_or_malformed({"ContentRange": "bytes 0-99/1000"}, "GET k") is False
    assert _empty_or_malformed({}, "GET k") is False  # a 200 without Content-Range
    for bad in ("bytes 0-99/50", "bytes 10-5/100"):
        with pytest.raises(_Malformed) as caught:
            _empty_or_malformed({"ContentRange": bad}, "GET k")
        assert not _is_transient(caught.value)
        assert errno_for(caught.value) == errno.EIO


class _Body:
    def __init__(self, data: bytes, short_by: int) -> None:
        self.data, self.short_by = data, short_by

    def read(self, *_: Any) -> bytes:
        if self.short_by:
            raise bce.ResponseStreamingError(
                error=http.client.IncompleteRead(self.data, self.short_by)
            )
        return self.data

    def close(self) -> None:
        pass


class _Client:
    """Answers every GetObject with ``responses`` in turn (the last one repeats)."""

    def __init__(self, responses: list[dict[str, Any]]) -> None:
        self.responses = responses
        self.calls = 0

    def get_object(self, **_: Any) -> dict[str, Any]:
        resp = self.responses[min(self.calls, len(self.responses) - 1)]
        self.calls += 1
        return {**resp, "Body": _Body(resp["data"], resp.get("short_by", 0))}

    def head_object(self, **_: Any) -> dict[str, Any]:
        return {"ContentLength": 0, "ETag": '"e"', "Metadata": {}}

    def close(self) -> None:
        pass


def _store(responses: list[dict[str, Any]]) -> tuple[S3Store, _Client]:
    store = S3Store("b", endpoint_url="http://127.0.0.1:9", region="us-east-1", deadline_s=30)
    store.client.close()
    client = _Client(responses)
    store.client = client
    return store, client


def test_an_empty_object_is_one_request_not_five_retries() -> None:
    """S-SRV-1: the lookup's ranged GET of an empty object on s3rver answers at once."""
    store, client = _store(
        [
            {
                "data": b"",
                "short_by": 1,
                "ContentRange": "bytes 0-0/0",
                "ETag": '"e"',
                "ContentLength": 1,
            }
        ]
    )
    info, head = store.get_head(Key("empty"), 65536)
    assert (info.size, head, client.calls) == (0, b"", 1)
    assert store.get_range(Key("empty"), 0, 10) == b""
    assert client.calls == 2


def test_the_same_short_body_twice_is_an_answer() -> None:
    """S-SRV-1: a body cut short once is retried (a connection can break); the same short
    body (same ETag, range and bytes read) a second time is the server's answer: EIO, not
    retried until the deadline."""
    short = {"data": b"abc", "short_by": 7, "ContentRange": "bytes 0-9/10", "ETag": '"e"'}
    whole = {"data": b"abcdefghij", "ContentRange": "bytes 0-9/10", "ETag": '"e"'}
    store, client = _store([short, whole])
    assert store.get_range(Key("k"), 0, 10) == b"abcdefghij"  # once: weather, retried
    assert client.calls == 2
    store, client = _store([short])
    with pytest.raises(_Malformed):
        store.get_range(Key("k"), 0, 10)
    assert client.calls == 2
    store, client = _store([short])
    with pytest.raises(_Malformed):
        store.get_head(Key("k"), 65536)
    assert client.calls == 2


def test_if_match_is_checked_on_our_side() -> None:
    """S-SRV-3: a server that ignores If-Match (s3rver) and sends another version gets
    PreconditionFailed (ESTALE), never its bytes."""
    store, _ = _store([{"data": b"new", "ContentRange": "bytes 0-2/3", "ETag": '"new"'}])
    with pytest.raises(PreconditionFailed):
        store.get_range(Key("k"), 0, 3, etag=ETag('"old"'))
    assert errno_for(PreconditionFailed("x")) == errno.ESTALE
