"""A fake cloud metadata server on loopback: AWS IMDSv2, GCP preemption, Azure Scheduled Events.

``FakeMetadata`` runs ``http.server`` in a thread on 127.0.0.1 and a free port. It answers like
the real services, strictly enough to catch a client that skips a step:

- AWS: ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` (else 400) and
  returns a token; ``GET /latest/meta-data/spot/instance-action`` needs that token in
  ``X-aws-ec2-metadata-token`` (else 401), then answers 404 until ``aws_notice()`` is called,
  and the JSON notice after. ``GET /latest/meta-data/events/recommendations/rebalance`` (same
  token rule) answers 404 until ``aws_rebalance()``, then ``{"noticeTime": ...}``.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (else
  403) and answers ``FALSE`` until ``gcp_preempt()``, then ``TRUE``, with the response header
  ``Metadata-Flavor: Google``.
- Azure: ``GET /metadata/scheduledevents?api-version=2020-07-01`` needs ``Metadata: true``
  (else 400) and a known api-version (else 400), and answers ``{"DocumentIncarnation": N,
  "Events": [...]}`` with the events ``azure_event()`` added; ``POST`` of ``{"StartRequests":
  [{"EventId": ...}]}`` to the same URL records the acknowledged ids in ``acked`` (with the
  time) and removes those events. ``GET /metadata/instance/compute/name`` answers ``vm_name``.

``env`` gives the variables that point snapstore at it. ``requests`` counts what was asked.
"""

from __future__ import annotations

import collections
import datetime
import json
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["FakeMetadata"]


class FakeMetadata:
    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.notice: dict[str, str] | None = None
        self.preempted = False
        self.rebalance: dict[str, str] | None = None
        self.azure_events: list[dict[str, object]] = []
        self.incarnation = 1
        self.vm_name = "task-vm-1"
        # (EventId, when, what ack_hook() returned at that moment)
        self.acked: list[tuple[str, float, object]] = []
        self.ack_hook: Callable[[], object] | None = None
        self.requests: collections.Counter[str] = collections.Counter()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, code: int, body: bytes = b"", **headers: str) -> None:
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _azure_ok(self) -> bool:
                if self.headers.get("Metadata") != "true":
                    self._answer(400, b'{"error": "Bad request. Required metadata header"}')
                    return False
                return True

            def do_POST(self) -> None:
                fake.requests[f"POST {self.path}"] += 1
                if not self.path.startswith("/metadata/scheduledevents?api-version=2020-07-01"):
                    return self._answer(404)
                if not self._azure_ok():
                    return None
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                    ids = [str(r["EventId"]) for r in body["StartRequests"]]
                except (ValueError, KeyError, TypeError):
                    return self._answer(400)
                for event_id in ids:
                    seen = fake.ack_hook() if fake.ack_hook is not None else None
                    fake.acked.append((event_id, time.monotonic(), seen))
                fake.azure_events = [e for e in fake.azure_events if e.get("EventId") not in ids]
                fake.incarnation += 1
                return self._answer(200)

            def do_PUT(self) -> None:
                fake.requests[f"PUT {self.path}"] += 1
                if self.path != "/latest/api/token":
                    return self._answer(404)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400)
                return self._answer(200, fake.token.encode())

            def do_GET(self) -> None:
                fake.requests[f"GET {self.path}"] += 1
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != fake.token:
                        return self._answer(401)
                    if fake.notice is None:
                        return self._answer(404, b"Not Found")
                    return self._answer(
                        200, json.dumps(fake.notice).encode(), Content_Type="application/json"
                    )
                if self.path == "/latest/meta-data/events/recommendations/rebalance":
                    if self.headers.get("X-aws-ec2-metadata-token") != fake.token:
                        return self._answer(401)
                    if fake.rebalance is None:
                        return self._answer(404, b"Not Found")
                    return self._answer(200, json.dumps(fake.rebalance).encode())
                if self.path.startswith("/metadata/scheduledevents"):
                    if not self._azure_ok():
                        return None
                    if "api-version=2020-07-01" not in self.path:
                        return self._answer(400, b'{"error": "Bad request. api-version"}')
                    doc = {"DocumentIncarnation": fake.incarnation, "Events": fake.azure_events}
                    return self._answer(
                        200, json.dumps(doc).encode(), Content_Type="application/json"
                    )
                if self.path.startswith("/metadata/instance/compute/name"):
                    if not self._azure_ok():
                        return None
                    return self._answer(200, fake.vm_name.encode())
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._answer(403)
                    body = b"TRUE" if fake.preempted else b"FALSE"
                    return self._answer(200, body, Metadata_Flavor="Google")
                return self._answer(404)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url,
            "GCE_METADATA_HOST": f"127.0.0.1:{self.port}",
            "SNAPSTORE_AZURE_METADATA_ENDPOINT": self.url,
        }

    def aws_notice(self, action: str = "terminate", in_seconds: float = 120) -> None:
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=in_seconds)
        self.notice = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def gcp_preempt(self) -> None:
        self.preempted = True

    def aws_rebalance(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.rebalance = {"noticeTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def azure_event(
        self,
        kind: str = "Preempt",
        in_seconds: float = 30,
        resources: list[str] | None = None,
    ) -> str:
        """Schedule an event (for this VM unless ``resources`` names others); its EventId."""
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=in_seconds)
        event_id = secrets.token_hex(8).upper()
        self.azure_events.append(
            {
                "EventId": event_id,
                "EventStatus": "Scheduled",
                "EventType": kind,
                "ResourceType": "VirtualMachine",
                "Resources": [self.vm_name] if resources is None else resources,
                "NotBefore": when.strftime("%a, %d %b %Y %H:%M:%S GMT"),
                "Description": f"fake {kind}",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }
        )
        self.incarnation += 1
        return event_id

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> FakeMetadata:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()
