"""``snapstore``: checkpoint a running task into a fusionfs mount with CRIU, and restore it.

Commands: dump, restore, verify, list, show, rm, run, report, check (``snapstore COMMAND
--help``). Errors are one line on stderr (plus the relevant lines of CRIU's log when CRIU
failed) and an exit code from ``snapstore.errors``; a traceback means a bug.

Caveat: ``restore`` without ``--detach`` waits for the task and exits with the task's own
status, which may happen to equal one of snapstore's codes (2, 175, 176); a line on stderr says
which it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from snapstore import criu as _criu
from snapstore.catalog import Catalog, Manifest, validate_task_id
from snapstore.defaults import DEFAULT_KEEP, PROVIDERS, SIGTERM_WINDOW_S, default_margin
from snapstore.errors import (
    EXIT_CHECKPOINTED,
    EXIT_CORRUPT,
    EXIT_DUMP_FAILED,
    EXIT_RESTORE_FAILED,
    EXIT_USAGE,
    SnapshotCorrupt,
    SnapstoreError,
    UsageError,
    os_error_text,
)
from snapstore.restore import RestoreResult, restore, wait_task
from snapstore.root import ALLOW_ANY_ROOT_ENV, DEFAULT_ROOT, ROOT_ENV, open_root
from snapstore.verify import verify_snapshot

__all__ = ["build_parser", "main"]

_EXIT_CODES = f"""\
exit codes:
  0    success
  1    other error (list, show, rm: unreadable root or manifest)
  {EXIT_USAGE}    bad usage or input: unknown PID, no such task or snapshot, root not on a
       fusionfs mount, invalid task id
  {EXIT_DUMP_FAILED}  dump failed: CRIU missing or too old, CRIU could not dump the task, the
       deadline passed, the snapshot could not be made durable (nothing committed)
  {EXIT_RESTORE_FAILED}  restore failed: CRIU missing or too old, the task's PID is in use,
       damaged snapshot, CRIU could not restore
  {EXIT_CORRUPT}  the snapshot does not verify (a file, chunk or pack missing or wrong, a damaged
       manifest): it was not restored (run tried the previous snapshots first); verify: bad
  {EXIT_CHECKPOINTED}   run: the task was checkpointed and committed (spot notice or SIGTERM);
       run the same command again to resume it
  restore without --detach, and run, exit with the task's own exit status (128+N if killed
  by signal N) when the task ends by itself

--root defaults to ${ROOT_ENV}, else {DEFAULT_ROOT}. Testing aid: {ALLOW_ANY_ROOT_ENV}=1 accepts
a root that is not on a fusionfs mount.
"""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _note(msg: str) -> None:
    print(f"snapstore: {msg}", file=sys.stderr, flush=True)


def _snapshot_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a snapshot number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"snapshot numbers start at 1, not {n}")
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the deadline must be positive, not {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _interval(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a number of seconds or 'auto': {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction is between 0 and 1, not {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _pid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}")
    return value


# the arguments several subcommands share, added the same way to each
def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root", type=Path, help=f"snapshot root (default ${ROOT_ENV}, else {DEFAULT_ROOT})"
    )


def _add_task(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--task", required=required, help="task id")


def _add_snapshot(
    p: argparse.ArgumentParser, help: str = "snapshot number (default: the latest committed)"
) -> None:
    p.add_argument("--snapshot", type=_snapshot_number, metavar="N", help=help)


def _add_restore_mode(p: argparse.ArgumentParser, *, lazy: str, eager: str) -> None:
    """``--lazy``/``--eager`` into ``args.lazy`` (None: neither given, the default applies)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--lazy", dest="lazy", action="store_const", const=True, default=None, help=lazy
    )
    mode.add_argument("--eager", dest="lazy", action="store_const", const=False, help=eager)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="snapstore",
        description="Checkpoint a running task into a fusionfs mount with CRIU, and restore it "
        "(lazily: it resumes before its memory is fetched).",
        epilog=_EXIT_CODES,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "dump",
        help="checkpoint a running process tree as a new snapshot",
        epilog=_EXIT_CODES,
        formatter_class=fmt,
    )
    p.add_argument("pid", type=_pid, metavar="PID")
    _add_root(p)
    _add_task(p)
    p.add_argument(
        "--leave-running",
        action="store_true",
        help="keep the task running after the snapshot (default: it is killed "
        "once the snapshot is committed)",
    )
    p.add_argument(
        "--tcp-established",
        action="store_true",
        help="checkpoint established TCP connections (CRIU --tcp-established)",
    )
    p.add_argument(
        "--shell-job",
        action="store_true",
        help="the task shares a session or terminal (CRIU --shell-job)",
    )
    p.add_argument(
        "--file-locks", action="store_true", help="the task holds file locks (CRIU --file-locks)"
    )
    p.add_argument(
        "--deadline",
        type=_seconds,
        metavar="SECONDS",
        help="fail (exit 175, nothing committed, task left running) if the "
        "snapshot is not committed within SECONDS",
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    p = sub.add_parser(
        "restore", help="restore a committed snapshot", epilog=_EXIT_CODES, formatter_class=fmt
    )
    _add_root(p)
    _add_task(p)
    _add_snapshot(p)
    _add_restore_mode(
        p,
        lazy="resume at once, fetch memory on demand (default where userfaultfd exists)",
        eager="read all memory before resuming",
    )
    p.add_argument(
        "--detach", action="store_true", help="return once the task runs instead of waiting for it"
    )
    p.add_argument(
        "--json", action="store_true", help="print the restore result as JSON (once the task runs)"
    )

    p = sub.add_parser(
        "verify",
        help="check a committed snapshot end to end without restoring it",
        description="Check the manifest's digest, every image file's size and digest, and "
        "read every chunk once from the store (past every cache) against its BLAKE3; "
        "progress on stderr. --quick checks the manifest, the files, their sizes and that "
        "every pack exists, without reading chunks.",
        epilog=_EXIT_CODES,
        formatter_class=fmt,
    )
    _add_root(p)
    _add_task(p)
    _add_snapshot(p)
    p.add_argument(
        "--quick", action="store_true", help="existence and sizes only (no chunk is read)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("list", help="list committed snapshots")
    _add_root(p)
    _add_task(p, required=False)
    p.add_argument(
        "--all",
        action="store_true",
        help="also list uncommitted snapshot dirs (failed or interrupted dumps)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "show", help="show a snapshot's manifest and the task's attempts (snapstore run)"
    )
    _add_root(p)
    _add_task(p)
    _add_snapshot(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='the manifest as stored, with the attempt records added as "attempts"',
    )

    p = sub.add_parser(
        "check",
        help="measure whether a full and an incremental checkpoint fit the window here",
        description="Writes a sample through the snapshot root's mount as a checkpoint would "
        "(new memory, then the same memory again as an incremental snapshot sees it), and "
        "estimates the checkpoint times of a task of --size bytes or of the running --pid "
        "against the deadline (window minus margin). Exit 0: both fit; 3: only an incremental "
        "checkpoint fits (use --checkpoint-interval); 4: neither fits.",
    )
    _add_root(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--size", metavar="SIZE", help="the task's memory, e.g. 4G or 512M")
    what.add_argument(
        "--pid", type=_pid, help="a running task: its memory, compressibility and churn"
    )
    p.add_argument(
        "--window",
        type=_positive,
        default=SIGTERM_WINDOW_S,
        metavar="S",
        help=f"seconds from notice to stop (default {SIGTERM_WINDOW_S:g}: GCP, Azure, "
        "SIGTERM; AWS gives 120)",
    )
    p.add_argument(
        "--deadline-margin",
        type=_non_negative,
        metavar="S",
        help="seconds kept free at the end of the window (default 10%% of it, at least 1)",
    )
    p.add_argument(
        "--churn",
        type=_fraction,
        metavar="F",
        help="fraction of the memory changed since the last periodic checkpoint (default: "
        "measured with --pid, else 0.1)",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=_positive,
        default=300.0,
        metavar="S",
        help="the periodic interval the measured churn is applied over (default 300)",
    )
    p.add_argument(
        "--measure",
        type=_positive,
        default=10.0,
        metavar="S",
        help="seconds to watch --pid's memory change (default 10)",
    )
    p.add_argument(
        "--sample-mib",
        type=_count,
        default=256,
        metavar="N",
        help="MiB written to measure the rates (default 256)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "report",
        help="what snapstore run saved, summed over every task under the root",
        description="Sums the attempt records of every task under the root: attempts, "
        "reclaims survived (checkpointed on a notice), restores and the CPU time they carried "
        "over (the compute a restart from zero would have redone), checkpoint and restore "
        "time, bytes uploaded by checkpoints and bytes the task's kept snapshots hold.",
    )
    _add_root(p)
    p.add_argument("--json", action="store_true", help="one object per task, and the totals")

    p = sub.add_parser(
        "run",
        help="run a task; checkpoint it on a spot notice or SIGTERM; resume it when run again",
        usage="snapstore run --task ID [options] -- COMMAND [ARGS...]",
        description="If task ID has a committed snapshot, restore the latest and wait for it; "
        "else start COMMAND (in its own session, stdout/stderr to files under --log-dir, "
        "copied to ours). On a reclamation notice or SIGTERM, checkpoint it within the window "
        f"and exit {EXIT_CHECKPOINTED}; run the same line again to resume. In a Slurm job "
        "($SLURM_JOB_ID) the job then requeues itself (scontrol requeue), so its script runs "
        "again. When the task ends by itself, its snapshots are removed and its exit status "
        "returned.",
        epilog=_EXIT_CODES,
        formatter_class=fmt,
    )
    _add_root(p)
    _add_task(p)
    p.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="auto",
        help="whose reclamation notice to poll (default auto: AWS, else Azure, else GCP, "
        "else none, probed with short timeouts); SIGTERM always counts as a notice",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=_interval,
        metavar="S|auto",
        help="also take a --leave-running snapshot every S seconds; auto: as often as needed "
        "for the final checkpoint to fit the window, from the measured checkpoint rate, the "
        "task's size and its churn (each choice is logged)",
    )
    p.add_argument(
        "--keep",
        type=_count,
        default=DEFAULT_KEEP,
        metavar="N",
        help=f"keep the last N committed snapshots (default {DEFAULT_KEEP})",
    )
    p.add_argument(
        "--window",
        type=_positive,
        metavar="S",
        help=f"seconds from notice to stop (default: AWS 120, GCP 30, SIGTERM "
        f"{SIGTERM_WINDOW_S:g}; in a Slurm job, SIGTERM: until the job's EndTime, its "
        "preemption's GraceTime, or KillWait if it is already being killed)",
    )
    p.add_argument(
        "--deadline-margin",
        type=_non_negative,
        metavar="S",
        help="seconds kept free at the end of the window (default 10%% of it, at least 1)",
    )
    p.add_argument(
        "--poll-interval",
        type=_positive,
        metavar="S",
        help="seconds between metadata polls (default AWS 5, GCP 1)",
    )
    p.add_argument(
        "--aws-endpoint",
        metavar="URL",
        help="IMDS base URL (default $AWS_EC2_METADATA_SERVICE_ENDPOINT, else "
        "http://169.254.169.254)",
    )
    p.add_argument(
        "--gcp-host",
        metavar="HOST[:PORT]",
        help="GCP metadata host (default $GCE_METADATA_HOST, else metadata.google.internal)",
    )
    p.add_argument(
        "--azure-endpoint",
        metavar="URL",
        help="Azure instance metadata base URL (default $SNAPSTORE_AZURE_METADATA_ENDPOINT, "
        "else http://169.254.169.254)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="where the task's stdout and stderr go, as TASK.stdout and TASK.stderr (default "
        "ROOT/.logs; must be on the mount, the task keeps them open across machines)",
    )
    p.add_argument(
        "--no-pid-namespace",
        dest="pid_namespace",
        action="store_false",
        help="run COMMAND directly, not under an init in a PID namespace of its own (a "
        "restore then needs the task's original PIDs free)",
    )
    _add_restore_mode(
        p, lazy="restore lazily (default where userfaultfd exists)", eager="restore eagerly"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")

    p = sub.add_parser("rm", help="remove a snapshot (manifest first), or a whole task")
    _add_root(p)
    _add_task(p)
    _add_snapshot(p, help="remove only snapshot N (committed or not)")
    return parser


# -- commands


def _cmd_dump(args: argparse.Namespace) -> int:
    started = time.monotonic()
    from snapstore.dump import DumpOptions, dump  # not imported by restore: its start-up counts

    validate_task_id(args.task)
    _criu.prefetch()
    root = open_root(args.root, create=True)
    opts = DumpOptions(
        leave_running=args.leave_running,
        tcp_established=args.tcp_established,
        shell_job=args.shell_job,
        file_locks=args.file_locks,
        deadline=args.deadline,
    )
    result = dump(args.pid, args.task, root, opts)
    m = result.manifest
    total = time.monotonic() - started
    if args.json:
        _say(m.to_json().rstrip())
        return 0
    t = m.timings
    pages = m.criu_stats.get("pages_written", 0) * 4096
    _say(f"snapshot {m.snapshot} of task {m.task} committed: {result.manifest_path}")
    _say(
        f"  pid {m.pid} ({len(m.pids)} process(es), {len(m.tids)} thread(s)): "
        f"{' '.join(m.command)[:100]}"
    )
    _say(f"  size {_mb(m.total_bytes)} in {len(m.files)} files (memory pages {_mb(pages)})")
    _say(
        f"  freeze {t['freeze_s']:.3f} s | frozen {t['frozen_s']:.3f} s (memory dump "
        f"{t['memdump_s']:.3f} s, write {t['memwrite_s']:.3f} s) | criu {t['criu_s']:.3f} s"
        f" | flush until durable {t['flush_s']:.3f} s | total {total:.3f} s"
    )
    if m.options.get("leave_running"):
        _say(f"  task {m.pid} left running")
    else:
        _say(f"  task {m.pid} killed after the commit")
    return 0


def _restore_json(r: RestoreResult) -> str:
    return json.dumps(
        {
            "task": r.task,
            "snapshot": r.snapshot,
            "pid": r.pid,
            "lazy": r.lazy,
            "resume_s": round(r.resume_s, 6),
            "pages_s": r.pages_s,
            "workdir": str(r.workdir),
            "lazy_pid": r.lazy_pid,
            "criu_stats": r.stats,
        },
        sort_keys=True,
    )


def _cmd_restore(args: argparse.Namespace) -> int:
    validate_task_id(args.task)
    _criu.prefetch()  # its version check overlaps the root's checks and the manifest's read
    root = open_root(args.root, create=False)
    started = time.monotonic()
    result = restore(args.task, root, args.snapshot, args.lazy)
    how = "lazily" if result.lazy else "eagerly"
    if args.json:
        _say(_restore_json(result))
    else:
        _say(
            f"restored snapshot {result.snapshot} of task {result.task} {how}: pid "
            f"{result.pid} running after {result.resume_s:.3f} s"
        )
    if args.detach:
        if result.lazy_pid is None:
            shutil.rmtree(result.workdir, ignore_errors=True)
        elif not args.json:
            _say(
                f"  pages keep arriving in the background (criu lazy-pages pid "
                f"{result.lazy_pid}, log {result.workdir / 'lazy-pages.log'})"
            )
        return 0

    def pages_in(r: RestoreResult) -> None:
        if r.lazy_status not in (None, 0):
            _note(
                f"criu lazy-pages exited with status {r.lazy_status} before all pages were "
                f"in; log: {r.workdir / 'lazy-pages.log'}"
            )
        elif not args.json:
            _say(f"  all pages in after {r.pages_s:.3f} s")

    code = wait_task(result, pages_in, started)
    _note(f"task {result.pid} exited with status {code}")
    return code


def _cmd_verify(args: argparse.Namespace) -> int:
    root = open_root(args.root, create=False)
    n = Catalog(root.path).resolve(args.task, args.snapshot)
    report = verify_snapshot(root, args.task, n, full=not args.quick, progress=_note)
    if args.json:
        _say(json.dumps(report.as_dict(), sort_keys=True))
        return 0
    what = "quick check" if args.quick else "every chunk read once"
    rate = report.checked_bytes / 1e6 / report.seconds if report.seconds > 0 else 0.0
    _say(
        f"snapshot {n} of task {args.task} verifies ({what}): {report.files} files, "
        f"{_mb(report.bytes)}, {report.chunks} chunks in {report.packs} pack references, "
        f"{report.seconds:.2f} s ({rate:.0f} MB/s read)"
    )
    return 0


def _manifest_row(m: Manifest) -> str:
    return (
        f"{m.task:<24} {m.snapshot:>5}  {m.created:<29} {_mb(m.total_bytes):>11}  "
        f"{m.pid:>8}  {m.timings.get('total_s', 0.0):>8.2f}"
    )


def _cmd_list(args: argparse.Namespace) -> int:
    root = open_root(args.root, create=False)
    catalog = Catalog(root.path)
    tasks = [validate_task_id(args.task)] if args.task else catalog.tasks()
    if args.task and not catalog.task_dir(args.task).is_dir():
        raise UsageError(f"no task {args.task!r} in {root.path}")
    rows: list[dict[str, object]] = []
    lines: list[str] = []
    for task in tasks:
        for n in catalog.committed(task):
            try:
                m = catalog.load(task, n)
            except SnapshotCorrupt as err:  # listed, not fatal: `verify` and `rm` need its n
                rows.append({"task": task, "snapshot": n, "committed": True, "damaged": str(err)})
                lines.append(f"{task:<24} {n:>5}  (damaged manifest: see snapstore verify)")
                continue
            rows.append(
                {
                    "task": task,
                    "snapshot": n,
                    "committed": True,
                    "created": m.created,
                    "bytes": m.total_bytes,
                    "pid": m.pid,
                }
            )
            lines.append(_manifest_row(m))
        if args.all:
            for n in catalog.uncommitted(task):
                rows.append({"task": task, "snapshot": n, "committed": False})
                lines.append(f"{task:<24} {n:>5}  (uncommitted: failed or interrupted dump)")
    if args.json:
        _say(json.dumps(rows))
    else:
        _say(
            f"{'TASK':<24} {'N':>5}  {'CREATED (UTC)':<29} {'SIZE':>11}  {'PID':>8}  "
            f"{'DUMP (s)':>8}"
        )
        for line in lines:
            _say(line)
    return 0


def _attempt_lines(records: list[dict[str, Any]]) -> list[str]:
    from snapstore import attempts as attempt_records

    lines = [
        f"  {'#':>3}  {'HOST':<16} {'STARTED (UTC)':<19}  {'ENDED':<19}  {'BEGAN':<14} "
        f"{'OUTCOME':<22} {'CPU CARRIED':>11}  CHECKPOINTS"
    ]
    for rec in records:
        how = str(rec.get("how") or "-")
        if how == "restored":
            how = f"restored {rec.get('restored_from')}"
        outcome = str(rec.get("outcome"))
        notice = rec.get("notice")
        if outcome == "checkpointed" and isinstance(notice, dict):
            outcome = f"checkpointed ({notice.get('source')})"
        elif outcome == "finished":
            outcome = f"finished ({rec.get('task_status')})"
        elif outcome in ("error", "checkpoint-failed"):
            outcome = f"{outcome} ({rec.get('exit_code')})"
        cps = rec.get("checkpoints") or []
        assert isinstance(cps, list)
        cp_text = ", ".join(
            f"{cp['kind']} {cp['snapshot']}: {cp['seconds']:.1f} s {cp['uploaded'] / 1e6:.0f} MB"
            for cp in cps
        )
        lines.append(
            f"  {rec.get('attempt'):>3}  {str(rec.get('host'))[:16]:<16} "
            f"{attempt_records.age(str(rec.get('started') or '')):<19}  "
            f"{attempt_records.age(str(rec.get('ended') or '')):<19}  {how:<14} {outcome:<22} "
            f"{attempt_records.duration(float(rec.get('cpu_carried_s') or 0.0)):>11}  "
            f"{cp_text or '-'}"
        )
        if rec.get("error"):
            lines.append(f"       error: {rec.get('error')}")
    return lines


def _cmd_show(args: argparse.Namespace) -> int:
    from snapstore import attempts as attempt_records

    root = open_root(args.root, create=False)
    catalog = Catalog(root.path)
    task = validate_task_id(args.task)
    records = attempt_records.load_attempts(root.path, task)
    m: Manifest | None = None
    if records and args.snapshot is None and catalog.latest(task) is None:
        pass  # a task with a history but no snapshot (finished, or never checkpointed)
    else:
        n = catalog.resolve(task, args.snapshot)
        m = catalog.load(task, n)
    if args.json:  # the manifest as stored, plus the attempt records under "attempts"
        data = json.loads(m.to_json()) if m is not None else {}
        data["attempts"] = records
        _say(json.dumps(data, indent=2, sort_keys=True))
        return 0
    if m is None:
        _say(f"task {task}: no committed snapshot")
    else:
        _show_manifest(catalog, m)
    if records:
        s = attempt_records.summarize(task, records)
        _say(
            f"attempts ({s.attempts}; {s.reclaims} reclaim(s) survived, "
            f"{attempt_records.duration(s.cpu_saved_s)} CPU carried across {s.restores} "
            f"restore(s)):"
        )
        for line in _attempt_lines(records):
            _say(line)
    return 0


def _show_manifest(catalog: Catalog, m: Manifest) -> None:
    n = m.snapshot
    _say(f"task {m.task} snapshot {m.snapshot} (committed {m.created} on {m.host})")
    _say(
        f"  images   {catalog.images_dir(m.task, n)}: {_mb(m.total_bytes)} in {len(m.files)} files"
    )
    _say(f"  process  pid {m.pid}, pids {m.pids}, {len(m.tids)} thread(s): {' '.join(m.command)}")
    _say(
        f"  criu     {m.criu_version} on {m.kernel} {m.arch}; options "
        f"{', '.join(k for k, v in m.options.items() if v) or 'none'}"
    )
    if m.storage:
        st = m.storage
        _say(
            f"  storage  logical {_mb(st.get('logical_bytes', 0))}, stored "
            f"{_mb(st.get('stored_bytes', 0))}, new in this snapshot "
            f"{_mb(st.get('new_stored_bytes', 0))}"
        )
    _say("  timings  " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in m.timings.items()))
    for f in m.files:
        _say(f"    {f.size:>14}  {f.name}")


def _cmd_check(args: argparse.Namespace) -> int:
    from snapstore.check import parse_size, run_check  # only this command needs it

    size = parse_size(args.size) if args.size is not None else None
    margin = (
        args.deadline_margin if args.deadline_margin is not None else default_margin(args.window)
    )
    deadline = args.window - margin
    if deadline <= 0:
        raise UsageError(f"a margin of {margin:g} s leaves nothing of a {args.window:g} s window")
    root = open_root(args.root, create=True)
    r = run_check(
        root,
        window=args.window,
        deadline=deadline,
        size=size,
        pid=args.pid,
        churn=args.churn,
        interval=args.checkpoint_interval,
        measure_s=args.measure,
        sample_bytes=args.sample_mib << 20,
        progress=_note,
    )
    if args.json:
        data = dataclasses.asdict(r)
        data.update(
            full_fits=r.full_fits, incremental_fits=r.incremental_fits, exit_code=r.exit_code
        )
        _say(json.dumps(data))
        return r.exit_code

    def verdict(ok: bool) -> str:
        return "fits" if ok else "does NOT fit"

    _say(f"snapshot root   {root.path}")
    _say(f"task            {_mb(r.size)} ({r.size_from})")
    _say(
        f"rates           new memory {r.new_rate / 1e6:.0f} MB/s, unchanged memory "
        f"{r.same_rate / 1e6:.0f} MB/s ({_mb(r.sample_bytes)} sample of {r.sample_from})"
    )
    _say(f"deadline        {r.deadline:g} s (window {r.window:g} s minus {margin:g} s margin)")
    _say(f"full            {r.full_s:.1f} s: {verdict(r.full_fits)}")
    _say(
        f"incremental     {r.incremental_s:.1f} s with {r.churn:.0%} changed ({r.churn_from}): "
        f"{verdict(r.incremental_fits)}"
    )
    if r.churn_rate is not None:
        longest = r.max_interval_s
        _say(
            f"churn           {r.churn_rate / 1e6:.1f} MB/s; "
            + (
                f"--checkpoint-interval {longest:.0f} or less keeps the final one in the window"
                if longest is not None and longest != float("inf")
                else "any interval fits"
                if longest is not None
                else "no interval fits"
            )
        )
    if not r.full_fits:
        _say(
            "advice          "
            + (
                "take periodic checkpoints (--checkpoint-interval auto): a final checkpoint "
                "before the first one would not fit"
                if r.incremental_fits
                else "neither fits: a faster link, a longer window, or a smaller task"
            )
        )
    return r.exit_code


def _cmd_report(args: argparse.Namespace) -> int:
    from snapstore import attempts as attempt_records

    root = open_root(args.root, create=False)
    if not root.path.is_dir():
        raise UsageError(f"no snapshot root at {root.path}")
    catalog = Catalog(root.path)
    tasks = sorted(set(attempt_records.recorded_tasks(root.path)) | set(catalog.tasks()))
    summaries: list[attempt_records.TaskSummary] = []
    for task in tasks:
        stored = 0
        latest = catalog.latest(task)
        if latest is not None:
            m = catalog.load(task, latest)
            stored = m.storage.get("stored_bytes", m.total_bytes)
        records = attempt_records.load_attempts(root.path, task)
        summaries.append(attempt_records.summarize(task, records, stored))
    total = attempt_records.TaskSummary(task="(all)")
    for s in summaries:
        total.attempts += s.attempts
        total.finished = total.finished or s.finished
        total.reclaims += s.reclaims
        total.restores += s.restores
        total.lost += s.lost
        total.failed_checkpoints += s.failed_checkpoints
        total.failed_restores += s.failed_restores
        total.cpu_saved_s += s.cpu_saved_s
        total.checkpoints += s.checkpoints
        total.checkpoint_s += s.checkpoint_s
        total.restore_s += s.restore_s
        total.bytes_uploaded += s.bytes_uploaded
        total.bytes_stored += s.bytes_stored
    if args.json:
        _say(
            json.dumps(
                {
                    "root": str(root.path),
                    "tasks": [s.as_dict() for s in summaries],
                    "total": {
                        **total.as_dict(),
                        "tasks": len(summaries),
                        "finished_tasks": sum(s.finished for s in summaries),
                    },
                }
            )
        )
        return 0
    _say(
        f"{'TASK':<24} {'STATE':<18} {'ATTEMPTS':>8} {'RECLAIMS':>8} {'RESTORES':>8} "
        f"{'CPU SAVED':>10} {'CKPT TIME':>10} {'UPLOADED':>11} {'STORED':>11}"
    )
    for s in [*summaries, total]:
        if s is total:
            state = f"{sum(x.finished for x in summaries)}/{len(summaries)} finished"
        elif s.finished:
            state = f"finished ({s.task_status})"
        else:
            state = s.last_outcome or "no attempts"
        _say(
            f"{s.task:<24} {state:<18} {s.attempts:>8} {s.reclaims:>8} {s.restores:>8} "
            f"{attempt_records.duration(s.cpu_saved_s):>10} "
            f"{attempt_records.duration(s.checkpoint_s):>10} {_mb(s.bytes_uploaded):>11} "
            f"{_mb(s.bytes_stored):>11}"
        )
    if total.lost or total.failed_checkpoints or total.failed_restores:
        _say(
            f"not saved: {total.failed_checkpoints} failed checkpoint(s), "
            f"{total.failed_restores} failed restore(s), {total.lost} attempt(s) ended "
            "without a record (machine gone before a checkpoint, or the supervisor killed)"
        )
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    root = open_root(args.root, create=False)
    removed = Catalog(root.path).remove(args.task, args.snapshot)
    what = f"snapshot {args.snapshot}" if args.snapshot else f"{len(removed)} snapshot(s)"
    _say(f"removed {what} of task {args.task}")
    summary = root.collect_garbage()
    if summary is not None:
        _say(summary)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command given: snapstore run --task ID [options] -- COMMAND")
    _criu.prefetch()
    from snapstore.supervisor import RunOptions  # the supervisor's imports: only for run
    from snapstore.supervisor import run as supervise

    opts = RunOptions(
        task=validate_task_id(args.task),
        command=command,
        root=args.root,
        provider=args.provider,
        checkpoint_interval=(
            None if args.checkpoint_interval == "auto" else args.checkpoint_interval
        ),
        auto_interval=args.checkpoint_interval == "auto",
        window=args.window,
        deadline_margin=args.deadline_margin,
        keep=args.keep,
        poll_interval=args.poll_interval,
        log_dir=args.log_dir,
        lazy=args.lazy,
        aws_endpoint=args.aws_endpoint,
        gcp_host=args.gcp_host,
        azure_endpoint=args.azure_endpoint,
        pid_namespace=args.pid_namespace,
    )
    return supervise(opts, _note)


_COMMANDS = {
    "dump": (_cmd_dump, EXIT_DUMP_FAILED),
    "restore": (_cmd_restore, EXIT_RESTORE_FAILED),
    "verify": (_cmd_verify, 1),
    "list": (_cmd_list, 1),
    "show": (_cmd_show, 1),
    "rm": (_cmd_rm, 1),
    "run": (_cmd_run, 1),
    "report": (_cmd_report, 1),
    "check": (_cmd_check, 1),
}


def _terminate(signo: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signo}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler, failure_code = _COMMANDS[args.command]
    # SIGTERM unwinds like Ctrl-C, so a dump in progress gives its task back (SIGCONT).
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return handler(args)
    except SnapstoreError as err:
        _note(f"error: {err}")
        for line in err.details:
            print(f"    {line}", file=sys.stderr)
        return err.exit_code if err.exit_code != 1 else failure_code
    except OSError as err:  # the root's mount died, a disk filled: one line, no traceback
        _note(f"error: {os_error_text(err)}")
        return failure_code
    except KeyboardInterrupt:
        _note(f"{args.command} interrupted")
        return failure_code if args.command in ("dump", "restore") else 130


if __name__ == "__main__":
    sys.exit(main())
