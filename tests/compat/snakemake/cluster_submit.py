"""The "cluster" of tests/compat/test_snakemake.py: the submit command of Snakemake's
cluster-generic executor. It runs each job on the next of three "nodes" (round-robin): the
job script, which Snakemake wrote under its working directory on node 0's mount, is rewritten so
that every path on node 0's mount points at the same path on node K's mount (another mount of
the same store, with its own cache: another machine), and started in the background with
COMPAT_NODE=nodeK. Prints the job id (``jobN-nodeK``); records the job's pid and output under
COMPAT_SUBMIT_DIR (local disk) for the test to inspect and clean up.
"""

import os
import subprocess
import sys

nodes = os.environ["COMPAT_NODES"].split(os.pathsep)
state = os.environ["COMPAT_SUBMIT_DIR"]
jobscript = sys.argv[-1]
counter = os.path.join(state, "counter")
n = int(open(counter).read()) if os.path.exists(counter) else 0
with open(counter, "w") as f:
    f.write(str(n + 1))
k = n % len(nodes)
with open(jobscript) as f:
    text = f.read().replace(nodes[0] + "/", nodes[k] + "/")
script = os.path.join(state, f"job{n}.sh")
with open(script, "w") as f:
    f.write(text)
with open(os.path.join(state, f"job{n}-node{k}.log"), "wb") as log:
    proc = subprocess.Popen(
        ["/bin/bash", script],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COMPAT_NODE": f"node{k}"},
        start_new_session=True,
    )
with open(os.path.join(state, f"job{n}.pid"), "w") as f:
    f.write(str(proc.pid))
print(f"job{n}-node{k}")
