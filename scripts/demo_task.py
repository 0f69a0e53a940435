"""The demo's task: holds memory with a known pattern and appends a counter to a file.

``python demo_task.py OUT_FILE [--mib N]``: fills N MiB (default 256) with a pattern derived from
the block number, then every 0.2 s increments a counter and appends a line
``count=<n> pid=<pid> memory=<ok|BAD>`` to OUT_FILE (the memory is re-checked every 10 counts),
flushing each line. After a checkpoint and a lazy restore on "another machine", the lines go on
from where they stopped, and ``memory=ok`` shows the restored pages are right.
"""

import argparse
import hashlib
import os
import time

MIB = 1 << 20


def block(i: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "little")).digest()
    return seed * (MIB // len(seed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    memory = [bytearray(block(i)) for i in range(args.mib)]
    count = 0
    status = "ok"
    with open(args.out, "a", buffering=1) as out:
        while True:
            count += 1
            if count % 10 == 0:
                status = "ok" if all(memory[i] == block(i) for i in range(len(memory))) else "BAD"
            out.write(f"count={count} pid={os.getpid()} memory={status}\n")
            time.sleep(0.2)


if __name__ == "__main__":
    main()
