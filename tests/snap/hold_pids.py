"""``hold_pids.py PID...``: in a fresh container, take these PIDs with this container's own
processes (``sleep 600``, left running when this script exits), and say so. A fresh container
hands out PIDs in order, so starting sleepers until the highest is reached holds them all (any
already taken by the container's other processes are held too). tests/snap/test_container.py
runs it in container B before ``snapstore-entry``, with the PIDs the task had in container A."""

import os
import subprocess
import sys


def main() -> int:
    wanted = sorted(int(p) for p in sys.argv[1:])
    if not wanted:
        print("usage: hold_pids.py PID...", file=sys.stderr)
        return 2
    while subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL).pid < wanted[-1]:
        pass
    free = [pid for pid in wanted if not os.path.exists(f"/proc/{pid}")]
    if free:
        print(f"hold_pids: could not take {free}", file=sys.stderr)
        return 1
    print(f"hold_pids: this container holds the task's original PIDs {wanted}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
