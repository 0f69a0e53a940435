"""snapstore's error classes and the exit codes they map to.

Every error a user can cause or meet is one of these; the CLI prints ``str(err)`` as one line on
stderr (plus ``err.details``, indented, when CRIU's log has something to say) and exits with
``err.exit_code``. Nothing else escapes as a traceback except real bugs.

Exit codes follow Fusion Snapshots' convention so workflow engines configured for it retry the
same way: 175 when a dump fails, 176 when a restore fails, 177 (``EXIT_CORRUPT``) when the
snapshot does not verify (a damaged manifest, a file, pack or chunk missing or wrong: it is never
restored; ``run`` falls back to older snapshots first; ``verify`` says so with 177 too). 177 is
not worth a retry on another machine, which reads the same bytes. 2 is bad usage or input
(which a retry will not fix). ``restore`` without ``--detach`` exits with the task's own status
instead.

``run`` adds 75 (``EXIT_CHECKPOINTED``): the task was checkpointed and committed because the
machine is going away (a spot notice or SIGTERM); run the same command again to resume it. 75 is
``EX_TEMPFAIL`` of sysexits.h ("temporary failure; the user is invited to retry"), which is what
it means; it is below 126, so no shell or engine reads it as "killed by a signal" (128+N, e.g.
143 for SIGTERM, which says nothing about whether a snapshot exists), and it differs from 175
(checkpoint failed) and 176 (restore failed) so the three outcomes stay apart in reports while
one retry rule (``exit status in 75, 175, 176``) covers them all.
"""

from __future__ import annotations

__all__ = [
    "EXIT_CHECKPOINTED",
    "EXIT_CORRUPT",
    "EXIT_DUMP_FAILED",
    "EXIT_ERROR",
    "EXIT_RESTORE_FAILED",
    "EXIT_USAGE",
    "CriuUnavailable",
    "DumpFailed",
    "RestoreFailed",
    "SnapshotCorrupt",
    "SnapstoreError",
    "UsageError",
    "os_error_text",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DUMP_FAILED = 175
EXIT_RESTORE_FAILED = 176
EXIT_CHECKPOINTED = 75
EXIT_CORRUPT = 177


class SnapstoreError(Exception):
    """Base class: a one-line message, optional detail lines, and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details: list[str] = list(details or [])


class UsageError(SnapstoreError):
    """Bad usage or input: unknown PID, no such task or snapshot, a root not on fusionfs, ..."""

    exit_code = EXIT_USAGE


class DumpFailed(SnapstoreError):
    """A dump did not commit a snapshot (CRIU failed, the deadline passed, a flush failed)."""

    exit_code = EXIT_DUMP_FAILED


class RestoreFailed(SnapstoreError):
    """A restore did not bring the task back (CRIU failed, its PID is taken, images damaged)."""

    exit_code = EXIT_RESTORE_FAILED


class SnapshotCorrupt(SnapstoreError):
    """The snapshot does not verify (a file, chunk or pack missing, wrong or of the wrong size,
    a damaged manifest): it is never restored. A retry elsewhere reads the same bytes."""

    exit_code = EXIT_CORRUPT


def os_error_text(err: OSError) -> str:
    """One line for an ``OSError`` (a dead mount: "Transport endpoint is not connected: PATH")."""
    text = err.strerror or str(err) or type(err).__name__
    return f"{text}: {err.filename}" if err.filename is not None else text


class CriuUnavailable(SnapstoreError):
    """No usable CRIU (missing, or older than 4.0). The flows re-raise it as their own failure."""
