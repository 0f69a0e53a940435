"""Find and run CRIU: version check, runs with a log file and a timeout, stats decoding.

Where CRIU comes from: ``$CRIU`` when set (then nothing else is tried: an explicit choice that
does not work is an error), else ``criu`` on PATH, else ``/opt/fusionfs/criu/bin/criu`` (what
``scripts/install-criu.sh`` installs). Versions below 4.0 are refused: Debian bookworm's
3.17 fails on recent kernels with "Unexpected rt vDSO area bounds". ``criu check`` is not run
here (the install script runs it); only ``criu --version``.

Caveats:
- CRIU has no handler for SIGTERM/SIGKILL during a dump, and killing it is safe only at some
  moments: the kernel detaches a dead tracer's tracees, and CRIU's parasite code, once running
  in the task as a daemon, returns to the task's own code (rt_sigreturn) when its control
  socket closes; but while CRIU injects code or syscalls into the task (setting up the parasite,
  removing it) the task holds borrowed registers and code, and a kill then crashes it (seen:
  the task a zombie after a kill just after ``Parasite syscall_ip at``). So a dump's timeout
  stops CRIU (SIGSTOP), reads its -v4 log, and kills it only in a safe phase
  (``DumpKillGate``), else lets it run on a few milliseconds and looks again. A small leftover
  mapping (``/memfd:CRIUMFD``) stays in the task. See docs/criu.md.
- Every CRIU run logs the harmless ``rlimit: Can't setup RLIMIT_NOFILE`` error; it is filtered
  out of the lines shown to users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from snapstore.errors import CriuUnavailable

__all__ = [
    "DEFAULT_PREFIX_CRIU",
    "KILL_GRACE_S",
    "MIN_VERSION",
    "Criu",
    "CriuRun",
    "DumpKillGate",
    "RegFile",
    "find_criu",
    "likely_criu",
    "log_excerpt",
    "read_reg_files",
    "read_stats",
]

DEFAULT_PREFIX_CRIU = Path("/opt/fusionfs/criu/bin/criu")
MIN_VERSION = (4, 0)

_HARMLESS = ("Can't setup RLIMIT_NOFILE",)
_IMG_SERVICE_MAGIC = 0x55105940
_STATS_MAGIC = 0x57093306
_IMG_COMMON_MAGIC = 0x54564319
_FILES_MAGIC = 0x56303138
_FD_TYPE_REG = 1  # fd_types.REG in images/fdinfo.proto

# field numbers of stats.proto (images/stats.proto in CRIU's source)
_DUMP_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    8: "irmap_resolve_us",
    9: "pages_lazy",
    10: "page_pipes",
    11: "page_pipe_bufs",
}
_RESTORE_FIELDS = {
    1: "pages_compared",
    2: "pages_skipped_cow",
    3: "forking_time_us",
    4: "restore_time_us",
    5: "pages_restored",
}


@dataclasses.dataclass(frozen=True)
class CriuRun:
    """How one CRIU command ended."""

    returncode: int | None  # None: killed by us at the timeout
    seconds: float
    timed_out: bool
    kill_wait: float = 0.0  # seconds from the timeout to the kill (waiting for a safe phase)
    kill_forced: bool = False  # killed when the grace ran out, in a phase not known to be safe


class DumpKillGate:
    """Follows the log of a running ``criu dump -v4`` to tell whether killing CRIU now leaves
    its tasks intact.

    Phases, from the lines compel and CRIU log (the same since CRIU 3.x):
    - before ``Parasite syscall_ip at``: tasks are seized, nothing of theirs is changed: safe;
    - from it until ``has been switched to daemon mode``: CRIU injects syscalls and the parasite
      blob; the task runs borrowed code with borrowed registers: unsafe;
    - daemon mode (pages and most images are dumped here: the long phase): safe, the parasite
      sigreturns into the task's own code when its socket closes;
    - from ``Waiting for PID to trap`` (the parasite leaves, thread registers are read, the blob
      is unmapped by an injected munmap) until the next ``Dumping task (pid`` or
      ``Dumping pstree``: unsafe.
    A log that never shows these lines (another CRIU) reads as safe: the kill is immediate.
    """

    _UNSAFE = (b"Parasite syscall_ip at", b" to trap")
    _SAFE = (b"has been switched to daemon mode", b"Dumping task (pid", b"Dumping pstree")

    def __init__(self, log: Path) -> None:
        self.log = log
        self._offset = 0
        self._partial = b""
        self._safe = True

    def safe(self) -> bool:
        """Whether the phase the log shows now is one CRIU can be killed in."""
        try:
            with self.log.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return self._safe
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            if any(m in line for m in self._UNSAFE):
                self._safe = False
            elif any(m in line for m in self._SAFE):
                self._safe = True
        return self._safe


# How long a timed-out dump may run on past its timeout while CRIU is in an unsafe phase.
# Those phases take milliseconds, so this is reached only if CRIU hangs in one.
KILL_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Criu:
    """A usable CRIU binary."""

    path: Path
    version: str

    def argv(self, *args: str) -> list[str]:
        return [str(self.path), *args]

    def run(
        self,
        args: Sequence[str],
        timeout: float | None = None,
        gate: DumpKillGate | None = None,
        output: Path | None = None,
    ) -> CriuRun:
        """Run ``criu ARGS`` with no stdin; kill it if it outlives ``timeout`` seconds or we
        are interrupted (with a ``gate``: in a phase the gate calls safe).

        Callers pass ``-o LOG`` for the real log. Its stdout and stderr are inherited, or go to
        the file ``output``: what CRIU prints before its log is open (an images dir it cannot
        open) is then the caller's to report, not lines of its own on our stderr.
        """
        start = time.monotonic()
        sink = None
        if output is not None:
            sink = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # its own process group, so a kill also takes the helpers CRIU forks (a surviving helper
        # would keep our stdout/stderr open and hang whoever reads them), and a Ctrl-C at the
        # terminal does not reach CRIU at an unsafe moment
        try:
            proc = subprocess.Popen(
                self.argv(*args),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                close_fds=True,
                process_group=0,
            )
        finally:
            if sink is not None:
                os.close(sink)
        try:
            code: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out_at = time.monotonic()
            forced = _stop(proc, gate)
            code = proc.returncode if proc.returncode >= 0 else None
            return CriuRun(
                code,
                time.monotonic() - start,
                True,
                kill_wait=time.monotonic() - timed_out_at,
                kill_forced=forced,
            )
        except BaseException:
            _stop(proc, gate)
            raise
        return CriuRun(code, time.monotonic() - start, False)


def _stop(proc: subprocess.Popen[bytes], gate: DumpKillGate | None) -> bool:
    """Kill CRIU and its process group; with a gate, only once the gate calls the phase safe.

    CRIU is SIGSTOPped while its log is read, so it cannot move on into an unsafe step between
    the reading and the kill; in an unsafe phase it is let go on for a moment and stopped again.
    Returns True if the grace ran out and CRIU was killed anyway.
    """
    forced = False
    if gate is not None:
        give_up = time.monotonic() + KILL_GRACE_S
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            _wait_stopped(proc.pid, 0.05)
            if gate.safe():
                break
            if time.monotonic() > give_up:
                forced = True
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.002)
    _kill_group(proc)
    return forced


def _wait_stopped(pid: int, limit: float) -> None:
    """Wait up to ``limit`` s for ``pid`` to be stopped. A SIGSTOP takes effect when the process
    leaves the kernel; CRIU blocked that long (in a write to the mount, say) is not moving on."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return
        state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
        if state in (b"T", b"t", b"Z"):
            return
        time.sleep(0.0005)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _parse_version(text: str) -> tuple[str, tuple[int, ...]] | None:
    match = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", text, re.MULTILINE)
    if not match:
        return None
    version = match.group(1)
    return version, tuple(int(p) for p in version.split("."))


#: ``criu --version`` answers, per binary: (path, inode, size, mtime) -> Criu. A binary
#: replaced or changed on disk is checked again; see ``prefetch``.
_checked: dict[tuple[str, int, int, int], Criu] = {}
_checked_lock = threading.Lock()


def prefetch() -> threading.Thread:
    """Check the CRIU that ``find_criu`` will pick in a thread, so that a command can read its
    snapshot meanwhile: ``criu --version`` is a process start (about 30 ms, more under load)
    on the path from the command's start to the task running. The later ``find_criu`` reuses
    the answer (or checks again if the prefetch has not finished or failed). A prefetch still
    running is not started twice (``snapstore._start`` starts one before the command's
    imports, and the command asks again)."""
    global _prefetching

    def check() -> None:
        with contextlib.suppress(Exception):
            find_criu()

    with _prefetch_lock:
        if _prefetching is not None and _prefetching.is_alive():
            return _prefetching
        thread = threading.Thread(target=check, name="criu-version", daemon=True)
        thread.start()
        _prefetching = thread
    return thread


_prefetching: threading.Thread | None = None
_prefetch_lock = threading.Lock()


def _check(path: Path, where: str) -> Criu | str:
    """A Criu if ``path`` is usable, else why not."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"{path} ({where}) is not an executable file"
    try:
        st = path.stat()
    except OSError as err:
        return f"{path} ({where}) cannot be read: {err.strerror}"
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _checked_lock:  # held while checking: a caller behind the prefetch waits for it
        known = _checked.get(key)
        if known is not None:
            return known
        found = _run_version(path, where)
        if isinstance(found, Criu):
            _checked[key] = found
    return found


def _run_version(path: Path, where: str) -> Criu | str:
    try:
        out = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{path} ({where}) did not run: {err}"
    parsed = _parse_version(out.stdout)
    if parsed is None:
        return f"{path} ({where}) printed no CRIU version"
    version, numbers = parsed
    if numbers < MIN_VERSION:
        return f"{path} ({where}) is CRIU {version}, older than 4.0"
    return Criu(path, version)


def _candidates() -> list[tuple[Path, str]]:
    """The CRIUs ``find_criu`` considers, in its order."""
    env = os.environ.get("CRIU")
    if env:
        return [(Path(env), "$CRIU")]
    found = []
    on_path = shutil.which("criu")
    if on_path:
        found.append((Path(on_path), "PATH"))
    if DEFAULT_PREFIX_CRIU.exists():
        found.append((DEFAULT_PREFIX_CRIU, "the default install"))
    return found


def likely_criu() -> Criu | None:
    """What ``find_criu`` will most likely return, without waiting for its version check: the
    first CRIU it considers (None: there is none). Its ``version`` is ``"unchecked"`` unless
    the check is done already. For starting a helper (``criu lazy-pages``) while the check runs
    (``prefetch``); call ``find_criu`` before relying on it, and start the helper again with
    what it returns if that is another binary."""
    candidates = _candidates()
    if not candidates:
        return None
    path = candidates[0][0]
    with contextlib.suppress(OSError):
        st = path.stat()
        known = _checked.get((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
        if known is not None:
            return known
    return Criu(path, "unchecked")


def find_criu() -> Criu:
    """$CRIU if set (and then only it), else ``criu`` on PATH, else the default install.

    Raises CriuUnavailable naming what was tried and why each was refused.
    """
    hint = "run scripts/install-criu.sh, or set $CRIU to a CRIU >= 4.0"
    refused: list[str] = []
    for path, where in _candidates():
        found = _check(path, where)
        if isinstance(found, Criu):
            return found
        if where == "$CRIU":
            raise CriuUnavailable(f"no usable CRIU: {found}; {hint}")
        refused.append(found)
    why = "; ".join(refused) if refused else f"no criu on PATH nor at {DEFAULT_PREFIX_CRIU}"
    raise CriuUnavailable(f"no usable CRIU (>= 4.0): {why}; {hint}")


def log_excerpt(log: Path, limit: int = 12) -> list[str]:
    """The lines of a CRIU log that explain a failure: its errors, else its last lines."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as err:
        return [f"(cannot read {log}: {err})"]
    useful = [ln for ln in lines if not any(h in ln for h in _HARMLESS)]
    errors = [ln for ln in useful if "Error (" in ln]
    if errors:
        # the first errors are the cause; later ones ("Dumping FAILED.") are consequences,
        # and warnings (one per interrupted thread, say) would crowd the cause out
        picked = errors[:limit]
    else:
        warnings = [ln for ln in useful if "Warn " in ln]
        picked = warnings[-limit:] if warnings else useful[-limit:]
    return [ln.strip() for ln in picked]


def _varints(data: bytes) -> dict[int, int | bytes]:
    """Decode one protobuf message's varint and length-delimited fields (enough for stats)."""
    fields: dict[int, int | bytes] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number] = varint()
        elif wire == 2:
            length = varint()
            fields[number] = data[pos : pos + length]
            pos += length
        elif wire == 5:
            fields[number] = struct.unpack_from("<I", data, pos)[0]
            pos += 4
        elif wire == 1:
            fields[number] = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def read_stats(path: Path) -> dict[str, int]:
    """Decode CRIU's ``stats-dump`` or ``stats-restore`` image into named integers.

    Times end in ``_us`` (microseconds). Returns {} when the file is missing or unreadable:
    stats are informative, never required.
    """
    try:
        raw = path.read_bytes()
        magic1, magic2, size = struct.unpack_from("<III", raw, 0)
        if magic1 != _IMG_SERVICE_MAGIC or magic2 != _STATS_MAGIC:
            return {}
        top = _varints(raw[12 : 12 + size])
        result: dict[str, int] = {}
        for number, names in ((1, _DUMP_FIELDS), (2, _RESTORE_FIELDS)):
            body = top.get(number)
            if isinstance(body, bytes):
                for field, value in _varints(body).items():
                    if field in names and isinstance(value, int):
                        result[names[field]] = value
        return result
    except (OSError, ValueError, IndexError, struct.error):
        return {}


@dataclasses.dataclass(frozen=True)
class RegFile:
    """A regular file the dumped tree had open, as CRIU recorded it (``files.img``).

    ``size`` is what CRIU checks on restore; it records none for files opened write-only with
    O_APPEND (logs), whose ``pos`` is then the best guess of the size at the dump.
    """

    name: str
    flags: int
    pos: int
    size: int | None


def read_reg_files(images: Path) -> list[RegFile]:
    """The regular files recorded in an images dir's ``files.img`` (file_entry.reg).

    Raises ValueError if the image is missing or not a CRIU files image.
    """
    try:
        raw = (images / "files.img").read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {images / 'files.img'}: {err.strerror}") from None
    try:
        magic1, magic2 = struct.unpack_from("<II", raw, 0)
    except struct.error:
        raise ValueError(f"{images / 'files.img'} is too short") from None
    if magic1 != _IMG_COMMON_MAGIC or magic2 != _FILES_MAGIC:
        raise ValueError(f"{images / 'files.img'} is not a CRIU files image")
    found: list[RegFile] = []
    pos = 8
    try:
        while pos < len(raw):
            (size,) = struct.unpack_from("<I", raw, pos)
            entry = _varints(raw[pos + 4 : pos + 4 + size])
            pos += 4 + size
            reg = entry.get(3)
            if entry.get(1) != _FD_TYPE_REG or not isinstance(reg, bytes):
                continue
            fields = _varints(reg)
            name, flags, offset = fields.get(6), fields.get(2, 0), fields.get(3, 0)
            length = fields.get(8)
            if not isinstance(name, bytes) or isinstance(flags, bytes):
                continue
            found.append(
                RegFile(
                    name.decode(errors="surrogateescape"),
                    int(flags),
                    offset if isinstance(offset, int) else 0,
                    length if isinstance(length, int) else None,
                )
            )
    except (struct.error, IndexError) as err:
        raise ValueError(f"{images / 'files.img'} is damaged: {err}") from None
    return found
