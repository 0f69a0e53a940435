"""Unit tests of benchmarks.proxy: byte-exact relaying, latency, bandwidth cap, fault injection.

Everything runs on loopback against a tiny threaded HTTP/1.1 server in this process; each test is
bounded by a pytest timeout and by socket timeouts.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.proxy import ProxySettings, ThrottlingProxy, _TokenBucket

_PATTERN = bytes(range(256)) * 4096  # 1 MiB


def _body(size: int, salt: int) -> bytes:
    reps = size // len(_PATTERN) + 2
    data = (_PATTERN * reps)[salt % 251 : salt % 251 + size]
    return data


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> bytes | None:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    idx = buf.index(marker) + len(marker)
    out = bytes(buf[:idx])
    del buf[:idx]
    return out


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_body(sock: socket.socket, buf: bytearray, head: bytes) -> bytes:
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        parts = []
        while True:
            line = _read_until(sock, buf, b"\r\n")
            assert line is not None
            size = int(line.split(b";")[0], 16)
            if size == 0:
                _read_until(sock, buf, b"\r\n")
                return b"".join(parts)
            parts.append(_read_exact(sock, buf, size))
            _read_exact(sock, buf, 2)
    for line in headers.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return _read_exact(sock, buf, int(line.split(b":")[1]))
    return b""


class _Upstream:
    """GET /N/S answers N bytes of a salted pattern; PUT answers the body's sha256 and length."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = bytearray()
        with conn:
            try:
                while True:
                    head = _read_until(conn, buf, b"\r\n\r\n")
                    if head is None:
                        return
                    self.requests += 1
                    method, path = head.split(b" ")[:2]
                    body = _read_body(conn, buf, head)
                    if method == b"PUT":
                        reply = f"{hashlib.sha256(body).hexdigest()} {len(body)}".encode()
                    else:
                        size, salt = (int(x) for x in path.strip(b"/").split(b"/"))
                        reply = _body(size, salt)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply))
                    conn.sendall(reply)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    yield server
    server.close()


class _Client:
    """A minimal keep-alive HTTP/1.1 client over one connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = bytearray()

    def request(self, head: bytes, body: bytes = b"") -> tuple[bytes, bytes, float]:
        """Returns (status line, body, seconds to the first response byte)."""
        t0 = time.perf_counter()
        self.sock.sendall(head + body)
        first = self.sock.recv(65536)
        ttfb = time.perf_counter() - t0
        if not first:
            raise ConnectionError("closed before any response byte")
        self.buf += first
        resp_head = _read_until(self.sock, self.buf, b"\r\n\r\n")
        assert resp_head is not None
        resp_body = _read_body(self.sock, self.buf, resp_head)
        return resp_head.split(b"\r\n")[0], resp_body, ttfb

    def get(self, size: int, salt: int = 0) -> tuple[bytes, bytes, float]:
        return self.request(b"GET /%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (size, salt))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(30)
def test_passthrough_is_byte_exact(upstream: _Upstream) -> None:
    with ThrottlingProxy(("127.0.0.1", upstream.port)) as proxy:
        client = _Client(proxy.port)
        try:
            for i, size in enumerate((0, 1, 4096, 3 * 2**20 + 17)):
                status, body, _ = client.get(size, salt=i)
                assert status == b"HTTP/1.1 200 OK"
                assert body == _body(size, i)
            payload = _body(2 * 2**20 + 5, 9)
            head = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
            _, reply, _ = client.request(head, payload)
            assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}".encode()
            chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
            head = b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            _, reply, _ = client.request(head, chunked)
            assert reply == f"{hashlib.sha256(b'hello world').hexdigest()} 11".encode()
            status, body, _ = client.get(10, salt=3)  # framing still in step after chunked
            assert body == _body(10, 3)
        finally:
            client.close()
        stats = proxy.snapshot()
    assert stats.requests == 7
    assert stats.connections == 1
    assert upstream.requests == 7
    assert stats.injected_503 == stats.injected_resets == 0


@pytest.mark.timeout(30)
def test_latency_is_added_to_each_request(upstream: _Upstream) -> None:
    latency = 0.15
    with ThrottlingProxy(("127.0.0.1", upstream.port)) as plain:
        client = _Client(plain.port)
        base = min(client.get(100)[2] for _ in range(3))
        client.close()
    with ThrottlingProxy(
        ("127.0.0.1", upstream.port), ProxySettings(latency_ms=latency * 1000)
    ) as p:
        client = _Client(p.port)
        ttfbs = [client.get(100, salt=i)[2] for i in range(4)]  # keep-alive: every request pays
        payload = b"z" * 300_000
        head = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
        put_ttfb = client.request(head, payload)[2]
        client.close()
    assert base < 0.05
    assert all(latency <= t < latency + 0.1 for t in ttfbs), ttfbs
    assert latency <= put_ttfb < latency + 0.2


@pytest.mark.timeout(30)
def test_bandwidth_is_capped_per_connection(upstream: _Upstream) -> None:
    mbps = 80.0  # 10 MB/s
    size = 5_000_000
    with ThrottlingProxy(("127.0.0.1", upstream.port), ProxySettings(bandwidth_mbps=mbps)) as p:
        client = _Client(p.port)
        t0 = time.perf_counter()
        _, body, _ = client.get(size)
        elapsed = time.perf_counter() - t0
        client.close()
    assert body == _body(size, 0)
    rate = size / elapsed / 1e6
    assert 10 * 0.8 <= rate <= 10 * 1.1, f"{rate:.2f} MB/s through an 80 Mbit/s cap"


@pytest.mark.timeout(60)
def test_errors_are_injected_at_about_the_rate(upstream: _Upstream) -> None:
    n = 300
    settings = ProxySettings(error_rate=0.2, seed=7)
    seen = {"ok": 0, "503": 0, "reset": 0}
    with ThrottlingProxy(("127.0.0.1", upstream.port), settings) as p:
        client = _Client(p.port)
        for i in range(n):
            try:
                status, body, _ = client.get(200_000, salt=i)
            except (ConnectionError, OSError):
                seen["reset"] += 1
                client.close()
                client = _Client(p.port)
                continue
            if status.startswith(b"HTTP/1.1 503"):
                assert b"<Code>SlowDown</Code>" in body
                seen["503"] += 1
                client.close()
                client = _Client(p.port)
                continue
            assert status == b"HTTP/1.1 200 OK"
            assert body == _body(200_000, i), "a request that succeeded got wrong bytes"
            seen["ok"] += 1
        client.close()
        stats = p.snapshot()
    assert stats.requests == n
    assert seen["503"] == stats.injected_503
    assert seen["reset"] == stats.injected_resets
    failed = (seen["503"] + seen["reset"]) / n
    assert 0.12 <= failed <= 0.28, seen
    assert seen["503"] > 0 and seen["reset"] > 0, seen


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        ProxySettings(error_rate=1.5)
    with pytest.raises(ValueError, match="latency_ms"):
        ProxySettings(latency_ms=-1)
    assert ProxySettings(bandwidth_mbps=800).bytes_per_second == 100e6


class _FakeTime:
    """A clock that only moves when someone sleeps: token-bucket tests without real time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def test_a_shared_bucket_caps_all_takers_together() -> None:
    """The link cap: three connections taking turns on one bucket get its rate in total, not
    three times it (what per-connection buckets give them)."""
    rate, piece, rounds = 1e6, 100_000, 30
    fake = _FakeTime()
    link = _TokenBucket(rate, clock=fake.clock, sleep=fake.sleep)
    for _ in range(rounds):
        for _conn in range(3):
            link.take(piece)
    total = 3 * piece * rounds
    assert fake.now - 100.0 == pytest.approx((total - link.burst) / rate, rel=1e-9)

    fake = _FakeTime()
    own = [_TokenBucket(rate, clock=fake.clock, sleep=fake.sleep) for _ in range(3)]
    for _ in range(rounds):
        for bucket in own:
            bucket.take(piece)
    # separately, each bucket refills while the others' takers sleep: about a third of the time
    assert fake.now - 100.0 < (total - link.burst) / rate / 2


def test_a_shared_bucket_makes_concurrent_takers_wait_their_turn() -> None:
    """Takers reserve under the lock and sleep their own debt: the second of two simultaneous
    takes waits for both (the clock does not move between them)."""
    fake = _FakeTime()
    waits: list[float] = []
    bucket = _TokenBucket(1e6, clock=fake.clock, sleep=waits.append)
    burst = bucket.burst
    bucket.take(burst)  # the burst is free
    assert waits == []
    bucket.take(500_000)
    bucket.take(500_000)
    assert waits == [pytest.approx(0.5), pytest.approx(1.0)]


@pytest.mark.timeout(60)
def test_link_cap_is_shared_by_all_connections(upstream: _Upstream) -> None:
    """Two connections downloading at once through a 16 Mbit/s (2 MB/s) link cap take at least
    as long as their sum at 2 MB/s (a lower bound only: the cap can only slow them down; with
    a per-connection cap they would take half of it)."""
    size = 2_000_000
    settings = ProxySettings(link_mbps=16.0)
    assert "16 Mbit/s (2 MB/s) for all connections" in settings.describe()
    bodies: list[bytes] = []
    with ThrottlingProxy(("127.0.0.1", upstream.port), settings) as p:
        assert p.link_down is not None
        burst = p.link_down.burst

        def fetch(salt: int) -> None:
            client = _Client(p.port)
            try:
                bodies.append(client.get(size, salt)[1])
            finally:
                client.close()

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        elapsed = time.perf_counter() - t0
    assert sorted(bodies) == sorted([_body(size, 0), _body(size, 1)])
    assert elapsed >= (2 * size - burst) / 2e6 * 0.98, f"{elapsed:.2f} s: the cap was not shared"


def test_link_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="link_mbps"):
        ProxySettings(link_mbps=-1)
    assert ProxySettings(link_mbps=800).link_bytes_per_second == 100e6
