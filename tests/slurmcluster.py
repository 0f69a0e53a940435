"""A single-node Slurm (munged + slurmctld + slurmd on loopback) for the tests, without systemd.

``SlurmCluster(root).start()`` writes everything under ``root`` (a munge key, ``slurm.conf``,
state and spool dirs, logs, pid files), starts ``munged`` on a socket of its own, then
``slurmctld -D`` and ``slurmd -D -N localhost`` in the foreground as children of the test
process, and returns once ``sinfo`` shows the node idle. Commands run with ``cluster.env``
(``SLURM_CONF`` pointing at the config). ``stop`` ends every daemon it started (SIGTERM, then
SIGKILL after a deadline) and reports any that needed force.

The config is the one measured in ``../shared/DESIGN.md`` ("Slurm preemption"): no cgroups
(``proctrack/linuxproc``, ``task/none``), no accounting, ``preempt/partition_prio`` with two
partitions on the one node: ``low`` (``PriorityTier=1 PreemptMode=REQUEUE GraceTime=GRACE``)
and ``high`` (``PriorityTier=10 PreemptMode=OFF``), ``SlurmctldParameters=
preempt_send_user_signal`` (so the batch script hears SIGTERM when the grace period starts).
The node declares one CPU, so any job fills it and a ``high`` job preempts a ``low`` one.
``AuthInfo=cred_expire=10`` shortens the wait of a requeued job before it may start again
(``BeginTime``; 120 s by default). Everything runs as root (``SlurmUser=root``).

The packages (Debian bookworm: ``slurm-wlm munge``, Slurm 22.05) come from ``scripts/setup.sh``;
``missing_programs()`` says which programs are absent. Everything waits on a deadline.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from helpers import free_port

__all__ = ["PROGRAMS", "SlurmCluster", "SlurmError", "missing_programs"]

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")

_START_DEADLINE_S = 60.0
_STOP_DEADLINE_S = 20.0
_LOG_TAIL_LINES = 20


class SlurmError(RuntimeError):
    """The cluster could not be set up or started (the message carries the logs' tails)."""


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None]


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"({path.name}: no log)"
    return f"--- {path.name}\n" + "\n".join(lines)


class SlurmCluster:
    def __init__(self, root: Path, grace_s: int = 20) -> None:
        self.root = root
        self.grace_s = grace_s
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket.2"
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        for name in list(self.env):  # a test run inside a Slurm job must not leak it in
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del self.env[name]
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- set-up

    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log", "run", "jobs"):
            (r / sub).mkdir(mode=0o755, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        ctld_port, slurmd_port = free_port(), free_port()
        self.conf.write_text(
            f"""\
ClusterName=snaptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN
PartitionName=low Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 \
PreemptMode=REQUEUE GraceTime={self.grace_s}
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""
        )

    def _start_munged(self) -> None:
        r = self.root / "munge"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={r / 'munge.key'}",
                f"--pid-file={r / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + _START_DEADLINE_S
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"munged made no socket in {_START_DEADLINE_S:g} s\n{self._logs()}"
                )
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # the child keeps its own copy
        try:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        finally:
            log.close()

    def _logs(self) -> str:
        logs = self.root / "log"
        return "\n".join(
            _tail(logs / n)
            for n in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out")
        )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}\n{self._logs()}")

    def start(self) -> None:
        self._write_config()
        self._start_munged()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        deadline = time.monotonic() + _START_DEADLINE_S
        while self.run("scontrol", "ping", check=False).returncode != 0:
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"slurmctld did not answer in {_START_DEADLINE_S:g} s\n{self._logs()}"
                )
            time.sleep(0.2)
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        while "idle" not in self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout:
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"the node did not become idle in {_START_DEADLINE_S:g} s\n{self._logs()}"
                )
            time.sleep(0.2)

    # -- use

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit; ``env`` replaces the environment the job gets (SLURM_CONF is added)."""
        full = dict(env if env is not None else self.env)
        full["SLURM_CONF"] = str(self.conf)
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env=full,
            cwd=cwd,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (the fields Slurm prints as Key=Value)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", text))

    def logs(self) -> str:
        return self._logs()

    # -- tear-down

    def stop(self) -> list[str]:
        """End every daemon started; return what needed force."""
        problems: list[str] = []
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(_STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(f"{name} ignored SIGTERM for {_STOP_DEADLINE_S:g} s")
        return problems
