"""Cloud reclamation notices: ask AWS's or GCP's metadata service whether the machine goes away.

- AWS (IMDSv2): ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``, then
  ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token``: 404 while
  nothing is pending, 200 with JSON ``{"action": "terminate"|"stop"|"hibernate", "time":
  "2024-01-01T12:00:00Z"}`` about two minutes before the machine goes. The base URL comes from
  ``$AWS_EC2_METADATA_SERVICE_ENDPOINT`` (botocore's own setting), default
  ``http://169.254.169.254``. AWS asks for a poll every 5 s.
- GCP: ``GET http://HOST/computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor:
  Google`` answers ``TRUE`` or ``FALSE``; about 30 s between the notice and the stop. HOST comes
  from ``$GCE_METADATA_HOST`` (Google's client libraries' setting), default
  ``metadata.google.internal``.
- ``detect`` probes both at once with short timeouts (AWS wins if both answer) and returns None
  when neither does: then only SIGTERM announces the end.

Every request bypasses HTTP proxies (the metadata service is link-local) and has a short timeout,
so a poll never blocks the supervisor for long. ``check`` raises ``MetadataError`` for an
unexpected answer or an unreachable service; the poller reports it and keeps polling.

Caveats: AWS's notice carries the stop time, which bounds the checkpoint deadline; GCP's does
not, so a notice seen one poll interval late leaves that much less of the 30 s. GCP's
``?wait_for_change=true`` long poll is not used (a plain poll keeps both providers alike).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "AWS_ENDPOINT_ENV",
    "AWS_WINDOW_S",
    "GCP_HOST_ENV",
    "GCP_WINDOW_S",
    "AwsSpot",
    "GcpPreemption",
    "MetadataError",
    "Notice",
    "NoticeSource",
    "Poller",
    "detect",
]

AWS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
GCP_HOST_ENV = "GCE_METADATA_HOST"
AWS_DEFAULT_ENDPOINT = "http://169.254.169.254"
GCP_DEFAULT_HOST = "metadata.google.internal"
AWS_WINDOW_S = 120.0
GCP_WINDOW_S = 30.0

_TOKEN_TTL_S = 21600  # six hours, the maximum IMDSv2 allows
_REQUEST_TIMEOUT_S = 2.0
_PROBE_TIMEOUT_S = 1.0


class MetadataError(Exception):
    """The metadata service could not be asked, or answered something unexpected."""


@dataclasses.dataclass(frozen=True)
class Notice:
    """A reclamation notice (or SIGTERM), and when this process saw it."""

    source: str  # "aws", "gcp" or "SIGTERM"
    detail: str  # one line for humans
    seen: float  # time.monotonic() when seen
    stop_at: float | None = None  # time.monotonic() of the announced stop, if announced


class NoticeSource(Protocol):
    name: str
    window: float  # seconds from notice to stop, by default

    def check(self) -> Notice | None: ...


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(
    opener: urllib.request.OpenerDirector,
    method: str,
    url: str,
    headers: dict[str, str],
    timeout: float,
) -> tuple[int, bytes, dict[str, str]]:
    """One request; returns (status, body, headers) for any HTTP answer, raises MetadataError."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers.items())
    except urllib.error.HTTPError as err:
        try:
            body = err.read()
        finally:
            err.close()
        return err.code, body, dict(err.headers.items()) if err.headers else {}
    except (OSError, ValueError) as err:  # URLError, timeouts, refused, bad URL
        reason = getattr(err, "reason", err)
        raise MetadataError(f"{method} {url}: {reason}") from None


def _parse_time(text: str) -> float | None:
    """AWS's ISO 8601 stop time as a time.monotonic() value (None if unparsable)."""
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return time.monotonic() + (when.timestamp() - time.time())


class AwsSpot:
    """AWS EC2 spot instance-action, through IMDSv2 (a session token, refreshed as needed)."""

    name = "aws"
    window = AWS_WINDOW_S

    def __init__(self, endpoint: str | None = None, timeout: float = _REQUEST_TIMEOUT_S) -> None:
        base = endpoint or os.environ.get(AWS_ENDPOINT_ENV) or AWS_DEFAULT_ENDPOINT
        self.endpoint = base.rstrip("/")
        self._timeout = timeout
        self._opener = _opener()
        self._token: str | None = None
        self._token_expires = 0.0

    def _get_token(self) -> str:
        if self._token is not None and time.monotonic() < self._token_expires:
            return self._token
        status, body, _ = _request(
            self._opener,
            "PUT",
            f"{self.endpoint}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(_TOKEN_TTL_S)},
            self._timeout,
        )
        if status != 200 or not body:
            raise MetadataError(f"IMDSv2 token request to {self.endpoint} answered HTTP {status}")
        self._token = body.decode("ascii", errors="replace").strip()
        self._token_expires = time.monotonic() + _TOKEN_TTL_S - 60
        return self._token

    def probe(self) -> bool:
        try:
            self._get_token()
        except MetadataError:
            return False
        return True

    def check(self) -> Notice | None:
        url = f"{self.endpoint}/latest/meta-data/spot/instance-action"
        for attempt in (1, 2):  # a 401 means the token expired early: one fresh token
            status, body, _ = _request(
                self._opener,
                "GET",
                url,
                {"X-aws-ec2-metadata-token": self._get_token()},
                self._timeout,
            )
            if status == 401 and attempt == 1:
                self._token = None
                continue
            break
        if status == 404:
            return None
        if status != 200:
            raise MetadataError(f"GET {url} answered HTTP {status}")
        seen = time.monotonic()
        try:
            data = json.loads(body)
            action, when = str(data["action"]), str(data["time"])
        except (ValueError, KeyError, TypeError):
            return Notice("aws", f"spot instance-action {body[:100]!r}", seen)
        return Notice("aws", f"spot instance-action {action} at {when}", seen, _parse_time(when))


class GcpPreemption:
    """GCP preemptible/spot VM: ``instance/preempted`` turns TRUE."""

    name = "gcp"
    window = GCP_WINDOW_S

    def __init__(self, host: str | None = None, timeout: float = _REQUEST_TIMEOUT_S) -> None:
        host = host or os.environ.get(GCP_HOST_ENV) or GCP_DEFAULT_HOST
        base = host if "://" in host else f"http://{host}"
        self.url = f"{base.rstrip('/')}/computeMetadata/v1/instance/preempted"
        self._timeout = timeout
        self._opener = _opener()

    def _get(self) -> str:
        status, body, headers = _request(
            self._opener, "GET", self.url, {"Metadata-Flavor": "Google"}, self._timeout
        )
        if status != 200:
            raise MetadataError(f"GET {self.url} answered HTTP {status}")
        if headers.get("Metadata-Flavor") != "Google":
            raise MetadataError(f"{self.url} is not a GCP metadata server (no Metadata-Flavor)")
        return body.decode("ascii", errors="replace").strip().upper()

    def probe(self) -> bool:
        try:
            return self._get() in ("TRUE", "FALSE")
        except MetadataError:
            return False

    def check(self) -> Notice | None:
        value = self._get()
        if value == "TRUE":
            return Notice("gcp", "instance/preempted is TRUE", time.monotonic())
        if value == "FALSE":
            return None
        raise MetadataError(f"GET {self.url} answered {value[:40]!r}, not TRUE or FALSE")


def detect(timeout: float = _PROBE_TIMEOUT_S) -> AwsSpot | GcpPreemption | None:
    """The provider whose metadata service answers (AWS first), else None.

    Both probes run at once in daemon threads (name resolution cannot be given a timeout), and
    the answer comes after at most about ``timeout`` seconds.
    """
    aws, gcp = AwsSpot(timeout=timeout), GcpPreemption(timeout=timeout)
    found: dict[str, bool] = {}

    def probe(name: str, fn: Callable[[], bool]) -> None:
        found[name] = fn()

    threads = [
        threading.Thread(target=probe, args=("aws", aws.probe), daemon=True),
        threading.Thread(target=probe, args=("gcp", gcp.probe), daemon=True),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 0.5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if found.get("aws"):
        return aws
    if found.get("gcp"):
        return gcp
    return None


class Poller:
    """A daemon thread that calls ``source.check()`` every ``interval`` s until a notice.

    ``on_notice`` runs in the poller's thread, once. ``on_error`` gets a message when polling
    starts failing and None when it works again (so a flapping service is reported once per
    outage, not once per poll).
    """

    def __init__(
        self,
        source: NoticeSource,
        interval: float,
        on_notice: Callable[[Notice], None],
        on_error: Callable[[str | None], None],
    ) -> None:
        self._source = source
        self._interval = interval
        self._on_notice = on_notice
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"{source.name}-notice-poller", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                notice = self._source.check()
            except MetadataError as err:
                if not failing:
                    self._on_error(str(err))
                failing = True
            else:
                if failing:
                    self._on_error(None)
                failing = False
                if notice is not None:
                    if not self._stop.is_set():
                        self._on_notice(notice)
                    return
            self._stop.wait(self._interval)
