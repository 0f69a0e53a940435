"""A single-node Ceph cluster with RGW (the S3 gateway) for the tests, without systemd.

``RgwCluster(root).start()`` builds and starts, all under ``root`` (config, keyrings, daemon
data, logs, run files): one monitor, one manager, one bluestore OSD on a sparse 10 GiB file,
pool size 1, and ``radosgw`` with the beast frontend on a free loopback port (``tcp_nodelay=1``:
without it every small GET stalls about 40 ms). An S3 user comes from ``radosgw-admin user
create``; ``start`` returns an ``S3Server`` named ``rgw`` once a bucket call answers. ``stop``
ends every daemon it started (SIGTERM, then SIGKILL after a deadline) and removes the OSD's
block file. The daemons run in the foreground (``-f``) as children of the test process, with
``MALLOC_ARENA_MAX=2`` (peak RSS 1278 MiB without it, 864 MiB with, per DESIGN.md).

The packages (Debian bookworm: ``ceph-mon ceph-osd ceph-mgr radosgw``, Ceph 16.2) come from
``scripts/setup.sh``; ``missing_programs()`` says which of the programs are absent. ``root``
must not be on tmpfs: bluestore opens its block file with O_DIRECT (``start`` refuses such a
directory with one clear line). Failures raise ``RgwError`` carrying the tail of the daemons'
logs.

Everything waits on a deadline (polling what it waits for), never a fixed sleep.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from helpers import free_port
from s3servers import S3Server

__all__ = ["PROGRAMS", "RgwCluster", "RgwError", "missing_programs", "on_tmpfs"]

PROGRAMS = (
    "ceph-mon",
    "ceph-mgr",
    "ceph-osd",
    "radosgw",
    "radosgw-admin",
    "ceph",
    "ceph-authtool",
    "monmaptool",
)

_START_DEADLINE_S = 150.0  # whole start-up; measured 26-31 s on a 2-core machine
_STOP_DEADLINE_S = 20.0  # per daemon, after SIGTERM
_LOG_TAIL_LINES = 25
_BLOCK_SIZE = 10 << 30


class RgwError(RuntimeError):
    """The cluster could not be set up or started (the message carries the logs' tails)."""


def missing_programs() -> list[str]:
    """The programs of ``PROGRAMS`` not on PATH (``scripts/setup.sh`` installs them)."""
    return [name for name in PROGRAMS if shutil.which(name) is None]


def on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lies on a tmpfs (or ramfs), per /proc/self/mounts."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].encode().decode("unicode_escape")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, fields[2]
    except OSError:
        return False
    return fstype in ("tmpfs", "ramfs")


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RgwCluster:
    """One mon (``a``), one mgr (``a``), one OSD (``0``) and one radosgw, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "ceph.conf"
        self.log_dir = root / "log"
        self.run_dir = root / "run"
        self.block = root / "osd" / "block"
        self.fsid = str(uuid.uuid4())
        self.mon_port = 0
        self.rgw_port = 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._deadline = 0.0
        self.env = dict(os.environ, MALLOC_ARENA_MAX="2")
        # a proxy in the environment must not catch requests to loopback
        self.env["NO_PROXY"] = self.env["no_proxy"] = ",".join(
            filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])
        )

    # ---------------------------------------------------------------------------------------
    # start

    def start(self) -> S3Server:
        """Build the cluster and start every daemon; the S3 server once it answers."""
        if on_tmpfs(self.root):
            raise RgwError(f"{self.root} is on tmpfs: bluestore needs O_DIRECT (use a disk)")
        self._deadline = time.monotonic() + _START_DEADLINE_S
        for sub in ("log", "run", "mon", "mgr/ceph-a", "osd/ceph-0"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self._write_conf()
        self._make_mon()
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])
        self._wait(lambda: _port_answers(self.mon_port), "mon.a to listen", "mon.a")
        # every key was put into the monitor's keyring at its mkfs: one CLI call remains
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RgwError(f"'ceph osd new' gave id {osd_id!r}, expected 0")
        self._spawn("mgr.a", ["ceph-mgr", "-i", "a"])
        self._run(
            ["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid],
            "mkfs of osd.0",
            timeout=self._left(),
        )
        self._spawn("osd.0", ["ceph-osd", "-i", "0"])
        self._spawn("client.rgw.a", ["radosgw", "-n", "client.rgw.a"])
        # radosgw-admin blocks until the OSD serves the rgw pools (radosgw creates them)
        access_key = "RGW" + secrets.token_hex(8).upper()
        secret_key = secrets.token_urlsafe(30)
        self._run(
            [
                "radosgw-admin",
                "-n",
                "client.admin",
                "user",
                "create",
                "--uid",
                "fusionfs-tests",
                "--display-name",
                "fusionfs tests",
                "--access-key",
                access_key,
                "--secret-key",
                secret_key,
            ],
            "radosgw-admin user create",
            timeout=self._left(),
        )
        server = S3Server("rgw", f"http://127.0.0.1:{self.rgw_port}", access_key, secret_key)
        self._wait(lambda: self._s3_answers(server), "radosgw to answer S3 calls", "client.rgw.a")
        return server

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""\
[global]
fsid = {self.fsid}
mon initial members = a
mon host = v2:127.0.0.1:{self.mon_port}
ms bind msgr1 = false
ms bind ipv6 = false
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {r}/admin.keyring
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 500

[mon]
mon data = {r}/mon/$cluster-$id
mon allow pool delete = true

[mgr]
mgr data = {r}/mgr/$cluster-$id
keyring = {r}/mgr/$cluster-$id/keyring

[osd]
osd data = {r}/osd/$cluster-$id
keyring = {r}/osd/$cluster-$id/keyring
osd objectstore = bluestore
bluestore block path = {self.block}
bluestore block create = true
bluestore block size = {_BLOCK_SIZE}
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
bluestore rocksdb options = compression=kNoCompression,max_write_buffer_number=2,\
min_write_buffer_number_to_merge=1,write_buffer_size=16777216

[client.rgw.a]
keyring = {r}/rgw.keyring
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1
rgw thread pool size = 32
rgw dns name = 127.0.0.1
""")

    def _make_mon(self) -> None:
        """Keyrings for every daemon (all imported into the monitor's), monmap, mon mkfs."""
        r = self.root
        mon_keyring = r / "mon.keyring"
        keys = {
            "mon.": (mon_keyring, ["mon", "allow *"]),
            "client.admin": (
                r / "admin.keyring",
                ["mon", "allow *", "osd", "allow *", "mds", "allow *", "mgr", "allow *"],
            ),
            "mgr.a": (
                r / "mgr/ceph-a/keyring",
                ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"],
            ),
            "osd.0": (
                r / "osd/ceph-0/keyring",
                ["mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *"],
            ),
            "client.rgw.a": (
                r / "rgw.keyring",
                ["mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw"],
            ),
        }
        for name, (path, caps) in keys.items():
            argv = ["ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name]
            for i in range(0, len(caps), 2):
                argv += ["--cap", caps[i], caps[i + 1]]
            self._run(argv, f"keyring of {name}")
            if name != "mon.":
                self._run(
                    ["ceph-authtool", str(mon_keyring), "--import-keyring", str(path)],
                    f"import of {name}'s key",
                )
        self._run(
            [
                "monmaptool",
                "--create",
                "--fsid",
                self.fsid,
                "--addv",
                "a",
                f"[v2:127.0.0.1:{self.mon_port}]",
                str(r / "monmap"),
            ],
            "monmap",
        )
        self._run(
            [
                "ceph-mon",
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                str(r / "monmap"),
                "--keyring",
                str(mon_keyring),
            ],
            "mkfs of mon.a",
        )

    # ---------------------------------------------------------------------------------------
    # helpers

    def _left(self) -> float:
        return max(1.0, self._deadline - time.monotonic())

    def _argv(self, argv: list[str]) -> list[str]:
        return [argv[0], "-c", str(self.conf), *argv[1:]]

    def _run(self, argv: list[str], what: str, timeout: float = 30.0) -> str:
        try:
            result = subprocess.run(
                self._argv(argv),
                capture_output=True,
                text=True,
                env=self.env,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise RgwError(f"{what} did not finish in {timeout:.0f} s\n{self.log_tails()}") from err
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip()[-2000:]
            raise RgwError(f"{what} exited with {result.returncode}: {said}\n{self.log_tails()}")
        return result.stdout

    def _ceph(self, *args: str) -> str:
        # the CLI's own --connect-timeout bounds a monitor that does not answer
        return self._run(
            ["ceph", "--connect-timeout", "20", *args],
            "ceph " + " ".join(args[:2]),
            timeout=min(40.0, self._left()),
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.log_dir / f"{name}.stderr", "ab") as err:
            self._procs[name] = subprocess.Popen(
                [*self._argv(argv), "-f"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=self.env,
                start_new_session=True,
            )

    def _wait(self, predicate: Callable[[], bool], what: str, daemon: str) -> None:
        while True:
            proc = self._procs.get(daemon)
            if proc is not None and proc.poll() is not None:
                raise RgwError(
                    f"{daemon} exited with {proc.returncode} while waiting for {what}\n"
                    f"{self.log_tails()}"
                )
            if predicate():
                return
            if time.monotonic() > self._deadline:
                raise RgwError(f"timed out waiting for {what}\n{self.log_tails()}")
            time.sleep(0.1)

    @staticmethod
    def _s3_answers(server: S3Server) -> bool:
        client = server.client()
        name = f"ready-{uuid.uuid4().hex[:12]}"
        try:
            client.create_bucket(Bucket=name)
            client.delete_bucket(Bucket=name)
            return True
        except Exception:
            return False
        finally:
            client.close()

    def log_tails(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of each daemon's log and stderr."""
        out = []
        for path in sorted(self.log_dir.glob("*")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if text:
                out.append(f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text))
        return "\n".join(out) or f"(no daemon logs in {self.log_dir})"

    # ---------------------------------------------------------------------------------------
    # stop

    def stop(self) -> list[str]:
        """Stop every daemon (radosgw first, the monitor last); remove the block file.

        Returns problems (a daemon that had to be killed), each one line.
        """
        problems = []
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                problems.append(f"{name} ignored SIGTERM for {_STOP_DEADLINE_S:g} s: killed")
        self._procs.clear()
        self.block.unlink(missing_ok=True)
        return problems
