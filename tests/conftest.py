"""Root fixtures: the S3 test server, fresh buckets, real FUSE mounts, and the log check.

- ``moto_server`` (session): moto's server mode as a real HTTP S3 endpoint in a subprocess on a
  free loopback port. While it runs, the environment carries dummy AWS credentials
  (``AWS_ACCESS_KEY_ID=testing``, ...), ``AWS_DEFAULT_REGION=us-east-1`` and loopback in
  ``NO_PROXY``; tests that set their own values (``monkeypatch.setenv``, ``env=``) win, since
  those apply later and are undone first.
- ``rgw_server`` (session): Ceph RGW on a single-node cluster the tests start themselves
  (``tests/rgw.py``; about 20 s once per session; every daemon stopped at its end).
- ``s3_bucket``: a fresh, uniquely named bucket per test (emptied and deleted afterwards).
- ``fusion_mount``: a factory of real mounts (``python -m fusionfs mount ... --foreground``);
  whatever a test leaves mounted is unmounted in teardown, and a daemon that has to be killed,
  or a mount that will not go, fails the test.
- every test fails on a WARNING or ERROR record from the ``fusionfs`` or ``snapstore`` loggers
  unless it declares it: ``@pytest.mark.allow_logs("substring", ...)`` (S3QL's
  ``pytest_checklogs``). Records in the test body fail the test itself; records during fixture
  setup or teardown fail it as a teardown error.
- the same holds for the log of every daemon ``fusion_mount`` started: a WARNING, ERROR or
  CRITICAL record in it (any logger; the record's text with its traceback, if any, is what
  ``allow_logs`` substrings are matched against) fails the test unless declared with the same
  marker. What the daemons logged by the end of the test body fails the test itself; what they
  log after (at unmount) fails its teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from helpers import free_port, missing
from s3servers import SERVERS, S3Bucket, S3Server, bucket_on

REPO_ROOT = Path(__file__).resolve().parent.parent

_LOG_ROOTS = ("fusionfs", "snapstore")
_MOUNT_TIMEOUT_S = 20.0
_UNMOUNT_TIMEOUT_S = 30.0
_LOG_TAIL_LINES = 40
#: the start of a record in a daemon's log (``fusionfs.cli._setup_logging``'s format)
_DAEMON_RECORD = re.compile(
    rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) \S+: ", re.MULTILINE
)
_DAEMON_LEVELS = {b"WARNING", b"ERROR", b"CRITICAL"}
#: pyfuse3 logs an ERROR when the kernel no longer waits for a reply (``fuse_reply_*`` gives
#: ENOENT: the request was interrupted, or aborted at unmount, e.g. an asynchronous RELEASE).
#: The daemon's work for it is done; the caller was told by its own outcome. Never a test's
#: failure. Other reply errors still are.
_KERNEL_STOPPED_WAITING = re.compile(
    r"fuse_\w+\(\): fuse_reply_\* failed with No such file or directory$"
)
#: a garbage collection (``snapstore run`` ends with one) stops, deleting nothing, when an object
#: changes while it reads the manifests: a task that runs on (left running after a failed
#: checkpoint, or resumed) appends to its output meanwhile. The daemon logs that refusal; it is
#: the documented safe outcome (S-CHUNK-7), never a test's failure. Any other gc failure is.
_GC_STOPPED_BY_A_CHANGE = re.compile(
    r"garbage collection stopped: \S.* changed while the manifests were being read; "
    r"nothing was deleted"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stress",
        action="store_true",
        default=False,
        help="run the concurrency model tests at their long setting (thousands of examples)",
    )
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run the long compatibility runs on every store and S3 server, not only on the "
        "one CI uses (also FUSIONFS_TEST_FULL=1); e.g. tests/compat/test_pjdfstest.py",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_logs(*substrings): WARNING/ERROR records from fusionfs/snapstore loggers, or in "
        "the log of a daemon fusion_mount started, whose message contains one of the "
        "substrings do not fail the test",
    )


# --------------------------------------------------------------------------------------------
# log check


class _RecordingHandler(logging.Handler):
    """Keeps WARNING+ records from loggers named ``fusionfs*`` or ``snapstore*``.

    Attached to the root logger and to the ``fusionfs``/``snapstore`` loggers themselves (in
    case something turns their propagation off); a record seen twice is kept once.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_LOG_ROOTS):
            return
        if getattr(record, "_fusionfs_checked_by", None) is self:
            return  # already kept on its way up to the root logger
        setattr(record, "_fusionfs_checked_by", self)  # noqa: B010
        self.records.append(record)


_LOG_HANDLER = pytest.StashKey[_RecordingHandler]()


def _unexpected_logs(item: pytest.Item, handler: _RecordingHandler) -> list[str]:
    """Format (and consume) the recorded records that no ``allow_logs`` marker allows."""
    allowed = _allowed_logs(item)
    records, handler.records = handler.records, []
    bad = []
    for record in records:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        if not any(s in text for s in allowed):
            bad.append(f"{record.levelname} {record.name}: {text}")
    return bad


def _allowed_logs(item: pytest.Item) -> list[str]:
    return [str(s) for mark in item.iter_markers("allow_logs") for s in mark.args]


def _log_failure(bad: list[str]) -> str:
    return (
        "unexpected WARNING/ERROR log records (declare expected ones with "
        "@pytest.mark.allow_logs('substring')):\n  " + "\n  ".join(bad)
    )


@pytest.fixture(autouse=True)
def _check_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    handler = _RecordingHandler()
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in _LOG_ROOTS)]
    for logger in loggers:
        logger.addHandler(handler)
    request.node.stash[_LOG_HANDLER] = handler
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    bad = _unexpected_logs(request.node, handler)
    if bad:
        pytest.fail(_log_failure(bad), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    result = yield  # a failing test raises here, and keeps its own failure
    bad = []
    handler = item.stash.get(_LOG_HANDLER, None)
    if handler is not None:
        bad += _unexpected_logs(item, handler)
    mounts = item.stash.get(_MOUNTS, None)
    if mounts is not None:
        bad += mounts.unexpected_logs(_allowed_logs(item))
    if bad:
        pytest.fail(_log_failure(bad), pytrace=False)
    return result


# --------------------------------------------------------------------------------------------
# S3 test server


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    tail = text.splitlines()[-lines:]
    return f"--- last {len(tail)} lines of {path} ---\n" + "\n".join(tail)


def _http_up(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_moto(log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A moto S3 server in a subprocess on a free loopback port (``env`` added to its
    environment); its URL, the server stopped on exit."""
    try:
        import moto.server  # noqa: F401
    except ImportError as err:
        missing("moto's S3 server", f"cannot import moto.server ({err}): pip install moto[server]")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1,localhost"])))
        proc: subprocess.Popen[bytes] | None = None
        url = ""
        for _ in range(3):  # free_port() is racy: try another port if this one was taken
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                )
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                if _http_up(url):
                    break
                time.sleep(0.1)
            if proc.poll() is None and _http_up(url):
                break
            _stop(proc)
            proc = None
        if proc is None:
            pytest.fail(f"moto server did not start\n{_tail(log_path)}", pytrace=False)
        try:  # the credentials stay in the environment while the server runs
            yield url
        finally:
            _stop(proc)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server (``http://127.0.0.1:PORT``) running for the whole session."""
    with start_moto(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="module")
def wrong_crc_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto server that computes wrong CRC32Cs: its ``crc32c`` package hidden, it stores a
    CRC32 under the CRC32C's name for what it checksums itself (copies; S-SRV-6)."""
    hide = tmp_path_factory.mktemp("hide-crc32c")
    (hide / "crc32c.py").write_text('raise ImportError("hidden by the test")\n')
    log = tmp_path_factory.mktemp("moto-nocrc") / "moto.log"
    with start_moto(log, {"PYTHONPATH": str(hide)}) as url:
        yield S3Server("moto", url, "testing", "testing")


@pytest.fixture(scope="session")
def moto(moto_server: str) -> S3Server:
    """The moto server as an ``S3Server``."""
    return S3Server("moto", moto_server, "testing", "testing")


@pytest.fixture(scope="session")
def rgw_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Ceph RGW (``tests/rgw.py``: mon + mgr + one bluestore OSD + radosgw on loopback) as an
    ``S3Server`` named ``rgw``, started once per session (about 20 s) and stopped at its end."""
    import rgw

    absent = rgw.missing_programs()
    if absent:
        missing(
            "Ceph RGW",
            f"{', '.join(absent)} not on PATH (scripts/setup.sh installs "
            "ceph-mon ceph-osd ceph-mgr radosgw)",
        )
    root = tmp_path_factory.mktemp("rgw")
    scratch = None
    if rgw.on_tmpfs(root):  # bluestore wants O_DIRECT, which tmpfs lacks
        scratch = Path(tempfile.mkdtemp(prefix="fusionfs-rgw-", dir="/var/tmp"))
        root = scratch
    cluster = rgw.RgwCluster(root)
    try:
        started = time.monotonic()
        try:
            server = cluster.start()
        except rgw.RgwError as err:
            pytest.fail(f"Ceph RGW did not start: {err}", pytrace=False)
        logging.getLogger("tests.rgw").info(
            "Ceph RGW answering at %s after %.1f s", server.endpoint, time.monotonic() - started
        )
        yield server
    finally:
        problems = cluster.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if problems:
        pytest.fail("stopping Ceph RGW needed force: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def s3rver_server() -> Iterator[S3Server]:
    """s3rver 3.7.1 (npm) on a free loopback port for the whole session, as an ``S3Server``.

    Started by ``benchmarks/s3rver.py``'s ``LocalS3rver`` (node with --openssl-legacy-provider,
    under a restart loop: a key component of 241+ bytes kills s3rver), which scripts/setup.sh
    installed beforehand: nothing is installed at run time. Credentials: S3RVER/S3RVER.
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.s3rver import LocalS3rver, S3rverError

    server = LocalS3rver(bucket=None, install=False)
    try:
        server.start()
    except S3rverError as err:
        server.stop()
        missing("s3rver", str(err))
    try:
        yield S3Server("s3rver", server.endpoint_url, server.access_key, server.secret_key)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto: S3Server) -> Iterator[S3Bucket]:
    """A fresh bucket on the moto server, removed with its contents after the test."""
    with bucket_on(moto) as bucket:
        yield bucket


@pytest.fixture(params=SERVERS)
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 server of ``tests/s3servers.py`` in turn (started once per session by its
    ``<name>_server`` fixture); a test narrows it with
    ``@pytest.mark.parametrize("s3_server", ["rgw"], indirect=True)``."""
    name = request.param
    if name == "moto":
        server: S3Server = request.getfixturevalue("moto")
        return server
    server = request.getfixturevalue(f"{name}_server")
    return server


@pytest.fixture
def server_bucket(s3_server: S3Server) -> Iterator[S3Bucket]:
    """A fresh bucket on ``s3_server``, removed with its contents after the test."""
    with bucket_on(s3_server) as bucket:
        yield bucket


# --------------------------------------------------------------------------------------------
# real FUSE mounts


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mount point, per /proc/self/mountinfo.

    Unlike ``os.path.ismount`` this is also true for a FUSE mount whose daemon died
    ("Transport endpoint is not connected").
    """
    target = os.path.abspath(os.fspath(path))
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(_unescape_mountinfo(line.split()[4]) == target for line in f if line.strip())
    except OSError:
        return os.path.ismount(target)


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["fusermount3", *args], capture_output=True, text=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(err.cmd, -1, "", f"timed out after {err.timeout} s")


class Mount:
    """One ``fusionfs mount`` daemon and its mount point."""

    def __init__(
        self,
        factory: _MountFactory,
        source: str,
        path: Path,
        cache_dir: Path,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        extra_args: tuple[str, ...],
        env: dict[str, str],
    ) -> None:
        self.source = source
        self.path = path
        self.cache_dir = cache_dir
        self.proc = proc
        self.log_path = log_path
        self.extra_args = extra_args
        self._factory = factory
        self._env = env
        self._killed = False  # killed on purpose by the test (kill())
        self._log_checked = 0  # bytes of the log whose records were handed out

    def new_log_records(self) -> list[str]:
        """The daemon's WARNING, ERROR and CRITICAL records (each with its continuation lines,
        e.g. a traceback) not handed out before. While the daemon runs, a last line without
        its newline is left for later. (A record is written whole: one write of up to 8 KiB.)"""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_checked)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1 if self.proc.poll() is None else len(data)
        starts = [m.start() for m in _DAEMON_RECORD.finditer(data, 0, end)]
        records = []
        for start, stop in itertools.pairwise([*starts, end]):
            head = _DAEMON_RECORD.match(data, start)
            if head is not None and head["level"] in _DAEMON_LEVELS:
                text = data[head.end("level") + 1 : stop].decode(errors="replace").rstrip("\n")
                if not (
                    _KERNEL_STOPPED_WAITING.search(text) or _GC_STOPPED_BY_A_CHANGE.search(text)
                ):
                    records.append(text)
        self._log_checked += end
        return records

    def __repr__(self) -> str:
        return f"<Mount {self.source} at {self.path} pid={self.proc.pid}>"

    def log_tail(self) -> str:
        return _tail(self.log_path)

    def unmount(self, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m fusionfs unmount PATH``, then wait for the daemon to exit.

        With ``check`` (the default) a non-zero exit, a daemon still running 30 s later, or a
        mount still present raises ``AssertionError`` with the daemon's log tail. Without, the
        command's result is returned for the test to judge (the daemon is waited for only if
        the command succeeded).
        """
        argv = [sys.executable, "-m", "fusionfs", "unmount", str(self.path)]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=self._env,
                check=False,
                timeout=_UNMOUNT_TIMEOUT_S * 2,
            )
        except subprocess.TimeoutExpired as err:
            raise AssertionError(
                f"'fusionfs unmount {self.path}' did not finish in {err.timeout} s\n"
                f"{self.log_tail()}"
            ) from err
        said = f"stdout: {result.stdout.strip()!r}\nstderr: {result.stderr.strip()!r}"
        if result.returncode != 0:
            if check:
                raise AssertionError(
                    f"'fusionfs unmount {self.path}' exited with {result.returncode}\n{said}\n"
                    f"{self.log_tail()}"
                )
            return result
        try:
            self.proc.wait(_UNMOUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(
                f"the daemon (pid {self.proc.pid}) was still running {_UNMOUNT_TIMEOUT_S:g} s "
                f"after 'fusionfs unmount'\n{said}\n{self.log_tail()}"
            ) from err
        if check and is_mounted(self.path):
            raise AssertionError(f"{self.path} is still mounted after unmount\n{self.log_tail()}")
        return result

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), then detach the mount: fusermount3 -u, then -uz."""
        self._killed = True
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if is_mounted(self.path):
            _fusermount("-u", str(self.path))
        if is_mounted(self.path):
            _fusermount("-uz", str(self.path))
        assert not is_mounted(self.path), f"{self.path} still mounted after kill()"

    def remount(self, fresh_cache: bool = False) -> Mount:
        """Unmount (if still mounted) and mount the same source at the same path again.

        ``fresh_cache`` deletes the cache directory first: the new mount is "another machine".
        """
        if self.proc.poll() is None or is_mounted(self.path):
            self.unmount()
        if fresh_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir.mkdir(parents=True)
        return self._factory.start(
            self.source, self.path, self.cache_dir, self.extra_args, self._env
        )

    def _cleanup(self) -> list[str]:
        """Teardown: unmount whatever is left; report anything that needed force."""
        problems: list[str] = []
        if is_mounted(self.path):
            first = _fusermount("-u", str(self.path))
            if is_mounted(self.path):
                lazy = _fusermount("-uz", str(self.path))
                problems.append(
                    f"{self.path} would not unmount (fusermount3 -u: "
                    f"{first.stderr.strip() or first.returncode}); lazily detached "
                    f"(fusermount3 -uz: {lazy.stderr.strip() or lazy.returncode})"
                )
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if not self._killed:
                    problems.append(
                        f"the daemon (pid {self.proc.pid}) did not exit after its mount went "
                        "away and had to be killed"
                    )
        if problems:
            problems.append(self.log_tail())
        return problems


class _MountFactory:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._count = 0
        self._starts = 0
        self.mounts: list[Mount] = []

    def unexpected_logs(self, allowed: Sequence[str]) -> list[str]:
        """The daemons' new WARNING/ERROR records that no ``allowed`` substring matches."""
        bad = []
        for mount in self.mounts:
            for record in mount.new_log_records():
                if not any(s in record for s in allowed):
                    lines = record.splitlines()
                    shown = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
                    bad.append(f"{mount.log_path.name}: {shown}")
        return bad

    def __call__(
        self,
        source: str,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Mount:
        self._count += 1
        path = self._tmp / f"mnt{self._count}"
        path.mkdir()
        cache = Path(cache_dir) if cache_dir is not None else self._tmp / f"cache{self._count}"
        cache.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        )
        full_env.update(env or {})
        return self.start(source, path, cache, tuple(extra_args), full_env)

    def start(
        self,
        source: str,
        path: Path,
        cache_dir: Path,
        extra_args: tuple[str, ...],
        env: dict[str, str],
    ) -> Mount:
        self._starts += 1
        log_path = self._tmp / f"mount{self._starts}.log"
        argv = [
            sys.executable,
            "-m",
            "fusionfs",
            "mount",
            source,
            str(path),
            "--cache-dir",
            str(cache_dir),
            "--foreground",
            "--log-level",
            "debug",
            *extra_args,
        ]
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._tmp,
            )
        mount = Mount(self, source, path, cache_dir, proc, log_path, extra_args, env)
        self.mounts.append(mount)
        deadline = time.monotonic() + _MOUNT_TIMEOUT_S
        while not os.path.ismount(path):
            code = proc.poll()
            if code is not None:
                pytest.fail(
                    f"fusionfs exited with {code} before {path} was mounted\n{mount.log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                problems = mount._cleanup()
                pytest.fail(
                    f"{path} was not mounted after {_MOUNT_TIMEOUT_S:g} s\n"
                    + "\n".join(problems or [mount.log_tail()]),
                    pytrace=False,
                )
            time.sleep(0.05)
        return mount


_MOUNTS = pytest.StashKey[_MountFactory]()


@pytest.fixture
def fusion_mount(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_MountFactory]:
    """Factory: ``m = fusion_mount(source, extra_args=(), env=None, cache_dir=None)``.

    The daemons' logs are checked (see the module docstring: ``allow_logs``)."""
    if not os.path.exists("/dev/fuse"):
        missing("FUSE", "/dev/fuse does not exist")
    if shutil.which("fusermount3") is None:
        missing("FUSE", "fusermount3 is not on PATH (Debian package fuse3)")
    factory = _MountFactory(tmp_path)
    request.node.stash[_MOUNTS] = factory
    try:
        yield factory
    finally:
        problems: list[str] = []
        for mount in factory.mounts:
            try:
                problems.extend(mount._cleanup())
            except Exception as err:
                problems.append(f"cleaning up {mount!r} failed: {type(err).__name__}: {err}")
        if problems:
            pytest.fail("mount teardown needed force:\n" + "\n".join(problems), pytrace=False)
        bad = factory.unexpected_logs(_allowed_logs(request.node))
        if bad:
            pytest.fail(_log_failure(bad), pytrace=False)
