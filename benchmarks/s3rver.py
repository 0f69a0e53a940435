"""A local S3 server for one benchmark run: s3rver 3.7.1 (npm) on a free loopback port.

``with LocalS3rver() as server:`` installs s3rver into ``benchmarks/node_modules`` if it is absent
(``npm install --no-save s3rver@3.7.1 --prefix benchmarks``; needs node and npm), starts it
silent on a free loopback port with its own temporary data directory, waits until it answers,
creates the bucket, and on exit (also on Ctrl-C) stops it and deletes the data directory. The
tests start it the same way with ``install=False`` (set-up installs it beforehand; a missing
install is an ``S3rverError`` that says so) and ``bucket=None`` (no bucket of its own).

Caveats (see DESIGN.md): s3rver stores each object as a file, so a key component of 241 bytes or
more kills the server (unhandled ENAMETOOLONG). It therefore runs under a restart loop: a watcher
thread restarts it when it dies (at most ``max_restarts`` times) and counts the restarts, which the
benchmark reports. Objects survive a restart (same data directory). s3rver's credentials are
``S3RVER``/``S3RVER``; its multipart completion copies every part, so it is slow (seconds per GiB)
where real S3 and MinIO are not. It has no UploadPartCopy (501). Its ListObjectsV2 continuation
tokens use DES, which Node >= 17 has only with ``--openssl-legacy-provider`` (we pass it); without
that flag every truncated listing fails with a 500 InternalError.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "S3RVER_ACCESS_KEY",
    "S3RVER_SECRET_KEY",
    "S3RVER_VERSION",
    "LocalS3rver",
    "S3rverError",
    "ensure_installed",
    "installed_entry_point",
]

S3RVER_VERSION = "3.7.1"
S3RVER_ACCESS_KEY = "S3RVER"
S3RVER_SECRET_KEY = "S3RVER"

_BENCH_DIR = Path(__file__).resolve().parent
_NPM_TIMEOUT = 300.0
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0


class S3rverError(RuntimeError):
    """s3rver could not be installed or started; the message says why."""


def _entry_point(prefix: Path) -> Path:
    return prefix / "node_modules" / "s3rver" / "bin" / "s3rver.js"


def _installed_version(prefix: Path) -> str | None:
    package = prefix / "node_modules" / "s3rver" / "package.json"
    try:
        version = json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return str(version)


def ensure_installed(prefix: Path = _BENCH_DIR) -> Path:
    """Returns the s3rver entry script, installing s3rver 3.7.1 with npm first if needed."""
    if _installed_version(prefix) == S3RVER_VERSION and _entry_point(prefix).exists():
        return _entry_point(prefix)
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise S3rverError(
                f"{tool} is not on PATH: install Node.js (Debian: apt-get install npm)"
            )
    cmd = ["npm", "install", "--no-save", "--no-audit", "--no-fund", f"s3rver@{S3RVER_VERSION}"]
    cmd += ["--prefix", str(prefix)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_NPM_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise S3rverError(f"npm install s3rver timed out after {_NPM_TIMEOUT:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise S3rverError(f"npm install s3rver failed: {' / '.join(tail)}")
    if not _entry_point(prefix).exists():
        raise S3rverError(f"npm install succeeded but {_entry_point(prefix)} is missing")
    return _entry_point(prefix)


def installed_entry_point(prefix: Path = _BENCH_DIR) -> Path:
    """The s3rver entry script already installed (by ``scripts/setup.sh`` or an earlier
    ``ensure_installed``); ``S3rverError`` saying how to install it if it is not there."""
    if shutil.which("node") is None:
        raise S3rverError("node is not on PATH: run scripts/setup.sh (Debian: nodejs npm)")
    if _installed_version(prefix) != S3RVER_VERSION or not _entry_point(prefix).exists():
        raise S3rverError(
            f"s3rver {S3RVER_VERSION} is not installed in {prefix / 'node_modules'}: "
            "run scripts/setup.sh"
        )
    return _entry_point(prefix)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalS3rver:
    """s3rver on ``127.0.0.1:port`` under a restart loop; see the module docstring."""

    def __init__(
        self, bucket: str | None = "bench", *, max_restarts: int = 50, install: bool = True
    ) -> None:
        self.bucket = bucket
        self.install = install
        self.access_key = S3RVER_ACCESS_KEY
        self.secret_key = S3RVER_SECRET_KEY
        self.max_restarts = max_restarts
        self.restarts = 0
        self.port = 0
        self.data_dir: Path | None = None
        self._entry: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.failure: str | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        self._entry = ensure_installed() if self.install else installed_entry_point()
        self.data_dir = Path(tempfile.mkdtemp(prefix="bench-s3rver-"))
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready(_READY_TIMEOUT)
                break
            except S3rverError as exc:
                last_error = str(exc)
                self._kill()
        else:
            self.stop()
            raise S3rverError(f"s3rver did not start: {last_error}")
        self._watcher = threading.Thread(target=self._watch, name="s3rver-watch", daemon=True)
        self._watcher.start()
        if self.bucket is not None:
            self._create_bucket()

    def stop(self) -> None:
        """Stops the server (bounded wait, then SIGKILL) and removes its data directory."""
        self._stopping.set()
        self._kill()
        if self._watcher is not None:
            self._watcher.join(_STOP_TIMEOUT)
        self._kill()  # in case the watcher restarted it just before seeing the stop
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        assert self._entry is not None and self.data_dir is not None
        # --openssl-legacy-provider: s3rver makes ListObjectsV2 continuation tokens with DES, which
        # OpenSSL 3 (Node >= 17) only has in its legacy provider; without it every truncated
        # listing (more keys than MaxKeys, so any directory above 1000 entries) is a 500.
        cmd = ["node", "--openssl-legacy-provider", str(self._entry), "-d", str(self.data_dir)]
        cmd += ["-a", "127.0.0.1"]
        cmd += ["-p", str(self.port), "--silent", "--no-vhost-buckets"]
        with self._lock:
            # A session of its own: a Ctrl-C on the terminal must not kill it before we stop it.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        """The server process now (it is restarted if it dies)."""
        with self._lock:
            proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _kill(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                proc = self._proc
            if proc is not None and proc.poll() is not None:
                raise S3rverError(f"s3rver exited with status {proc.returncode} while starting")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as resp:
                    if resp.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # 403 without credentials still means it is serving
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise S3rverError(f"s3rver did not answer on {self.endpoint_url} within {timeout:.0f} s")

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                continue
            if self._stopping.is_set():
                return
            if self.restarts >= self.max_restarts:
                self.failure = f"s3rver died {self.restarts + 1} times; not restarting it again"
                return
            self.restarts += 1
            time.sleep(0.2)
            self._spawn()
            with contextlib.suppress(S3rverError):
                self._wait_ready(_READY_TIMEOUT)

    def _create_bucket(self) -> None:
        assert self.bucket is not None
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        client.create_bucket(Bucket=self.bucket)

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS tools at this server."""
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.endpoint_url,
        )
        return env
