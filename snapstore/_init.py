"""The task's init: PID 1 of the task's own PID namespace (see ``snapstore.pidns``).

Run as a script (``python3 -I -S _init.py OUT_FD ERR_FD -- COMMAND...``), never imported: it
imports only ``os``, ``signal`` and ``sys``, so the interpreter stays small in every snapshot.

It makes itself a session leader (CRIU needs the session leader inside the dumped namespace),
moves the log fds its parent passed it onto stdout and stderr, starts COMMAND as its only
child, and then:
- forwards SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGALRM and SIGTERM to it (PID 1
  of a namespace ignores every signal it has no handler for, so without this the task would
  never hear them);
- reaps every process that ends in the namespace (orphans are reparented to PID 1);
- exits with COMMAND's status (128+N when a signal N killed it, as a shell reports it); the
  kernel then kills whatever is left in the namespace.
"""

import os
import signal
import sys

_FORWARDED = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGALRM,
    signal.SIGTERM,
)


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 4 or args[2] != "--":
        os.write(2, b"snapstore init: usage: _init.py OUT_FD ERR_FD -- COMMAND [ARGS...]\n")
        return 2
    out_fd, err_fd, command = int(args[0]), int(args[1]), args[3:]
    for src, dst in ((out_fd, 1), (err_fd, 2)):
        if src != dst:
            os.dup2(src, dst)
    for fd in {out_fd, err_fd} - {1, 2}:
        os.close(fd)
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    child = os.fork()
    if child == 0:
        for signo in _FORWARDED:
            signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        try:
            os.execvp(command[0], command)
        except OSError as err:
            os.write(2, f"snapstore init: cannot run {command[0]!r}: {err.strerror}\n".encode())
            os._exit(126 if isinstance(err, PermissionError) else 127)

    def forward(signo: int, _frame: object) -> None:
        try:
            os.kill(child, signo)
        except ProcessLookupError:
            pass

    for signo in _FORWARDED:
        signal.signal(signo, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # cannot happen while the child lives; be safe
            return 1
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
