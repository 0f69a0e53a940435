"""A timed-out ``criu dump`` is killed only in a phase the log calls safe for the task.

A stand-in for CRIU (a shell script, a real process in its own group) writes the log lines
the gate knows at set times, so the kill's timing is checked without CRIU's own races.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from snapstore import criu as criu_mod
from snapstore import dump as dump_mod
from snapstore.criu import Criu, CriuRun, DumpKillGate

pytestmark = pytest.mark.timeout(60)


_INJECTING = "(00.02) Parasite syscall_ip at 0x55d422dc7000"
_DAEMON = "(00.03) Parasite 42 has been switched to daemon mode"


def _run_fake(tmp_path: Path, *steps: str, timeout: float) -> tuple[CriuRun, Path]:
    """Run a stand-in CRIU whose steps are shell commands (``sleep``, ``exit``) or log lines."""
    log = tmp_path / "dump.log"
    body = [s if s.split()[0] in ("sleep", "exit") else f'echo "{s}" >> "$log"' for s in steps]
    script = tmp_path / "criu"
    script.write_text("#!/bin/sh\nlog=$1\n" + "\n".join(body) + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    run = Criu(script, "4.1").run([str(log)], timeout=timeout, gate=DumpKillGate(log))
    return run, log


def test_kill_waits_for_the_parasite_to_reach_daemon_mode(tmp_path: Path) -> None:
    start = time.monotonic()
    run, log = _run_fake(
        tmp_path,
        "(00.01) Seized task 42, state 1",
        _INJECTING,
        "sleep 0.4",
        _DAEMON,
        "(00.43) page-xfer: Transferring pages:",
        "sleep 30",
        timeout=0.1,
    )
    assert run.timed_out and run.returncode is None and not run.kill_forced
    assert run.kill_wait >= 0.25, "killed inside the injection"
    assert time.monotonic() - start < 5, "not killed once safe"
    assert "daemon mode" in log.read_text()


def test_kill_is_immediate_in_a_safe_phase(tmp_path: Path) -> None:
    run, _ = _run_fake(tmp_path, _INJECTING, _DAEMON, "sleep 30", timeout=0.2)
    assert run.timed_out and run.kill_wait < 0.2 and not run.kill_forced


def test_a_phase_that_never_ends_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(criu_mod, "KILL_GRACE_S", 0.5)
    run, _ = _run_fake(tmp_path, _INJECTING, "sleep 30", timeout=0.1)
    assert run.timed_out and run.kill_forced and 0.5 <= run.kill_wait < 3


def test_criu_that_ends_during_the_wait_keeps_its_exit_status(tmp_path: Path) -> None:
    run, _ = _run_fake(tmp_path, _INJECTING, "sleep 0.4", "exit 3", timeout=0.1)
    assert run.timed_out and run.returncode == 3 and not run.kill_forced


def test_gate_reads_only_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_bytes(b"(00.01) Parasite syscall_")
    gate = DumpKillGate(log)
    assert gate.safe()  # half a marker is no marker
    with log.open("ab") as f:
        f.write(b"ip at 0x1\n(00.02) Waiting for 42 to trap\n(00.03) Dumping pstree (pid: 42)\n")
    assert gate.safe()
    with log.open("ab") as f:
        f.write(b"(00.04) Dumping task (pid: 43 comm: x)\n(00.05) Parasite syscall_ip at 0x2\n")
    assert not gate.safe()
    assert DumpKillGate(tmp_path / "missing.log").safe()  # CRIU has logged nothing yet


def test_what_criu_prints_goes_to_the_output_file_not_our_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A CRIU that fails before its log is open (an images dir on a mount that died) prints
    to its stderr: with ``output`` that is the dump's to report, indented under its one error
    line, never lines of its own on snapstore's stderr."""
    script = tmp_path / "criu"
    script.write_text(
        "#!/bin/sh\n"
        'echo "Error (criu/crtools.c:246): Couldn\'t open image dir" >&2\n'
        "echo on-stdout\n"
        "exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    said = tmp_path / "criu.out"
    run = Criu(script, "4.1").run(["dump"], output=said)
    assert run.returncode == 1
    assert "Couldn't open image dir" in said.read_text() and "on-stdout" in said.read_text()
    out, err = capfd.readouterr()
    assert "Couldn't open image dir" not in err and "on-stdout" not in out
    assert dump_mod._criu_said(said) == [
        "criu: Error (criu/crtools.c:246): Couldn't open image dir",
        "criu: on-stdout",
    ]
    assert dump_mod._criu_said(tmp_path / "none") == []
