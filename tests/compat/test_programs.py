"""Real programs on a real mount, on every store: git, sqlite3, tar, rsync, fio, Python's
tempfile + ``os.replace`` pattern, and a directory of 1500 small files.

Each test runs the program on ``compat_mount`` (a fresh store, see ``conftest.py``), checks
what the program itself checks (``git fsck``, ``PRAGMA integrity_check``, ``diff -r``, fio's
verify), then ``compat_mount.remount_cold()`` checks that a mount with an empty cache shows the
same tree (sha256 of every file, type, mode and symlink target of every entry), and most tests
then ask the program again on that fresh mount.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from compat_support import CompatMount, run, tree, tree_of

pytestmark = pytest.mark.mount


def _require(*programs: str) -> None:
    from helpers import missing

    for program in programs:
        if shutil.which(program) is None:
            missing(program, f"{program} is not on PATH (scripts/setup.sh installs it)")


def make_source_tree(root: Path) -> None:
    """A tree with what archives and copies carry: nested directories, relative, directory and
    dangling symlinks, empty files and directories, files of a few MiB, modes, odd names."""
    rng = __import__("random").Random(22)
    (root / "a/b/c").mkdir(parents=True)
    (root / "a/b/c/deep.txt").write_text("deep\n" * 100)
    (root / "empty").write_bytes(b"")
    (root / "a/empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "big1.bin").write_bytes(rng.randbytes(3 << 20))
    (root / "a/big2.bin").write_bytes(rng.randbytes(5 << 20) + bytes(123))
    (root / "links").mkdir()
    os.symlink("../a/b/c/deep.txt", root / "links/rel")
    os.symlink("../a", root / "links/dirlink")
    os.symlink("nowhere", root / "links/dangling")
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "exec.sh").chmod(0o755)
    (root / "private").write_text("secret\n")
    (root / "private").chmod(0o600)
    (root / "ünïcode ß with spaces.txt").write_text("names\n")
    (root / "key=value=.txt").write_text("an = in the name (base64 padding)\n")
    for i in range(20):
        (root / "a/b" / f"small{i:02d}").write_bytes(rng.randbytes(i * 100))


# --------------------------------------------------------------------------------------------
# git


def _git_env(home: Path) -> dict[str, str]:
    home.mkdir(exist_ok=True)
    return {
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Compat",
        "GIT_AUTHOR_EMAIL": "compat@example.org",
        "GIT_COMMITTER_NAME": "Compat",
        "GIT_COMMITTER_EMAIL": "compat@example.org",
        "GIT_TERMINAL_PROMPT": "0",
    }


@pytest.mark.timeout(240)
def test_git(compat_mount: CompatMount, tmp_path: Path) -> None:
    """git init, add, commit, ``git mv`` of a directory, commit, ``fsck --strict``; clone from
    the mount to local disk and back onto the mount; after a cold remount fsck and status."""
    _require("git")
    m = compat_mount
    env = _git_env(tmp_path / "home")
    repo = m.path / "repo"

    def git(*args: str, cwd: Path = repo) -> str:
        return run(["git", *args], cwd=cwd, env=env, timeout=60, mount=m).stdout

    git("init", "-q", "-b", "main", str(repo), cwd=m.path)
    (repo / "src/pkg").mkdir(parents=True)
    (repo / "src/pkg/__init__.py").write_text("")
    (repo / "src/pkg/mod.py").write_text("def f():\n    return 42\n" * 50)
    (repo / "src/pkg/data.bin").write_bytes(os.urandom(300 << 10))
    (repo / "src/run.sh").write_text("#!/bin/sh\nexec python3 -m pkg\n")
    (repo / "src/run.sh").chmod(0o755)
    (repo / "README.md").write_text("# compat\n")
    os.symlink("src/pkg/mod.py", repo / "link")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    git("mv", "src", "lib")
    (repo / "lib/pkg/mod.py").write_text("def f():\n    return 43\n")
    git("commit", "-q", "-a", "-m", "move src to lib")
    git("fsck", "--strict", "--no-progress")
    assert git("status", "--porcelain") == ""
    head = git("rev-parse", "HEAD").strip()
    assert git("ls-files").split() == [
        "README.md",
        "lib/pkg/__init__.py",
        "lib/pkg/data.bin",
        "lib/pkg/mod.py",
        "lib/run.sh",
        "link",
    ]

    local = tmp_path / "clone"
    git("clone", "-q", str(repo), str(local), cwd=tmp_path)
    git("fsck", "--strict", "--no-progress", cwd=local)
    assert git("rev-parse", "HEAD", cwd=local).strip() == head
    back = m.path / "clone"
    git("clone", "-q", str(local), str(back), cwd=tmp_path)
    git("fsck", "--strict", "--no-progress", cwd=back)
    assert git("rev-parse", "HEAD", cwd=back).strip() == head
    run(
        ["diff", "-r", "--no-dereference", "--exclude=.git", str(repo), str(back)],
        timeout=60,
        mount=m,
    )

    m.remount_cold()
    for where in (repo, back):
        git("fsck", "--strict", "--no-progress", cwd=where)
        assert git("status", "--porcelain", cwd=where) == ""
        assert git("rev-parse", "HEAD", cwd=where).strip() == head
    assert git("log", "--format=%s").splitlines() == ["move src to lib", "first"]


# --------------------------------------------------------------------------------------------
# sqlite3

_ROWS = 2000


def _expected_sum() -> int:
    return sum(i * 2 if i % 2 == 0 else i for i in range(1, _ROWS + 1))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite(compat_mount: CompatMount, journal: str) -> None:
    """sqlite3 on the mount: transactions that commit (insert, update) and one that rolls back,
    each in its own process; ``PRAGMA integrity_check``; the same answers after a cold remount.
    ``journal``: the default rollback journal, and write-ahead logging (its ``-shm`` file is
    shared memory, ``mmap(MAP_SHARED)`` of a file on the mount)."""
    _require("sqlite3")
    m = compat_mount
    db = str(m.path / "db" / "test.sqlite")
    (m.path / "db").mkdir()

    def sql(script: str) -> str:
        return run(["sqlite3", "-bail", db], input=script, timeout=60, mount=m).stdout.strip()

    sql(
        f"PRAGMA journal_mode={journal};\n"
        "CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, blob BLOB);\n"
        "BEGIN;\n"
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < "
        f"{_ROWS}) INSERT INTO t SELECT i, i, randomblob(1500) FROM c;\n"
        "COMMIT;\n"
    )
    sql("BEGIN; UPDATE t SET n = n * 2 WHERE id % 2 = 0; COMMIT;")
    sql("BEGIN; DELETE FROM t WHERE id > 10; UPDATE t SET n = 0; ROLLBACK;")
    sql("BEGIN; INSERT INTO t VALUES (-1, 0, zeroblob(10)); DELETE FROM t WHERE id = -1; COMMIT;")
    want = f"ok\n{_ROWS}|{_expected_sum()}"
    check = "PRAGMA integrity_check; SELECT count(*), sum(n) FROM t;"
    assert sql(check) == want
    if journal == "wal":
        sql("PRAGMA wal_checkpoint(TRUNCATE);")

    m.remount_cold()
    assert sql(check) == want
    assert sql("PRAGMA journal_mode;") == journal


# --------------------------------------------------------------------------------------------
# tar


@pytest.mark.timeout(180)
def test_tar(compat_mount: CompatMount, tmp_path: Path) -> None:
    """tar extracts an archive of nested directories, symlinks, empty files and files of a few
    MiB onto the mount; ``diff -r`` and the tree (modes, link targets) match the source, before
    and after a cold remount; tar lists and re-extracts the archive from the mount."""
    _require("tar")
    m = compat_mount
    src = tmp_path / "src"
    src.mkdir()
    make_source_tree(src)
    archive = tmp_path / "a.tar"
    run(["tar", "-cf", str(archive), "-C", str(src), "."], timeout=60)
    dst = m.path / "x"
    dst.mkdir()
    run(["tar", "-xf", str(archive), "-C", str(dst)], timeout=60, mount=m)
    run(["diff", "-r", "--no-dereference", str(src), str(dst)], timeout=60, mount=m)
    want = tree(src)
    assert tree_of(dst, mount=m) == want

    shutil.copy(archive, m.path / "a.tar")
    m.remount_cold()
    run(["diff", "-r", "--no-dereference", str(src), str(dst)], timeout=60, mount=m)
    assert tree_of(dst, mount=m) == want
    again = tmp_path / "again"
    again.mkdir()
    run(["tar", "-xf", str(m.path / "a.tar"), "-C", str(again)], timeout=60, mount=m)
    assert tree(again) == want


# --------------------------------------------------------------------------------------------
# rsync


@pytest.mark.timeout(180)
def test_rsync(compat_mount: CompatMount, tmp_path: Path) -> None:
    """``rsync -a`` into the mount and back out, ``diff -r``; a second ``rsync -a`` transfers
    and changes nothing (``--itemize-changes`` prints nothing), also after a cold remount."""
    _require("rsync")
    m = compat_mount
    src = tmp_path / "src"
    src.mkdir()
    make_source_tree(src)
    into, back = m.path / "r", tmp_path / "back"

    def rsync(a: Path, b: Path, *extra: str) -> str:
        return run(["rsync", "-a", *extra, f"{a}/", f"{b}/"], timeout=90, mount=m).stdout

    rsync(src, into)
    rsync(into, back)
    run(["diff", "-r", "--no-dereference", str(src), str(back)], timeout=60, mount=m)
    assert tree(back) == tree(src)
    assert rsync(src, into, "--itemize-changes") == ""

    m.remount_cold()
    assert rsync(src, into, "--itemize-changes") == ""
    assert rsync(into, back, "--itemize-changes") == ""


# --------------------------------------------------------------------------------------------
# fio


@pytest.mark.timeout(240)
@pytest.mark.compat_mount_args("--part-size", "5M")
def test_fio_verify(compat_mount: CompatMount, tmp_path: Path) -> None:
    """fio writes 48 MiB sequentially (ten 5 MiB multipart parts) and a file of 12 MiB in
    random 64 KiB blocks, each with ``--verify=crc32c`` (written, then read back and checked);
    after a cold remount fio checks both files again (``--verify_only``)."""
    _require("fio")
    m = compat_mount
    (m.path / "fio").mkdir()
    jobs = {
        "seq": ["--rw=write", "--bs=1M", "--size=48M"],
        "rand": ["--rw=randwrite", "--bs=64k", "--size=12M", "--randrepeat=1"],
    }

    def fio(name: str, *extra: str) -> None:
        run(
            [
                "fio",
                f"--name={name}",
                f"--filename={m.path}/fio/{name}.dat",
                *jobs[name],
                "--ioengine=psync",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--end_fsync=1",
                "--output-format=terse",
                *extra,
            ],
            timeout=120,
            mount=m,
            cwd=tmp_path,
        )  # fio's verify state files go to its working directory

    for name in jobs:
        fio(name)
    m.remount_cold()
    for name in jobs:
        fio(name, "--verify_only")


# --------------------------------------------------------------------------------------------
# tempfile + os.replace

_REPLACER = r"""
import json, os, sys, tempfile, threading, hashlib

directory, rounds = sys.argv[1], int(sys.argv[2])
target = os.path.join(directory, "state.json")
stop = threading.Event()
seen, problems = [], []

def version(i):
    payload = ("%d " % i) * (1000 + 7000 * (i % 5))
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return json.dumps({"version": i, "payload": payload, "sha256": digest})

def read():
    with open(target) as f:
        doc = json.loads(f.read())
    if hashlib.sha256(doc["payload"].encode()).hexdigest() != doc["sha256"]:
        raise AssertionError("torn version %d" % doc["version"])
    return doc["version"]

def reader():
    while not stop.is_set():
        try:
            seen.append(read())
        except Exception as err:
            problems.append("reader: %s: %s" % (type(err).__name__, err))
            return

def replace(i):
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(version(i))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)

replace(0)
thread = threading.Thread(target=reader)
thread.start()
try:
    for i in range(1, rounds + 1):
        replace(i)
        got = read()
        if got != i:
            problems.append("read %d right after replacing it with %d" % (got, i))
finally:
    stop.set()
    thread.join()
if seen != sorted(seen):
    problems.append("the reader went back in time: %s" % seen)
left = sorted(os.listdir(directory))
if left != ["state.json"]:
    problems.append("left in the directory: %s" % left)
print(json.dumps({"reads": len(seen), "problems": problems}))
sys.exit(1 if problems else 0)
"""


@pytest.mark.timeout(180)
def test_tempfile_replace(compat_mount: CompatMount) -> None:
    """The atomic-save pattern (``tempfile.mkstemp`` in the same directory, write, fsync,
    ``os.replace``), 40 times, read back after each replace and by a reader thread all along:
    every read is one whole version, never older than one read before it; no temporary file is
    left; after a cold remount the last version is there."""
    m = compat_mount
    (m.path / "state").mkdir()
    rounds = 40
    run([sys.executable, "-c", _REPLACER, str(m.path / "state"), str(rounds)], timeout=120, mount=m)
    m.remount_cold()
    doc = (m.path / "state/state.json").read_text()
    assert f'"version": {rounds},' in doc


# --------------------------------------------------------------------------------------------
# many small files

_MANY = 1500

_WRITER = r"""
import os, sys
root = sys.argv[1]
open(os.path.join(root, "empty"), "wb").close()
os.mkdir(os.path.join(root, "many"))
for i in range(int(sys.argv[2])):
    with open(os.path.join(root, "many", "f%04d" % i), "wb") as f:
        f.write(b"" if i % 2 == 0 else (b"line %d\n" % i) * (i % 7))
"""


@pytest.mark.timeout(300)
@pytest.mark.compat_mount_args("--metadata-ttl", "60")
def test_empty_and_many_small_files(compat_mount: CompatMount) -> None:
    """An empty file and a directory of 1500 small files (half of them empty) are read back
    whole from a fresh mount with an empty cache: ``sha256sum`` of every file matches.

    One mount at a time, so a long ``--metadata-ttl`` (read-mostly data): with the default 1 s,
    each walk of the tree after the first revalidates every file (1500 requests: 25-35 s on
    moto for each of the fingerprints before and after the remount)."""
    m = compat_mount
    run([sys.executable, "-c", _WRITER, str(m.path), str(_MANY)], timeout=180, mount=m)
    want = {
        f"many/f{i:04d}": hashlib.sha256(
            b"" if i % 2 == 0 else (b"line %d\n" % i) * (i % 7)
        ).hexdigest()
        for i in range(_MANY)
    }
    want["empty"] = hashlib.sha256(b"").hexdigest()

    got: dict[str, str] = {}

    def sha256sum() -> None:  # the first reader of the fresh mount
        out = run(
            "find empty many -type f -print0 | xargs -0 sha256sum",
            shell=True,
            cwd=m.path,
            timeout=180,
            mount=m,
        ).stdout
        got.update((p, d) for d, p in (line.split("  ", 1) for line in out.splitlines()))

    m.remount_cold(first=sha256sum)
    assert got == want
