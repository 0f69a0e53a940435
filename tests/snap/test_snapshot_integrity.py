"""A snapshot that does not verify is never restored: exit 177, one line naming what is wrong.

Real CRIU on real processes (``memtask.py``: known random memory it can check itself), through
real fusionfs mounts of three stores: a local directory (``LocalStore``), the moto server and
s3rver. Two snapshots of one task are taken (the second de-duplicated against the first: it
reuses most of its chunks and adds a pack of its own for the 10 % of memory that changed), then
a fault is made out of band, under the mount (boto3 on the bucket, or the file in the local
store), and the mount is replaced by a fresh one with an empty cache ("another machine"):

- a byte flipped in a pack only the second snapshot uses;
- that pack deleted;
- the second snapshot's manifest (``2.json``) truncated;
- a byte flipped in a pack both snapshots use (a snapshot whose parent's chunks are bad is bad).

Each: ``snapstore verify`` and ``restore`` (eager and lazy) exit 177 and leave no process behind;
the first snapshot still restores with its memory intact; ``snapstore run`` falls back to it
(saying so) or, when it is bad too, exits 177.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MEMTASK, SnapEnv, Tasks, _base_env
from helpers import wait_for

from fusionfs.chunked import PACKS_PREFIX, ChunkEntry, decode_manifest, pack_key
from snapstore.errors import EXIT_CORRUPT

pytestmark = [pytest.mark.criu, pytest.mark.mount]

STORES = ["local", "moto", "s3rver"]
_MIB = 1 << 20


@dataclasses.dataclass
class Store:
    """Out-of-band access to the objects under the mount."""

    read: Callable[[str], bytes]
    write: Callable[[str, bytes], None]  # in place: same key; the local store keeps the mtime
    delete: Callable[[str], None]


def _local_store(base: Path) -> Store:
    def write(key: str, data: bytes) -> None:
        path = base / key
        st = path.stat()
        with open(path, "r+b") as f:  # in place: bit rot, not a new version
            f.write(data)
            f.truncate(len(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    return Store(lambda key: (base / key).read_bytes(), write, lambda key: (base / key).unlink())


def _bucket_store(client: Any, name: str) -> Store:
    def read(key: str) -> bytes:
        body: bytes = client.get_object(Bucket=name, Key=key)["Body"].read()
        return body

    def write(key: str, data: bytes) -> None:
        head = client.head_object(Bucket=name, Key=key)
        client.put_object(Bucket=name, Key=key, Body=data, Metadata=head.get("Metadata", {}))

    return Store(read, write, lambda key: client.delete_object(Bucket=name, Key=key))


@pytest.fixture(params=STORES)
def integ_env(
    request: pytest.FixtureRequest, tmp_path: Path, criu: str, fusion_mount: Any
) -> Iterator[tuple[SnapEnv, Store]]:
    env = _base_env()
    if request.param == "local":
        base = tmp_path / "store"
        base.mkdir()
        source = str(base)
        store = _local_store(base)
    else:
        from s3servers import bucket_on

        server = request.getfixturevalue("moto" if request.param == "moto" else "s3rver_server")
        with bucket_on(server) as bucket:
            state: dict[str, Any] = {"mount": fusion_mount(bucket.source, env=bucket.env)}
            env.update(bucket.env)
            yield _env(state, env), _bucket_store(bucket.client, bucket.name)
            return
    state = {"mount": fusion_mount(source)}
    yield _env(state, env), store


def _env(state: dict[str, Any], env: dict[str, str]) -> SnapEnv:
    path: Path = state["mount"].path
    (path / "work").mkdir()

    def move() -> None:
        state["mount"] = state["mount"].remount(fresh_cache=True)

    return SnapEnv("fusion", path / "snapshots", path / "work", env, move)


def _two_snapshots(env: SnapEnv, tasks: Tasks) -> tuple[int, set[bytes], set[bytes]]:
    """Snapshots 1 and 2 of task ``job`` (32 MiB of random memory, 10 % changed in between);
    returns the task's pid and the packs of each snapshot's pages."""
    task = tasks.start(mib=32)
    first = env.run("dump", str(task.pid), "--task", "job", "--leave-running")
    assert first.returncode == 0, first.stderr
    os.kill(task.pid, signal.SIGUSR2)
    wait_for((task.state / "changed").exists, 30, "the task to change 10 % of its memory")
    second = env.run("dump", str(task.pid), "--task", "job")
    assert second.returncode == 0, second.stderr
    assert task.proc is not None and task.proc.wait(20) == -signal.SIGKILL
    return task.pid, _packs_of(env, 1), _packs_of(env, 2)


def _packs_of(env: SnapEnv, n: int) -> set[bytes]:
    """Packs used by snapshot n's chunked files, from their manifests (read through the store
    the mount sits on: the mount itself shows the logical bytes)."""
    found: set[bytes] = set()
    for path in (env.root / "job" / str(n)).iterdir():
        data = _STORE_READ[0](f"snapshots/job/{n}/{path.name}")
        if data[:8] == b"\x89FSCHNK\n":
            found |= set(decode_manifest(data).packs())
    return found


def _chunks_of(env: SnapEnv, n: int) -> dict[bytes, ChunkEntry]:
    """The chunks of snapshot n's chunked files, by digest (as ``_packs_of``)."""
    found: dict[bytes, ChunkEntry] = {}
    for path in (env.root / "job" / str(n)).iterdir():
        data = _STORE_READ[0](f"snapshots/job/{n}/{path.name}")
        if data[:8] == b"\x89FSCHNK\n":
            found.update((e.digest, e) for e in decode_manifest(data).chunks)
    return found


_STORE_READ: list[Callable[[str], bytes]] = []


def _flip(store: Store, pack: bytes) -> None:
    key = pack_key(pack, PACKS_PREFIX)
    data = bytearray(store.read(key))
    data[len(data) // 2] ^= 0x01
    store.write(key, bytes(data))


def _flip_chunk(store: Store, entry: ChunkEntry) -> None:
    """Flip a byte inside one chunk's stored bytes (not just somewhere in its pack: a pack two
    snapshots share may hold chunks only one of them uses)."""
    key = pack_key(entry.pack, PACKS_PREFIX)
    data = bytearray(store.read(key))
    data[entry.offset + entry.stored // 2] ^= 0x01
    store.write(key, bytes(data))


def _no_process(pid: int) -> None:
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, f"no process {pid}")


def _lazy_daemons(root: Path) -> list[int]:
    """criu lazy-pages processes serving images under ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lazy-pages" in argv and any(str(root).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def _restore_fails_177(env: SnapEnv, pid: int, *args: str) -> str:
    for mode in ("--eager", "--lazy"):
        result = env.run("restore", "--task", "job", mode, *args, timeout=180)
        assert result.returncode == EXIT_CORRUPT, (mode, result.stdout, result.stderr)
        last = [ln for ln in result.stderr.splitlines() if ln.startswith("snapstore: error")]
        assert last, result.stderr
        _no_process(pid)
        # a lazy restore spawns its lazy-pages daemon before the check: a failed check stops it
        # (killed with what it forked: a probe killed inside a read of the mount ends when that
        # read returns, a moment later)
        wait_for(lambda: not _lazy_daemons(env.root), 10, f"no lazy-pages daemon left ({mode})")
    return result.stderr


def _restores_intact(env: SnapEnv, tasks: Tasks, pid: int, n: int) -> None:
    result = env.run("restore", "--task", "job", "--snapshot", str(n), "--detach")
    assert result.returncode == 0, result.stderr
    tasks.adopt(pid)
    verdict = tasks.started[0].verify()
    assert verdict["ok"], f"snapshot {n}: memory differs in blocks {verdict['bad_blocks']}"
    os.kill(pid, signal.SIGKILL)
    _no_process(pid)


@pytest.fixture
def setup(integ_env: tuple[SnapEnv, Store], tasks: Tasks) -> Iterator[tuple[SnapEnv, Store]]:
    env, store = integ_env
    _STORE_READ[:] = [store.read]
    yield env, store
    _STORE_READ.clear()


#: what the mount's daemon logs (WARNING) when a chunk read from a pack fails its hash: every
#: read of it, the fetch that retried it, and verify's finding
CORRUPT_CHUNK = ("does not match its BLAKE3 hash", "failed verification; fetching it again")


@pytest.mark.allow_logs(*CORRUPT_CHUNK)
@pytest.mark.timeout(400)
def test_flipped_byte_in_a_pack_of_the_latest_snapshot(
    setup: tuple[SnapEnv, Store], tasks: Tasks
) -> None:
    env, store = setup
    pid, one, two = _two_snapshots(env, tasks)
    own = sorted(two - one)
    assert own, "snapshot 2 wrote no pack of its own"
    _flip(store, own[0])
    env.move()

    stderr = _restore_fails_177(env, pid)
    assert "snapshot 2" in stderr and own[0].hex() in stderr, stderr

    quick = env.run("verify", "--task", "job", "--quick")
    assert quick.returncode == 0, quick.stderr  # quick: the pack is there, with its size
    full = env.run("verify", "--task", "job")
    assert full.returncode == EXIT_CORRUPT, full.stderr
    assert own[0].hex() in full.stderr and "corrupt" in full.stderr, full.stderr
    assert "MB" in full.stderr  # progress
    assert env.run("verify", "--task", "job", "--snapshot", "1").returncode == 0
    _restores_intact(env, tasks, pid, 1)


@pytest.mark.allow_logs("is missing from the store")  # verify's finding, per pack
@pytest.mark.timeout(400)
def test_deleted_pack(setup: tuple[SnapEnv, Store], tasks: Tasks) -> None:
    env, store = setup
    pid, one, two = _two_snapshots(env, tasks)
    own = sorted(two - one)
    store.delete(pack_key(own[0], PACKS_PREFIX))
    env.move()
    stderr = _restore_fails_177(env, pid)
    assert own[0].hex() in stderr and "missing" in stderr, stderr
    for args in ((), ("--quick",)):
        result = env.run("verify", "--task", "job", *args)
        assert result.returncode == EXIT_CORRUPT, result.stderr
        assert own[0].hex() in result.stderr and "missing" in result.stderr, result.stderr
    _restores_intact(env, tasks, pid, 1)


# on s3rver the manifest's CRC32C is in its metadata, which the truncating PUT keeps (Store.write
# copies it): the daemon sees a checksum mismatch (S-INTEG-2) and logs it
@pytest.mark.allow_logs(
    "does not match its stored CRC32C", "the object does not match its stored checksum"
)
@pytest.mark.timeout(400)
def test_truncated_manifest(setup: tuple[SnapEnv, Store], tasks: Tasks) -> None:
    env, store = setup
    pid, _, _ = _two_snapshots(env, tasks)
    data = store.read("snapshots/job/2.json")
    store.write("snapshots/job/2.json", data[: len(data) // 2])
    env.move()
    stderr = _restore_fails_177(env, pid)
    assert "2.json" in stderr, stderr
    result = env.run("verify", "--task", "job", "--quick")
    assert result.returncode == EXIT_CORRUPT, result.stderr
    assert "2.json" in result.stderr, result.stderr
    _restores_intact(env, tasks, pid, 1)


def _run(env: SnapEnv, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``snapstore run`` of task ``job`` (which has snapshots: COMMAND is never started);
    returns the process and the file its stderr goes to."""
    argv = [
        sys.executable,
        "-m",
        "snapstore",
        "run",
        "--task",
        "job",
        "--root",
        str(env.root),
        "--provider",
        "none",
        "--log-dir",
        str(env.work),
        *args,
        "--",
        sys.executable,
        str(MEMTASK),
        "--state",
        str(env.work / "unused"),
    ]
    err = env.work.parent.parent / f"run-{len(list(env.work.parent.parent.glob('run-*')))}.err"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            argv, env=env.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f
        )
    return proc, err


@pytest.mark.allow_logs(*CORRUPT_CHUNK)
@pytest.mark.timeout(400)
@pytest.mark.parametrize("integ_env", ["local", "moto"], indirect=True)
@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_run_falls_back_to_the_previous_snapshot(
    setup: tuple[SnapEnv, Store], tasks: Tasks, mode: str
) -> None:
    env, store = setup
    pid, one, two = _two_snapshots(env, tasks)
    _flip(store, sorted(two - one)[0])
    env.move()
    line, err = _run(env, mode)
    try:
        tasks.adopt(pid)

        def fell_back() -> bool:
            text = err.read_text()
            assert line.poll() is None, text
            return "restored snapshot 1" in text

        wait_for(fell_back, 180, "run to fall back to snapshot 1")
        assert "falling back to snapshot 1" in err.read_text()
        verdict = tasks.started[0].verify()
        assert verdict["ok"], f"memory differs in blocks {verdict['bad_blocks']}"
        os.kill(pid, signal.SIGKILL)
        line.wait(60)
    finally:
        if line.poll() is None:
            line.kill()
            line.wait()
    assert line.returncode == 128 + signal.SIGKILL, err.read_text()
    assert "snapshot 2 of 'job' is damaged" in err.read_text()


@pytest.mark.allow_logs(*CORRUPT_CHUNK)
@pytest.mark.timeout(400)
@pytest.mark.parametrize("integ_env", ["local"], indirect=True)
def test_bad_parent_chunk_makes_both_snapshots_bad(
    setup: tuple[SnapEnv, Store], tasks: Tasks
) -> None:
    env, store = setup
    pid, one, two = _two_snapshots(env, tasks)
    assert one & two, "snapshot 2 reused no pack of snapshot 1"
    first, second = _chunks_of(env, 1), _chunks_of(env, 2)
    shared = sorted(d for d in first.keys() & second.keys() if first[d] == second[d])
    assert shared, "snapshot 2 reused no chunk of snapshot 1 where it lies"
    _flip_chunk(store, second[shared[0]])
    env.move()
    line, err = _run(env, "--eager")
    try:
        line.wait(300)
    finally:
        if line.poll() is None:  # never leave it running (seen under a doubly loaded machine)
            line.kill()
            line.wait()
    assert line.returncode == EXIT_CORRUPT, err.read_text()
    assert "falling back to snapshot 1" in err.read_text()
    assert "snapshot 1 of 'job' is damaged" in err.read_text()
    _no_process(pid)
    for n in ("1", "2"):
        result = env.run("verify", "--task", "job", "--snapshot", n)
        assert result.returncode == EXIT_CORRUPT, result.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("integ_env", ["moto"], indirect=True)
def test_flipped_byte_in_a_small_image_file(setup: tuple[SnapEnv, Store], tasks: Tasks) -> None:
    """CRIU's small images are plain objects: the digest the manifest records catches a flip
    before CRIU starts, even by the quick check."""
    env, store = setup
    pid, _, _ = _two_snapshots(env, tasks)
    key = f"snapshots/job/2/core-{pid}.img"
    data = bytearray(store.read(key))
    data[len(data) // 2] ^= 0x01
    store.write(key, bytes(data))
    env.move()
    stderr = _restore_fails_177(env, pid)
    assert f"core-{pid}.img does not match its digest" in stderr, stderr
    quick = env.run("verify", "--task", "job", "--quick")
    assert quick.returncode == EXIT_CORRUPT, quick.stderr
    _restores_intact(env, tasks, pid, 1)


@pytest.mark.timeout(120)
def test_verify_on_a_plain_directory_and_usage(dir_env: SnapEnv, tasks: Tasks) -> None:
    """Without fusionfs (the testing aid) every file has a BLAKE3 digest: verify reads them."""
    task = tasks.start(mib=8)
    assert dir_env.run("dump", str(task.pid), "--task", "job").returncode == 0
    good = dir_env.run("verify", "--task", "job", "--json")
    assert good.returncode == 0, good.stderr
    assert '"files"' in good.stdout and "verified" in good.stderr
    pages = next((dir_env.root / "job" / "1").glob("pages-*.img"))
    data = bytearray(pages.read_bytes())
    data[len(data) // 3] ^= 0x80
    pages.write_bytes(bytes(data))
    assert dir_env.run("verify", "--task", "job", "--quick").returncode == 0  # sizes only
    bad = dir_env.run("verify", "--task", "job")
    assert bad.returncode == EXIT_CORRUPT, bad.stderr
    assert pages.name in bad.stderr and "Traceback" not in bad.stderr
    for args in (("--task", "nope"), ("--task", "job", "--snapshot", "7"), ("--task", "a/b")):
        result = dir_env.run("verify", *args)
        assert result.returncode == 2, (args, result.stderr)
