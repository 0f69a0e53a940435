"""snapstore's catalog (commit rule, numbering, removal) and CRIU helpers, without CRIU."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from snapstore.catalog import Catalog, ImageFile, Manifest, validate_task_id
from snapstore.criu import log_excerpt, read_stats
from snapstore.errors import SnapshotCorrupt, SnapstoreError, UsageError


def _manifest(task: str, n: int, files: list[ImageFile] | None = None) -> Manifest:
    files = files if files is not None else [ImageFile("pages-1.img", 4096)]
    return Manifest(
        task=task, snapshot=n, created="2025-01-01T00:00:00.000+00:00", host="h", pid=42,
        pids=[42], tids=[42, 43], command=["x"], criu_version="4.1.1", kernel="k",
        arch="x86_64", options={"leave_running": False}, files=files,
        total_bytes=sum(f.size for f in files), timings={"total_s": 1.5},
        criu_stats={"pages_written": 1},
    )  # fmt: skip


def test_commit_is_the_manifest_and_latest_is_the_highest_committed(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    assert catalog.reserve("job") == 1
    assert catalog.committed("job") == [] and catalog.latest("job") is None
    catalog.commit(_manifest("job", 1))
    assert catalog.reserve("job") == 2  # a dump that then fails: dir 2, no manifest
    assert catalog.committed("job") == [1]
    assert catalog.uncommitted("job") == [2]
    assert catalog.latest("job") == 1
    assert catalog.resolve("job", None) == 1
    with pytest.raises(UsageError, match="never committed"):
        catalog.resolve("job", 2)
    assert catalog.reserve("job") == 3  # never reuses the half dir 2
    catalog.commit(_manifest("job", 3))
    assert catalog.latest("job") == 3
    loaded = catalog.load("job", 3)
    assert loaded == _manifest("job", 3)
    assert not [p for p in (tmp_path / "job").iterdir() if p.name.startswith(".")]


def test_numbering_counts_orphan_manifests_and_dirs(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "7.json").write_text(_manifest("job", 7).to_json())
    (tmp_path / "job" / "9").mkdir()
    (tmp_path / "job" / "notanumber").mkdir()
    assert catalog.reserve("job") == 10


def test_remove_one_then_the_task(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    for n in (1, 2):
        catalog.reserve("job")
        (catalog.images_dir("job", n) / "pages-1.img").write_bytes(b"x" * 4096)
        catalog.commit(_manifest("job", n))
    catalog.reserve("job")  # uncommitted 3
    assert catalog.remove("job", 1) == [1]
    assert catalog.committed("job") == [2]
    assert not catalog.images_dir("job", 1).exists()
    with pytest.raises(UsageError, match="no snapshot 1"):
        catalog.remove("job", 1)
    assert catalog.remove("job", None) == [2, 3]
    assert not (tmp_path / "job").exists()
    assert catalog.tasks() == []


def test_corrupt_or_mismatched_manifest_is_an_error_not_a_crash(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    catalog.reserve("job")
    catalog.manifest_path("job", 1).write_text("{not json")
    with pytest.raises(SnapshotCorrupt, match=r"is damaged: its manifest .* is not valid"):
        catalog.load("job", 1)
    catalog.manifest_path("job", 1).write_text(_manifest("other", 1).to_json())
    with pytest.raises(SnapshotCorrupt, match="names task 'other'"):
        catalog.load("job", 1)


def test_manifest_digest_catches_a_changed_field_and_format_1_still_loads(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    catalog.reserve("job")
    text = _manifest("job", 1).to_json()
    data = json.loads(text)
    assert data["format"] == 2 and data["digest"].startswith("blake3:")
    path = catalog.manifest_path("job", 1)
    path.write_text(text.replace('"pid": ', '"pid": 1', 1))  # one field changed, still JSON
    with pytest.raises(SnapshotCorrupt, match="digest does not match"):
        catalog.load("job", 1)
    path.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(SnapshotCorrupt, match="is not valid"):
        catalog.load("job", 1)
    old = {k: v for k, v in data.items() if k != "digest"}
    old["format"] = 1
    path.write_text(json.dumps(old))  # written before digests: sizes only
    assert catalog.load("job", 1).files == _manifest("job", 1).files
    old["format"] = 3
    path.write_text(json.dumps(old))
    with pytest.raises(SnapstoreError, match="unsupported manifest format 3") as info:
        catalog.load("job", 1)
    assert not isinstance(info.value, SnapshotCorrupt)


@pytest.mark.parametrize("bad", ["", ".hidden", "-x", "a/b", "..", "x" * 129, "a b"])
def test_invalid_task_ids(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid task id"):
        validate_task_id(bad)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_read_stats_decodes_criu_stats_dump(tmp_path: Path) -> None:
    dump = b"".join(
        _varint(field << 3) + _varint(value)
        for field, value in ((1, 382), (2, 640303), (3, 594135), (4, 558747), (7, 67263))
    )
    body = _varint(1 << 3 | 2) + _varint(len(dump)) + dump
    path = tmp_path / "stats-dump"
    path.write_bytes(struct.pack("<III", 0x55105940, 0x57093306, len(body)) + body)
    stats = read_stats(path)
    assert stats["freezing_time_us"] == 382
    assert stats["frozen_time_us"] == 640303
    assert stats["memwrite_time_us"] == 558747
    assert stats["pages_written"] == 67263
    assert read_stats(tmp_path / "missing") == {}
    (tmp_path / "junk").write_bytes(b"\x00" * 5)
    assert read_stats(tmp_path / "junk") == {}


def test_log_excerpt_shows_errors_without_the_harmless_rlimit_line(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.01) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n"
        "(00.02) info line\n"
        "(00.06) Error (criu/pstree.c:300): The root process 7 is not a session leader.\n"
        "(00.07) Error (criu/cr-dump.c:2111): Dumping FAILED.\n"
    )
    assert log_excerpt(log) == [
        "(00.06) Error (criu/pstree.c:300): The root process 7 is not a session leader.",
        "(00.07) Error (criu/cr-dump.c:2111): Dumping FAILED.",
    ]


def test_log_excerpt_keeps_the_first_error_when_warnings_and_errors_crowd_it(
    tmp_path: Path,
) -> None:
    log = tmp_path / "dump.log"
    lines = ["(00.01) Warn  (compel/infect.c:418): Will restore 9 with interrupted system call"]
    lines.append("(00.02) Error (criu/pstree.c:300): The root process 7 is not a session leader.")
    lines += [f"(00.03) Warn  (criu/x.c:1): thread {n} left running" for n in range(30)]
    lines += [f"(00.04) Error (criu/y.c:2): cascade {n}" for n in range(30)]
    log.write_text("\n".join(lines) + "\n")
    excerpt = log_excerpt(log, limit=5)
    assert excerpt[0].endswith("is not a session leader.")
    assert len(excerpt) == 5 and all("Error (" in ln for ln in excerpt)


def test_log_excerpt_without_errors_shows_the_last_warnings_then_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("(1) Warn  (a.c:1): first\n(2) info\n(3) Warn  (b.c:2): second\n")
    assert log_excerpt(log) == ["(1) Warn  (a.c:1): first", "(3) Warn  (b.c:2): second"]
    log.write_text("(1) one\n(2) two\n")
    assert log_excerpt(log, limit=1) == ["(2) two"]
