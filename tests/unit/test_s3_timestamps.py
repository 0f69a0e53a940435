"""``fusionfs.store.s3.parse_timestamp``: botocore's answers, without dateutil's cost."""

from __future__ import annotations

import datetime
from typing import Any

import botocore.utils
import pytest

from fusionfs.store import s3

UTC = datetime.UTC


@pytest.mark.parametrize(
    "value",
    [
        "2026-12-03T17:35:21.123Z",  # ListObjectsV2 LastModified (AWS, MinIO, s3rver)
        "2026-12-03T17:35:21Z",
        "2026-12-03T17:35:21.000+00:00",
        "2026-12-03T19:35:21+02:00",
        "Thu, 03 Dec 2026 17:35:21 GMT",  # Last-Modified header of HEAD/GET
        "Thu, 03 Dec 2026 17:35:21 -0000",
        "1700000000",  # epoch seconds: left to botocore
        1700000000,
        1700000000.5,
    ],
)
def test_same_instant_as_botocore(value: Any) -> None:
    ours, theirs = s3.parse_timestamp(value), botocore.utils.parse_timestamp(value)
    assert ours.tzinfo is not None
    assert ours == theirs


def test_a_value_without_zone_is_utc() -> None:
    got = s3.parse_timestamp("2026-12-03T17:35:21")
    assert got == datetime.datetime(2026, 12, 3, 17, 35, 21, tzinfo=UTC)


def test_garbage_is_botocores_error() -> None:
    with pytest.raises(ValueError):
        s3.parse_timestamp("not a time")


def test_sessions_parse_responses_with_it() -> None:
    """Every S3 client of the store parses timestamps with it, not dateutil."""
    session = s3._new_session("us-east-1")
    factory = session._session.get_component("response_parser_factory")
    parser = factory.create_parser("rest-xml")
    assert parser._timestamp_parser is s3.parse_timestamp
