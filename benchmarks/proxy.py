"""A TCP proxy that makes a loopback S3 server behave like a remote one: latency, bandwidth, faults.

This kernel has no netem, so the benchmarks put this proxy between the client and the server. Per
connection it can:

- add first-byte latency: the first byte of each response is held back until ``latency_ms`` after
  the request was completely seen (head and body). A ``100 Continue`` sent before the body is not
  delayed, so a PUT pays the latency once, at its final response, as a GET does;
- cap bandwidth with a token bucket, separately in each direction. The unit is **megabits per
  second** (1 Mbit = 10**6 bits), as ``mbps`` says everywhere else: ``--bandwidth-mbps 800`` is
  100 MB/s per connection, about what one connection to real S3 gets;
- cap the bandwidth of all connections together (``--link-mbps``, per direction): one token
  bucket shared by every connection, as an instance's NIC is shared by all its flows. ``800`` is
  100 MB/s in total however many connections a client opens (with both caps set, a connection
  waits for both);
- inject faults at ``error_rate`` per request: a ``503 SlowDown`` reply (sent by the proxy, with
  ``Connection: close``; the request never reaches the server) or a connection reset (TCP RST),
  half of the time before any response byte and half of the time in the middle of the response.
  ``reset_share`` sets which share of the faults are resets (default one half).

All settings default to 0 (off); the proxy then only relays bytes and counts requests.

Caveats: plain HTTP/1.1 only (no TLS: the proxy must read request heads to find request
boundaries); requests on a connection are assumed sequential (no pipelining, which no S3 client
uses); one thread per connection, so thousands of idle connections cost thousands of threads.
Measured on the 2-core benchmark machine it relays well above 800 MB/s with everything off (see
``benchmarks/README.md``).

Use it as a context manager (``with ThrottlingProxy(("127.0.0.1", port), settings) as proxy:``,
then point clients at ``proxy.endpoint_url``) or as ``python -m benchmarks.proxy --upstream
HOST:PORT --latency-ms 30``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = ["ProxySettings", "ProxyStats", "ThrottlingProxy", "main"]

_BUF_SIZE = 1 << 20
_MAX_HEAD = 64 << 10
_IO_TIMEOUT = 120.0
_POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy does to the traffic it relays; every default means "off"."""

    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    error_rate: float = 0.0
    reset_share: float = 0.5
    seed: int | None = None
    link_mbps: float = 0.0  # all connections together, per direction

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.bandwidth_mbps < 0:
            raise ValueError(f"bandwidth_mbps must be >= 0, got {self.bandwidth_mbps}")
        if self.link_mbps < 0:
            raise ValueError(f"link_mbps must be >= 0, got {self.link_mbps}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {self.error_rate}")
        if not 0.0 <= self.reset_share <= 1.0:
            raise ValueError(f"reset_share must be within [0, 1], got {self.reset_share}")

    @property
    def bytes_per_second(self) -> float:
        """The per-connection, per-direction cap in bytes per second (0: no cap)."""
        return self.bandwidth_mbps * 1e6 / 8

    @property
    def link_bytes_per_second(self) -> float:
        """The cap of all connections together, per direction, in bytes per second (0: none)."""
        return self.link_mbps * 1e6 / 8

    def describe(self) -> str:
        """A short human description, e.g. ``latency 30 ms, 800 Mbit/s per connection``."""
        parts = []
        if self.latency_ms:
            parts.append(f"latency {self.latency_ms:g} ms")
        if self.bandwidth_mbps:
            mb_s = self.bytes_per_second / 1e6
            parts.append(f"{self.bandwidth_mbps:g} Mbit/s ({mb_s:g} MB/s) per connection")
        if self.link_mbps:
            mb_s = self.link_bytes_per_second / 1e6
            parts.append(f"{self.link_mbps:g} Mbit/s ({mb_s:g} MB/s) for all connections")
        if self.error_rate:
            parts.append(f"errors {self.error_rate:g}/request")
        return ", ".join(parts) or "pass-through"


@dataclass
class ProxyStats:
    """Counters since the proxy started; read them with :meth:`ThrottlingProxy.snapshot`."""

    connections: int = 0
    requests: int = 0
    injected_503: int = 0
    injected_resets: int = 0
    upstream_failures: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _TokenBucket:
    """Caps a byte stream at ``rate`` bytes per second, with a small burst.

    Thread-safe, so one bucket can be shared by several connections (the link cap): a taker
    reserves its bytes under the lock and sleeps off its own share of the debt outside it, so N
    connections together get ``rate`` and each waits in the order it reserved. ``clock`` and
    ``sleep`` are injectable so that tests need no real time."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self.burst = max(128 << 10, int(rate * 0.01))
        self._tokens = float(self.burst)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Account ``n`` bytes; sleep until the bucket allows them. Returns the wait."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


# Events produced by the framer: a request head, or a piece of a request body. ``last`` is true
# for the segment that completes the request.
@dataclass
class _Segment:
    data: bytes | memoryview
    is_head: bool
    last: bool
    method: bytes = b""


class _FramingError(Exception):
    pass


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER = range(5)


@dataclass
class _RequestFramer:
    """Splits the client-to-server byte stream into request heads and body pieces."""

    _state: int = _HEAD
    _pending: bytearray = field(default_factory=bytearray)
    _remaining: int = 0
    _method: bytes = b""

    def feed(self, data: memoryview) -> list[_Segment]:
        out: list[_Segment] = []
        pos = 0
        while pos < len(data):
            if self._state in (_BODY, _CHUNK_DATA):
                take = min(self._remaining, len(data) - pos)
                self._remaining -= take
                piece = data[pos : pos + take]
                pos += take
                if self._remaining == 0:
                    if self._state == _BODY:
                        self._state = _HEAD
                        out.append(_Segment(piece, False, True))
                    else:
                        self._state = _CHUNK_SIZE
                        out.append(_Segment(piece, False, False))
                else:
                    out.append(_Segment(piece, False, False))
                continue
            # Line-oriented states: accumulate until the terminator is in.
            terminator = b"\r\n\r\n" if self._state == _HEAD else b"\r\n"
            start = max(0, len(self._pending) - len(terminator) + 1)
            self._pending += data[pos:]
            idx = self._pending.find(terminator, start)
            if idx < 0:
                if len(self._pending) > _MAX_HEAD:
                    raise _FramingError("request head or chunk line longer than 64 KiB")
                break
            end = idx + len(terminator)
            consumed = end - (len(self._pending) - (len(data) - pos))
            pos += consumed
            chunk = bytes(self._pending[:end])
            del self._pending[:]
            out.append(self._line_done(chunk))
        return out

    def _line_done(self, chunk: bytes) -> _Segment:
        if self._state == _HEAD:
            return self._head_done(chunk)
        if self._state == _CHUNK_SIZE:
            size_text = chunk.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise _FramingError(f"bad chunk size line {chunk[:40]!r}") from exc
            if size == 0:
                self._state = _TRAILER
            else:
                self._state = _CHUNK_DATA
                self._remaining = size + 2
            return _Segment(chunk, False, False)
        # _TRAILER: an empty line ends the request; any other line is a trailer field.
        if chunk == b"\r\n":
            self._state = _HEAD
            return _Segment(chunk, False, True)
        return _Segment(chunk, False, False)

    def _head_done(self, head: bytes) -> _Segment:
        lines = head.split(b"\r\n")
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            raise _FramingError(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
        method = request_line[0].upper()
        length = 0
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError as exc:
                    raise _FramingError(f"bad Content-Length {value[:40]!r}") from exc
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            self._state = _CHUNK_SIZE
            return _Segment(head, True, False, method)
        if length > 0:
            self._state = _BODY
            self._remaining = length
            return _Segment(head, True, False, method)
        self._state = _HEAD
        return _Segment(head, True, True, method)


def _slowdown_reply(method: bytes) -> bytes:
    request_id = f"{random.getrandbits(64):016X}"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        "<Message>Please reduce your request rate. (injected by benchmarks.proxy)</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        f"x-amz-request-id: {request_id}\r\n\r\n"
    ).encode()
    return head if method == b"HEAD" else head + body


class _Connection:
    """Relays one client connection; runs on its own thread."""

    def __init__(
        self, proxy: ThrottlingProxy, client: socket.socket, upstream: socket.socket
    ) -> None:
        self._proxy = proxy
        self._settings = proxy.settings
        self._client = client
        self._upstream = upstream
        self._framer = _RequestFramer()
        self._deadline: float | None = None
        self._reset_mid_response = False
        rate = self._settings.bytes_per_second
        self._up_buckets = [_TokenBucket(rate)] if rate else []
        self._down_buckets = [_TokenBucket(rate)] if rate else []
        if proxy.link_up is not None and proxy.link_down is not None:
            self._up_buckets.append(proxy.link_up)
            self._down_buckets.append(proxy.link_down)
        self._buf = bytearray(_BUF_SIZE)
        self._chunk = min([_BUF_SIZE, *(b.burst for b in self._down_buckets)])

    def run(self) -> None:
        try:
            self._relay()
        except (OSError, _FramingError):
            pass
        finally:
            for sock in (self._client, self._upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def _relay(self) -> None:
        client_open = upstream_open = True
        view = memoryview(self._buf)
        while (client_open or upstream_open) and not self._proxy.stopping:
            watch = [
                s for s, o in ((self._client, client_open), (self._upstream, upstream_open)) if o
            ]
            ready, _, _ = select.select(watch, [], [], _POLL_INTERVAL)
            if self._upstream in ready:
                n = self._upstream.recv_into(view, self._chunk)
                if n == 0:
                    upstream_open = False
                    with contextlib.suppress(OSError):
                        self._client.shutdown(socket.SHUT_WR)
                    if not client_open:
                        return
                elif not self._send_response(view[:n]):
                    return
            if self._client in ready and client_open:
                n = self._client.recv_into(view, self._chunk)
                if n == 0:
                    client_open = False
                    with contextlib.suppress(OSError):
                        self._upstream.shutdown(socket.SHUT_WR)
                    if not upstream_open:
                        return
                elif not self._handle_request_bytes(view[:n]):
                    return

    def _send_response(self, data: memoryview) -> bool:
        """Relays response bytes; False once the connection has been torn down."""
        if self._deadline is not None:
            delay = self._deadline - time.monotonic()
            self._deadline = None
            if delay > 0:
                time.sleep(delay)
        if self._reset_mid_response:
            cut = random.randrange(len(data))
            if cut:
                self._client.sendall(data[:cut])
            self._reset()
            return False
        for bucket in self._down_buckets:
            bucket.take(len(data))
        self._client.sendall(data)
        self._proxy._count(bytes_down=len(data))
        return True

    def _handle_request_bytes(self, data: memoryview) -> bool:
        for seg in self._framer.feed(data):
            if seg.is_head:
                self._proxy._count(requests=1)
                fault = self._proxy._draw_fault()
                if fault == "503":
                    self._reply_slowdown(seg.method)
                    return False
                if fault == "reset-before":
                    self._reset()
                    return False
                if fault == "reset-mid":
                    self._reset_mid_response = True
            if seg.last and self._settings.latency_ms:
                self._deadline = time.monotonic() + self._settings.latency_ms / 1000
            for bucket in self._up_buckets:
                bucket.take(len(seg.data))
            self._upstream.sendall(seg.data)
            self._proxy._count(bytes_up=len(seg.data))
        return True

    def _reset(self) -> None:
        """Aborts the client connection with a TCP RST (SO_LINGER 0, then close)."""
        self._proxy._count(injected_resets=1)
        with contextlib.suppress(OSError):
            self._client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._client.close()

    def _reply_slowdown(self, method: bytes) -> None:
        """Sends a 503 SlowDown with Connection: close, then closes without losing the reply."""
        self._proxy._count(injected_503=1)
        if self._settings.latency_ms:
            time.sleep(self._settings.latency_ms / 1000)
        with contextlib.suppress(OSError):
            self._upstream.close()
        self._client.sendall(_slowdown_reply(method))
        self._client.shutdown(socket.SHUT_WR)
        # Lingering close: read (and drop) whatever body the client still sends, so that closing
        # with unread data does not turn into a RST that could destroy the reply in flight.
        end = time.monotonic() + 2.0
        self._client.settimeout(0.2)
        while time.monotonic() < end and not self._proxy.stopping:
            try:
                if not self._client.recv(_BUF_SIZE):
                    break
            except TimeoutError:
                continue


class ThrottlingProxy:
    """A threaded TCP proxy in front of ``upstream``; see the module docstring.

    ``with ThrottlingProxy(("127.0.0.1", 4568), ProxySettings(latency_ms=30)) as proxy:`` listens
    on a free loopback port (``proxy.port``, ``proxy.endpoint_url``) until the block ends.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        settings: ProxySettings | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.upstream = upstream
        self.settings = settings or ProxySettings()
        self._listen_addr = listen
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._rng = random.Random(self.settings.seed)
        self.stopping = False
        # the link cap: one bucket per direction shared by every connection
        link = self.settings.link_bytes_per_second
        self.link_up = _TokenBucket(link) if link else None
        self.link_down = _TokenBucket(link) if link else None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the proxy is not running")
        return int(self._listener.getsockname()[1])

    @property
    def endpoint_url(self) -> str:
        host = self._listen_addr[0] or "127.0.0.1"
        return f"http://{host}:{self.port}"

    def snapshot(self) -> ProxyStats:
        """A copy of the counters."""
        with self._lock:
            return ProxyStats(**vars(self._stats))

    def start(self) -> None:
        listener = socket.create_server(self._listen_addr, backlog=128)
        listener.settimeout(_POLL_INTERVAL)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="proxy-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops accepting, tears down every connection and waits (bounded) for the threads."""
        self.stopping = True
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        end = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, end - time.monotonic()))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                self._count(upstream_failures=1)
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(_IO_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._count(connections=1)
            conn = _Connection(self, client, upstream)
            thread = threading.Thread(target=conn.run, name="proxy-conn", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _draw_fault(self) -> str | None:
        s = self.settings
        if not s.error_rate:
            return None
        with self._lock:
            if self._rng.random() >= s.error_rate:
                return None
            if self._rng.random() >= s.reset_share:
                return "503"
            return "reset-before" if self._rng.random() < 0.5 else "reset-mid"


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.proxy``: run the proxy in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.proxy",
        description="TCP proxy adding latency, a bandwidth cap and faults to S3 traffic.",
    )
    parser.add_argument(
        "--upstream", type=_host_port, required=True, help="HOST:PORT of the server"
    )
    parser.add_argument(
        "--listen", type=_host_port, default=("127.0.0.1", 0), help="HOST:PORT (default: free port)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="first-byte latency per request"
    )
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=0.0,
        help="cap per connection and direction, megabits/s (800 = 100 MB/s); 0 = off",
    )
    parser.add_argument(
        "--link-mbps",
        type=float,
        default=0.0,
        help="cap of all connections together, per direction, megabits/s (an instance's NIC); "
        "0 = off",
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.0, help="share of requests failed (503 or reset)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for fault injection")
    args = parser.parse_args(argv)
    try:
        settings = ProxySettings(
            args.latency_ms,
            args.bandwidth_mbps,
            args.error_rate,
            seed=args.seed,
            link_mbps=args.link_mbps,
        )
    except ValueError as exc:
        parser.error(str(exc))
    # SIGTERM (how the benchmark harness stops it) ends the run like Ctrl-C, printing the stats.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ThrottlingProxy(args.upstream, settings, args.listen) as proxy:
        print(
            f"proxy {proxy.endpoint_url} -> {args.upstream[0]}:{args.upstream[1]} "
            f"({settings.describe()}); Ctrl-C to stop",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        print("stats " + json.dumps(vars(proxy.snapshot())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
