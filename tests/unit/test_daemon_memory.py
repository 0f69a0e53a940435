"""The daemon's malloc settings (``fusionfs.cli._keep_freed_memory``), checked by what they are
for: buffers made in one worker thread and freed by another must be reused, not faulted in
anew (each fresh page costs a host fault on this project's VMs). Run in subprocesses: mallopt
has to come before any thread exists, and is process-wide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_PROGRAM = r"""
import collections, os, resource, sys, threading
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "daemon":
    from fusionfs.cli import _keep_freed_memory
    _keep_freed_memory()
held, lock = collections.deque(), threading.Lock()

def work(n):
    for _ in range(n):
        buf = os.urandom(16) * (1 << 20)  # 16 MiB made (and touched) in this thread
        with lock:
            held.append(buf)
            while len(held) > 16:  # a bounded LRU: freed by whichever thread pushes next
                held.popleft()

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # new threads each round, as a thread pool hands jobs around
    threads = [threading.Thread(target=work, args=(4,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode, root],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(out.stdout.strip())


@pytest.mark.timeout(180)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_buffers_freed_across_threads_are_reused_not_faulted_in_again() -> None:
    default, daemon = _faults("default"), _faults("daemon")
    allocated_pages = 10 * 8 * 4 * (16 << 20) // 4096  # 327 680
    assert daemon < allocated_pages // 2, (daemon, default)
    assert daemon * 3 < default, (daemon, default)
