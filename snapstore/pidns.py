"""The task's own PID namespace: its PIDs are the same on every machine, so a restore never
collides with PIDs taken where it runs.

``start(command, out_fd, err_fd)`` runs ``unshare --pid --fork --kill-child`` (util-linux) with
snapstore's init (``snapstore/_init.py``, run by this interpreter with ``-I -S``) as PID 1 of a
new PID namespace, and COMMAND as the init's child. Process layout on the first run::

    snapstore run ── unshare (holder, our namespace) ── init (PID 1) ── COMMAND (PID 2) ── ...

The init is what is dumped (``criu dump -t INIT``, its host PID): CRIU sees that the root task
lives in another PID namespace than its own, and that it is that namespace's init, and puts the
namespace in the images; ``criu restore`` creates a fresh PID namespace and gives every task its
PID *inside* it, whatever PIDs the restoring machine (or container) has in use; the host PIDs
are new. After a restore the holder is gone: the init is snapstore's child
(``--restore-sibling``).

The task's view: ``getpid()``, ``getppid()``, its children's PIDs, ``kill`` and ``waitpid`` use
the namespace's PIDs and stay the same across restores; ``/proc/self`` and
``/proc/thread-self`` name the task itself. The task shares the mount namespace (and so
``/proc``) with snapstore: ``/proc/N`` for a namespace PID N names the host's process N, and
``ps`` lists the host's processes. (A mount namespace with its own ``/proc`` makes CRIU dump
the whole mount tree, every mount of which would have to be declared external on both sides,
and files inherited from outside it, such as ``/dev/null``, fail the dump with "Can't lookup
mount": not done.)

Only root (CAP_SYS_ADMIN) can create a PID namespace; snapstore needs root for CRIU anyway.
The init's Python interpreter is what snapstore runs under: it must exist at the same path on
the machine that restores, as snapstore itself must. It adds a few MB of memory to every
snapshot (measured in docs/snapstore.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from snapstore.errors import UsageError

__all__ = ["INIT_SCRIPT", "is_namespace_init", "start"]

INIT_SCRIPT = Path(__file__).with_name("_init.py")
_INIT_WAIT_S = 10.0


def is_namespace_init(pid: int) -> bool:
    """Whether ``pid`` (as we see it) is PID 1 of a PID namespace nested below ours."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _check_command(name: str) -> None:
    """Refuse a command that cannot be run, as starting it directly would (the init would only
    report it as exit status 127 or 126 of the task)."""
    if "/" in name:
        path = Path(name)
        if not path.exists():
            raise UsageError(f"cannot start {name!r}: No such file or directory")
        if path.is_dir() or not os.access(path, os.X_OK):
            raise UsageError(f"cannot start {name!r}: Permission denied")
    elif shutil.which(name) is None:
        raise UsageError(f"cannot start {name!r}: No such file or directory")


def start(command: list[str], out_fd: int, err_fd: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` under snapstore's init in a new PID namespace, stdout and stderr on
    ``out_fd`` and ``err_fd``, stdin ``/dev/null``, in a session of its own.

    Returns the holder process (``unshare``; it exits with the init's status) and the init's
    PID as we see it (what to dump). Raises UsageError if the namespace cannot be made.
    """
    _check_command(command[0])
    unshare = shutil.which("unshare")
    if unshare is None:
        raise UsageError(
            "cannot run the task in a PID namespace: no 'unshare' (util-linux) on PATH "
            "(or pass --no-pid-namespace)"
        )
    argv = [
        unshare,
        "--pid",
        "--fork",
        "--kill-child",
        sys.executable,
        "-I",
        "-S",
        str(INIT_SCRIPT),
        str(out_fd),
        str(err_fd),
        "--",
        *command,
    ]
    holder = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # read only if the holder fails to start the init
        pass_fds=(out_fd, err_fd),
        start_new_session=True,
    )
    deadline = time.monotonic() + _INIT_WAIT_S
    while True:
        kids = _children(holder.pid)
        if kids:
            return holder, kids[0]
        if holder.poll() is not None or time.monotonic() > deadline:
            if holder.returncode is None:
                holder.kill()
                holder.wait()
            assert holder.stderr is not None
            why = holder.stderr.read().decode(errors="replace").strip().splitlines()
            raise UsageError(
                "cannot run the task in a PID namespace of its own"
                + (f": {why[-1]}" if why else f" (unshare exit status {holder.returncode})")
                + " (snapstore run needs root; or pass --no-pid-namespace)"
            )
        time.sleep(0.002)
