"""A fake cloud metadata server on loopback: AWS IMDSv2 spot notices and GCP preemption.

``FakeMetadata`` runs ``http.server`` in a thread on 127.0.0.1 and a free port. It answers like
the real services, strictly enough to catch a client that skips a step:

- AWS: ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` (else 400) and
  returns a token; ``GET /latest/meta-data/spot/instance-action`` needs that token in
  ``X-aws-ec2-metadata-token`` (else 401), then answers 404 until ``aws_notice()`` is called,
  and the JSON notice after.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (else
  403) and answers ``FALSE`` until ``gcp_preempt()``, then ``TRUE``, with the response header
  ``Metadata-Flavor: Google``.

``env`` gives the variables that point snapstore at it. ``requests`` counts what was asked.
"""

from __future__ import annotations

import collections
import datetime
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["FakeMetadata"]


class FakeMetadata:
    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.notice: dict[str, str] | None = None
        self.preempted = False
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
        }

    def aws_notice(self, action: str = "terminate", in_seconds: float = 120) -> None:
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=in_seconds)
        self.notice = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def gcp_preempt(self) -> None:
        self.preempted = True

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
