"""How each FUSE tool the benchmarks compare is mounted, unmounted and waited for: fusionfs
itself (``Fusionfs``, also used by the snap benchmark) and its peers ``S3fs`` and ``Rclone``,
each run only when installed.

Caveats: a mount is found in /proc/self/mountinfo, never with ``os.path.ismount`` (which hangs
on a stuck FUSE daemon); a failed unmount aborts the FUSE connection and detaches the mount
(``force_unmount``). rclone uploads after ``close``: ``after_close``/``after_close_all`` wait
until the bucket shows the objects, so its figures are until durable like the others'.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.base import Store, count_objects
from benchmarks.harness import last_line, run_cmd

__all__ = [
    "FUSIONFS",
    "Fusionfs",
    "MountError",
    "Mounter",
    "Rclone",
    "S3fs",
    "force_unmount",
    "mount_daemon_pid",
    "mount_entry",
]

FUSIONFS = "fusionfs"
_MOUNT_TIMEOUT = 60.0
_UNMOUNT_TIMEOUT = 180.0


def mount_entry(path: Path) -> tuple[str, str] | None:
    """(device "major:minor", fs type) of the mount at ``path``, from /proc/self/mountinfo.

    Used instead of ``os.path.ismount``, which stats the mountpoint and so hangs for ever on a
    FUSE daemon that is stuck.
    """
    target = str(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            mountpoint = fields[4].replace("\\040", " ")
            if mountpoint == target:
                sep = fields.index("-")
                return fields[2], fields[sep + 1]
    return None


def mount_daemon_pid(mountpoint: Path) -> int | None:
    """The process serving a FUSE mount: the one whose command line has the mountpoint as an
    argument (fusionfs, s3fs and rclone all do); None if not exactly one."""
    target = os.fsencode(str(mountpoint))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if target in args and int(entry) != os.getpid():
                found.append(int(entry))
    return found[0] if len(found) == 1 else None


def force_unmount(path: Path) -> None:
    """Aborts the FUSE connection of a mount we made (unsticks a hung daemon), then detaches it."""
    entry = mount_entry(path)
    if entry is None:
        return
    device, fstype = entry
    if fstype.startswith("fuse"):
        minor = device.split(":")[1]
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    run_cmd(["fusermount3", "-u", "-z", str(path)], timeout=30)


class MountError(Exception):
    pass


class Mounter:
    """How one FUSE tool is mounted and unmounted; subclasses fill in the commands."""

    name = ""
    has_cache = True
    broken = ""  # set after a failed mount: the rest of the run skips this tool

    def __init__(self, store: Store) -> None:
        self.store = store

    def unavailable(self) -> str | None:
        raise NotImplementedError

    def mount(self, mountpoint: Path, cache_dir: Path) -> None:
        raise NotImplementedError

    def unmount(self, mountpoint: Path) -> None:
        proc = run_cmd(["fusermount3", "-u", str(mountpoint)], timeout=_UNMOUNT_TIMEOUT)
        if proc.returncode != 0 and mount_entry(mountpoint) is not None:
            force_unmount(mountpoint)
            raise MountError(f"{self.name}: unmount failed: {last_line(proc)}")

    def stats(self, mountpoint: Path) -> dict[str, Any] | None:
        return None

    def after_close(self, key: str, size: int) -> None:
        """Returns once the object written under ``key`` is durable (for async uploaders)."""

    def after_close_all(self, prefix: str, count: int, size: int) -> None:
        """Returns once ``count`` objects of ``size`` bytes under ``prefix`` are durable."""

    def _wait_mounted(self, mountpoint: Path, what: Callable[[], str | None]) -> None:
        end = time.monotonic() + _MOUNT_TIMEOUT
        while time.monotonic() < end:
            if mount_entry(mountpoint) is not None:
                return
            problem = what()
            if problem:
                raise MountError(f"{self.name}: {problem}")
            time.sleep(0.05)
        raise MountError(f"{self.name}: not mounted after {_MOUNT_TIMEOUT:.0f} s")


class Fusionfs(Mounter):
    name = FUSIONFS

    def __init__(self, store: Store, extra_args: list[str] | None = None) -> None:
        super().__init__(store)
        exe = shutil.which("fusionfs")
        self.cmd = [exe] if exe else [sys.executable, "-m", "fusionfs"]
        self.extra_args = list(extra_args or [])

    def unavailable(self) -> str | None:
        proc = run_cmd([*self.cmd, "mount", "--help"], timeout=30, env=self.store.env)
        if proc.returncode != 0:
            return f"`{' '.join(self.cmd[-2:])} mount --help` failed: {last_line(proc)}"
        return None

    def mount(self, mountpoint: Path, cache_dir: Path) -> None:
        source = f"s3://{self.store.bucket}/{self.store.prefix.rstrip('/')}"
        cmd = [*self.cmd, "mount", source, str(mountpoint), "--cache-dir", str(cache_dir)]
        cmd += ["--endpoint-url", self.store.url, *self.extra_args]
        proc = run_cmd(cmd, timeout=_MOUNT_TIMEOUT, env=self.store.env)
        if proc.returncode != 0:
            log = cache_dir / "fusionfs.log"
            tail = ""
            with contextlib.suppress(OSError):
                lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
                tail = f" (log: {lines[-1][:300]})" if lines else ""
            raise MountError(f"fusionfs mount failed: {last_line(proc)}{tail}")
        if mount_entry(mountpoint) is None:
            raise MountError("fusionfs mount exited 0 but the mountpoint is not mounted")

    def unmount(self, mountpoint: Path) -> None:
        proc = run_cmd([*self.cmd, "unmount", str(mountpoint)], timeout=_UNMOUNT_TIMEOUT)
        if proc.returncode != 0 or mount_entry(mountpoint) is not None:
            force_unmount(mountpoint)
            raise MountError(f"fusionfs unmount failed: {last_line(proc)}")

    def stats(self, mountpoint: Path) -> dict[str, Any] | None:
        import json

        proc = run_cmd([*self.cmd, "stats", str(mountpoint), "--json"], timeout=30)
        if proc.returncode != 0:
            return None
        try:
            value = json.loads(proc.stdout)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class S3fs(Mounter):
    name = "s3fs"
    has_cache = False  # run without use_cache, as DESIGN.md's reference figures were

    def unavailable(self) -> str | None:
        if shutil.which("s3fs") is None:
            return "s3fs is not installed (apt-get install s3fs)"
        return None

    def mount(self, mountpoint: Path, cache_dir: Path) -> None:
        env = self.store.env
        passwd = cache_dir / "passwd-s3fs"
        cache_dir.mkdir(parents=True, exist_ok=True)
        passwd.write_text(f"{env.get('AWS_ACCESS_KEY_ID')}:{env.get('AWS_SECRET_ACCESS_KEY')}\n")
        passwd.chmod(0o600)
        opts = [
            f"passwd_file={passwd}",
            f"url={self.store.url}",
            "use_path_request_style",
            "parallel_count=8",
            "multipart_size=8",
            "retries=5",
            f"endpoint={env.get('AWS_DEFAULT_REGION', 'us-east-1')}",
        ]
        source = f"{self.store.bucket}:/{self.store.prefix.rstrip('/')}"
        cmd = ["s3fs", source, str(mountpoint)]
        for opt in opts:
            cmd += ["-o", opt]
        proc = run_cmd(cmd, timeout=_MOUNT_TIMEOUT, env=env)
        if proc.returncode != 0:
            raise MountError(f"s3fs failed: {last_line(proc)}")
        self._wait_mounted(mountpoint, lambda: None)


class Rclone(Mounter):
    name = "rclone"

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._procs: dict[Path, Any] = {}

    def unavailable(self) -> str | None:
        if shutil.which("rclone") is None:
            return "rclone is not installed (apt-get install rclone)"
        return None

    def _env(self) -> dict[str, str]:
        env = dict(self.store.env)
        env.update(
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=env.get("AWS_ACCESS_KEY_ID", ""),
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=env.get("AWS_SECRET_ACCESS_KEY", ""),
            RCLONE_CONFIG_BENCH_ENDPOINT=self.store.url,
            RCLONE_CONFIG_BENCH_REGION=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
        )
        if self.store.url.startswith("http://"):
            # rclone (Go SDK) refuses an AWS_CA_BUNDLE it cannot apply, even for plain http.
            env.pop("AWS_CA_BUNDLE", None)
        return env

    def mount(self, mountpoint: Path, cache_dir: Path) -> None:
        import subprocess

        remote = f"bench:{self.store.bucket}/{self.store.prefix.rstrip('/')}"
        cmd = ["rclone", "mount", remote, str(mountpoint), "--vfs-cache-mode", "full"]
        cmd += ["--cache-dir", str(cache_dir), "--vfs-write-back", "0s", "--log-level", "ERROR"]
        log = open(cache_dir.parent / f"rclone-{cache_dir.name}.log", "ab")
        proc = subprocess.Popen(
            cmd,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self._procs[mountpoint] = proc
        self._wait_mounted(
            mountpoint,
            lambda: f"exited with status {proc.returncode}" if proc.poll() is not None else None,
        )

    def unmount(self, mountpoint: Path) -> None:
        proc = self._procs.pop(mountpoint, None)
        try:
            super().unmount(mountpoint)
        finally:
            if proc is not None:
                try:
                    proc.wait(60)
                except Exception:
                    proc.kill()
                    proc.wait(10)

    def after_close(self, key: str, size: int) -> None:
        client = self.store.client(self.store.setup_url)
        end = time.monotonic() + 600
        while time.monotonic() < end:
            with contextlib.suppress(Exception):
                if client.head_object(Bucket=self.store.bucket, Key=key)["ContentLength"] == size:
                    return
            time.sleep(0.05)
        raise MountError(f"rclone: {key} not uploaded within 600 s of close")

    def after_close_all(self, prefix: str, count: int, size: int) -> None:
        client = self.store.client(self.store.setup_url)
        end = time.monotonic() + 600
        while time.monotonic() < end:
            with contextlib.suppress(Exception):
                if count_objects(client, self.store.bucket, prefix, size) >= count:
                    return
            time.sleep(0.1)
        raise MountError(f"rclone: {count} files under {prefix} not uploaded within 600 s")
