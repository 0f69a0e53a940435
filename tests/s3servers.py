"""The S3 servers the tests run against, behind one small interface.

Each server is started once per test session by its own session fixture in ``tests/conftest.py``
(``moto_server``, and one ``<name>_server`` fixture per further server) and described by an
``S3Server``: where it listens and which credentials it takes. ``bucket_on(server)`` gives a
fresh bucket on it, emptied and removed afterwards.

Servers (``SERVERS``): ``moto`` (moto's server mode, S3's reference semantics), ``s3rver``
(npm s3rver 3.7.1, the benchmark server, with its quirks), ``rgw`` (Ceph RGW, the
production-grade S3 of many research sites). A test that needs one names it through the
``s3_server`` fixture (``@pytest.mark.parametrize("s3_server", ["rgw"], indirect=True)``) or
takes every one of them (``s3_server`` is parametrized over ``SERVERS`` by default).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import ClientError

__all__ = ["SERVERS", "S3Bucket", "S3Server", "bucket_on", "empty_bucket"]

SERVERS = ("moto", "s3rver", "rgw")


@dataclasses.dataclass(frozen=True)
class S3Server:
    name: str  # one of SERVERS
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto3 (in a subprocess, say) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self) -> Any:
        """A boto3 S3 client to this server (path-style, few retries), for out-of-band work."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=None,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    endpoint: str
    name: str
    client: Any  # a boto3 S3 client to the same server, for out-of-band changes
    source: str  # "s3://name"
    server: S3Server | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto3 (in a subprocess, say) at the test server."""
        if self.server is not None:
            return self.server.env
        return {"AWS_ENDPOINT_URL": self.endpoint}


def empty_bucket(client: Any, name: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    try:
        uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "NotImplemented":
            raise
        uploads = []  # s3rver has no ListMultipartUploads (its uploads go with the bucket)
    for upload in uploads:
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])


@contextmanager
def bucket_on(server: S3Server) -> Iterator[S3Bucket]:
    """A fresh bucket on ``server``, emptied and removed afterwards."""
    client = server.client()
    name = f"test-{uuid.uuid4().hex[:24]}"
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(
            endpoint=server.endpoint, name=name, client=client, source=f"s3://{name}", server=server
        )
    finally:
        try:
            empty_bucket(client, name)
            client.delete_bucket(Bucket=name)
        finally:
            client.close()
