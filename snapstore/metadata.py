"""Cloud reclamation notices: ask AWS's, GCP's or Azure's metadata service whether the machine goes.

- AWS (IMDSv2): ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``, then
  ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token``: 404 while
  nothing is pending, 200 with JSON ``{"action": "terminate"|"stop"|"hibernate", "time":
  "2024-01-01T12:00:00Z"}`` about two minutes before the machine goes. While no action is
  pending, ``GET /latest/meta-data/events/recommendations/rebalance`` is asked too: 404, or
  ``{"noticeTime": ...}`` when EC2 recommends moving off the instance, often minutes before the
  interruption notice. That one is an *early* notice (``Notice.early``): the supervisor takes a
  checkpoint at once and leaves the task running, so that the final checkpoint only uploads what
  changed since. The base URL comes from ``$AWS_EC2_METADATA_SERVICE_ENDPOINT`` (botocore's own
  setting), default ``http://169.254.169.254``. AWS asks for a poll every 5 s.
- GCP: ``GET http://HOST/computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor:
  Google`` answers ``TRUE`` or ``FALSE``; about 30 s between the notice and the stop. HOST comes
  from ``$GCE_METADATA_HOST`` (Google's client libraries' setting), default
  ``metadata.google.internal``. GCP gives no earlier warning.
- Azure: Scheduled Events, ``GET BASE/metadata/scheduledevents?api-version=2020-07-01`` with
  ``Metadata: true`` answers ``{"DocumentIncarnation": N, "Events": [...]}``. An event of type
  ``Preempt`` (spot eviction, at least 30 s ahead), ``Terminate``, ``Reboot`` or ``Redeploy``
  ends the processes on this VM, so it is a final notice; ``Freeze`` (a pause of seconds) is
  not. Its ``NotBefore`` (RFC 1123) is the announced stop time. Events may name other VMs of an
  availability set in ``Resources``: an event is ours when ``Resources`` is empty or names this
  VM (``/metadata/instance/compute/name``). The event is acknowledged (``POST`` of
  ``{"StartRequests": [{"EventId": ...}]}``) once the checkpoint committed or failed, never
  before: an acknowledged event lets Azure proceed at once. BASE comes from
  ``$SNAPSTORE_AZURE_METADATA_ENDPOINT``, default ``http://169.254.169.254``.
- ``detect`` probes all three at once with short timeouts (AWS, then Azure, then GCP wins if
  several answer) and returns None when none does: then only SIGTERM announces the end.

Every request bypasses HTTP proxies (the metadata service is link-local) and has a short timeout,
so a poll never blocks the supervisor for long. ``check`` raises ``MetadataError`` for an
unexpected answer or an unreachable service; the poller reports it and keeps polling.

Caveats: AWS's and Azure's notices carry the stop time, which bounds the checkpoint deadline;
GCP's does not, so a notice seen one poll interval late leaves that much less of the 30 s.
GCP's ``?wait_for_change=true`` long poll is not used (a plain poll keeps the providers alike).
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
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
    "AZURE_ENDPOINT_ENV",
    "AZURE_WINDOW_S",
    "GCP_HOST_ENV",
    "GCP_WINDOW_S",
    "AwsSpot",
    "AzureScheduledEvents",
    "GcpPreemption",
    "MetadataError",
    "Notice",
    "NoticeSource",
    "Poller",
    "detect",
]

AWS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
GCP_HOST_ENV = "GCE_METADATA_HOST"
AZURE_ENDPOINT_ENV = "SNAPSTORE_AZURE_METADATA_ENDPOINT"
AWS_DEFAULT_ENDPOINT = "http://169.254.169.254"
GCP_DEFAULT_HOST = "metadata.google.internal"
AZURE_DEFAULT_ENDPOINT = "http://169.254.169.254"
AWS_WINDOW_S = 120.0
GCP_WINDOW_S = 30.0
AZURE_WINDOW_S = 30.0  # Preempt's minimum notice
AZURE_API_VERSION = "2020-07-01"
# Scheduled Events that end the processes on this VM (Freeze only pauses it for seconds)
AZURE_FINAL_EVENTS = ("Preempt", "Terminate", "Reboot", "Redeploy")

_TOKEN_TTL_S = 21600  # six hours, the maximum IMDSv2 allows
_REQUEST_TIMEOUT_S = 2.0
_PROBE_TIMEOUT_S = 1.0


class MetadataError(Exception):
    """The metadata service could not be asked, or answered something unexpected."""


@dataclasses.dataclass(frozen=True)
class Notice:
    """A reclamation notice (or SIGTERM), and when this process saw it."""

    source: str  # "aws", "gcp", "azure" or "SIGTERM"
    detail: str  # one line for humans
    seen: float  # time.monotonic() when seen
    stop_at: float | None = None  # time.monotonic() of the announced stop, if announced
    # an early warning (AWS's rebalance recommendation): checkpoint, keep the task running,
    # and keep polling for the final notice
    early: bool = False
    event_id: str | None = None  # what acknowledge() answers (Azure's EventId)


class NoticeSource(Protocol):
    name: str
    window: float  # seconds from notice to stop, by default

    def check(self) -> Notice | None:
        """The pending notice, if any. An early notice is returned once; a final one for good."""
        ...

    def acknowledge(self, notice: Notice) -> None:
        """Tell the provider we are ready for it to proceed (a no-op where it has no such call)."""
        ...


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
        self._rebalance_seen = False

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
            return None if self._rebalance_seen else self._check_rebalance()
        if status != 200:
            raise MetadataError(f"GET {url} answered HTTP {status}")
        seen = time.monotonic()
        try:
            data = json.loads(body)
            action, when = str(data["action"]), str(data["time"])
        except (ValueError, KeyError, TypeError):
            return Notice("aws", f"spot instance-action {body[:100]!r}", seen)
        return Notice("aws", f"spot instance-action {action} at {when}", seen, _parse_time(when))

    def _check_rebalance(self) -> Notice | None:
        """EC2's rebalance recommendation, reported once (an early notice)."""
        url = f"{self.endpoint}/latest/meta-data/events/recommendations/rebalance"
        status, body, _ = _request(
            self._opener, "GET", url, {"X-aws-ec2-metadata-token": self._get_token()}, self._timeout
        )
        if status in (404, 401):  # 401: the token expired; the next instance-action poll renews
            return None
        if status != 200:
            raise MetadataError(f"GET {url} answered HTTP {status}")
        self._rebalance_seen = True
        try:
            when = str(json.loads(body)["noticeTime"])
        except (ValueError, KeyError, TypeError):
            when = repr(body[:60])
        return Notice("aws", f"rebalance recommendation at {when}", time.monotonic(), early=True)

    def acknowledge(self, notice: Notice) -> None:
        """AWS has nothing to acknowledge."""


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

    def acknowledge(self, notice: Notice) -> None:
        """GCP has nothing to acknowledge."""


def _parse_http_date(text: str) -> float | None:
    """Azure's RFC 1123 ``NotBefore`` as a time.monotonic() value (None if empty/unparsable)."""
    if not text:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return time.monotonic() + (when.timestamp() - time.time())


class AzureScheduledEvents:
    """Azure Scheduled Events: a ``Preempt`` (or another event that ends this VM's processes)."""

    name = "azure"
    window = AZURE_WINDOW_S

    def __init__(self, endpoint: str | None = None, timeout: float = _REQUEST_TIMEOUT_S) -> None:
        base = endpoint or os.environ.get(AZURE_ENDPOINT_ENV) or AZURE_DEFAULT_ENDPOINT
        self.endpoint = base.rstrip("/")
        self.url = f"{self.endpoint}/metadata/scheduledevents?api-version={AZURE_API_VERSION}"
        self._timeout = timeout
        self._opener = _opener()
        self._vm_name: str | None = None

    def _events(self) -> list[dict[str, object]]:
        status, body, _ = _request(
            self._opener, "GET", self.url, {"Metadata": "true"}, self._timeout
        )
        if status != 200:
            raise MetadataError(f"GET {self.url} answered HTTP {status}")
        try:
            data = json.loads(body)
            events = data["Events"]
        except (ValueError, KeyError, TypeError):
            raise MetadataError(
                f"{self.url} answered {body[:60]!r}, not Scheduled Events"
            ) from None
        if not isinstance(events, list):
            raise MetadataError(f"{self.url}: Events is not a list")
        return [e for e in events if isinstance(e, dict)]

    def _name(self) -> str:
        """This VM's name, for events that list the VMs they affect ("" if unknown)."""
        if self._vm_name is None:
            url = (
                f"{self.endpoint}/metadata/instance/compute/name?api-version=2021-02-01&format=text"
            )
            try:
                status, body, _ = _request(
                    self._opener, "GET", url, {"Metadata": "true"}, self._timeout
                )
            except MetadataError:
                return ""  # asked again at the next event
            self._vm_name = body.decode("utf-8", "replace").strip() if status == 200 else ""
        return self._vm_name

    def probe(self) -> bool:
        try:
            self._events()
        except MetadataError:
            return False
        return True

    def check(self) -> Notice | None:
        for event in self._events():
            kind = str(event.get("EventType", ""))
            if kind not in AZURE_FINAL_EVENTS:
                continue
            resources = event.get("Resources") or []
            if isinstance(resources, list) and resources:
                name = self._name()
                if name and name not in [str(r) for r in resources]:
                    continue  # another VM of the set
            event_id = str(event.get("EventId", ""))
            not_before = str(event.get("NotBefore", "") or "")
            detail = f"scheduled event {kind} {event_id}" + (
                f" not before {not_before}" if not_before else ""
            )
            return Notice(
                "azure",
                detail,
                time.monotonic(),
                _parse_http_date(not_before),
                event_id=event_id or None,
            )
        return None

    def acknowledge(self, notice: Notice) -> None:
        """Approve the event (``StartRequests``): Azure may then proceed at once."""
        if notice.source != "azure" or not notice.event_id:
            return
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        req = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Metadata": "true", "Content-Type": "application/json"},
        )
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            err.close()
            raise MetadataError(f"POST {self.url} answered HTTP {err.code}") from None
        except (OSError, ValueError) as err:
            raise MetadataError(f"POST {self.url}: {getattr(err, 'reason', err)}") from None


Provider = AwsSpot | GcpPreemption | AzureScheduledEvents


def detect(timeout: float = _PROBE_TIMEOUT_S) -> Provider | None:
    """The provider whose metadata service answers (AWS, then Azure, then GCP), else None.

    The probes run at once in daemon threads (name resolution cannot be given a timeout), and
    the answer comes after at most about ``timeout`` seconds.
    """
    candidates: list[Provider] = [
        AwsSpot(timeout=timeout),
        AzureScheduledEvents(timeout=timeout),
        GcpPreemption(timeout=timeout),
    ]
    found: dict[str, bool] = {}

    def probe(name: str, fn: Callable[[], bool]) -> None:
        found[name] = fn()

    threads = [
        threading.Thread(target=probe, args=(c.name, c.probe), daemon=True) for c in candidates
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 0.5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for c in candidates:
        if found.get(c.name):
            return c
    return None


class Poller:
    """A daemon thread that calls ``source.check()`` every ``interval`` s until a final notice.

    ``on_notice`` runs in the poller's thread: once for each early notice (polling goes on) and
    once for the final one (polling stops). ``on_error`` gets a message when polling
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
                    if not notice.early:
                        return
                    continue  # poll again at once: the final notice may already be there
            self._stop.wait(self._interval)
