"""``snapstore._warm``: the restore command's walk of its path while it imports. It must find
what the catalog finds (the layout is stated twice), hand over only what it was asked for, and
never fail or hang a restore it cannot help."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusionfs import xattrs
from snapstore import _warm
from snapstore.catalog import Catalog, ImageFile, Manifest


@pytest.fixture(autouse=True)
def _no_warm_left() -> Iterator[None]:
    _warm._warmed = None
    _warm.imported.set()  # as the command does once its imports are done
    yield
    _warm._warmed = None


def _manifest(task: str, n: int, files: list[ImageFile]) -> Manifest:
    return Manifest(
        task=task, snapshot=n, created="2026-01-01T00:00:00.000+00:00", host="h", pid=42,
        pids=[42], tids=[42], command=["x"], criu_version="4.1.1", kernel="k", arch="x86_64",
        options={}, files=files, total_bytes=sum(f.size for f in files), timings={},
        criu_stats={},
    )  # fmt: skip


def _commit(catalog: Catalog, task: str, files: list[ImageFile]) -> int:
    n = catalog.reserve(task)
    for f in files:
        (catalog.images_dir(task, n) / f.name).write_bytes(b"x" * f.size)
    catalog.commit(_manifest(task, n, files))
    return n


def _warm_up(argv: list[str]) -> None:
    thread = _warm.start(argv)
    assert thread is not None
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_it_finds_the_snapshot_the_catalog_resolves(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    files = [ImageFile("core-1.img", 10, "blake3:00"), ImageFile("pages-1.img", 30, "blake3:11")]
    for _ in range(3):
        _commit(catalog, "job", files)
    catalog.reserve("job")  # 4: a dump that failed, no manifest
    for decoy in ("012.json", "5.json.tmp", "x.json", "12345678901.json", "\u00b2.json"):
        (tmp_path / "job" / decoy).write_text("{}")
    latest = catalog.resolve("job", None)
    assert latest == 3
    _warm_up(["--task", "job", "--root", str(tmp_path), "--lazy"])
    assert _warm.latest(str(tmp_path), "job") == latest
    assert _warm.latest(str(tmp_path), "other") is None  # only what it was asked
    assert _warm.covers(str(catalog.images_dir("job", latest)))
    assert not _warm.covers(str(catalog.images_dir("job", 2)))
    # no chunked files: nothing checked ahead, and no wait for it
    started = time.monotonic()
    assert _warm.checked(str(catalog.images_dir("job", latest) / "pages-1.img")) is None
    assert time.monotonic() - started < 1


def test_an_explicit_snapshot_is_warmed_and_latest_is_left_to_the_catalog(
    tmp_path: Path,
) -> None:
    catalog = Catalog(tmp_path)
    for _ in range(2):
        _commit(catalog, "job", [ImageFile("core-1.img", 10, "blake3:00")])
    _warm_up([f"--root={tmp_path}", "--snapshot", "1", "--task=job"])
    assert _warm.latest(str(tmp_path), "job") is None
    assert _warm.covers(str(catalog.images_dir("job", 1)))
    assert not _warm.covers(str(catalog.images_dir("job", 2)))


def _fake_hook(monkeypatch: pytest.MonkeyPatch, asked: list[tuple[str, bytes]]) -> None:
    """fusionfs's verify hook as the warm-up calls it: setxattr, then getxattr (JSON)."""

    def setxattr(path: str, name: str, value: bytes) -> None:
        assert name == xattrs.VERIFY
        asked.append((os.path.basename(path), value))
        if path.endswith("pages-2.img"):
            raise OSError(95, "Operation not supported")  # then the quick check asks itself

    def getxattr(path: str, name: str) -> bytes:
        assert name == xattrs.VERIFY
        return json.dumps({"ok": True, "path": path}).encode()

    monkeypatch.setattr(os, "setxattr", setxattr)
    monkeypatch.setattr(os, "getxattr", getxattr)


def test_chunked_files_are_checked_ahead_and_the_answer_handed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, bytes]] = []
    catalog = Catalog(tmp_path)
    files = [
        ImageFile("core-1.img", 10, "blake3:00"),
        ImageFile("pages-1.img", 30, "chunked:aa"),
        ImageFile("pages-2.img", 20, "chunked:bb"),
    ]
    n = _commit(catalog, "job", files)
    images = catalog.images_dir("job", n)
    _fake_hook(monkeypatch, asked)
    _warm_up(["--task", "job", "--root", str(tmp_path)])
    one = _warm.checked(str(images / "pages-1.img"))
    assert one == {"ok": True, "path": str(images / "pages-1.img")}
    assert _warm.checked(str(images / "pages-2.img")) is None
    assert _warm.checked(str(images / "core-1.img")) is None  # not chunked: never asked
    assert sorted(asked) == [("pages-1.img", b"quick"), ("pages-2.img", b"quick")]


def test_a_damaged_manifest_starts_no_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, bytes]] = []
    catalog = Catalog(tmp_path)
    n = _commit(catalog, "job", [ImageFile("pages-1.img", 30, "chunked:aa")])
    catalog.manifest_path("job", n).write_text(json.dumps({"files": "not a list"}))
    _fake_hook(monkeypatch, asked)
    _warm_up(["--task", "job", "--root", str(tmp_path)])
    assert _warm.checked(str(catalog.images_dir("job", n) / "pages-1.img")) is None
    assert asked == []


def test_nothing_to_warm_is_silent_and_quick(tmp_path: Path) -> None:
    _warm_up(["--task", "nosuch", "--root", str(tmp_path)])
    started = time.monotonic()
    assert _warm.latest(str(tmp_path), "nosuch") is None
    assert _warm.checked(str(tmp_path / "nosuch" / "1" / "pages-1.img")) is None
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--task", "job", "--root", "/r"], ("/r", "job", None)),
        (["--task=job", "--root=/r", "--snapshot=7"], ("/r", "job", 7)),
        (["--root", "/a", "--task", "job", "--root", "/b"], ("/b", "job", None)),  # the last
        (["--task", "-bad", "--root", "/r"], None),
        (["--task", ".hidden", "--root", "/r"], None),
        (["--task", "a/b", "--root", "/r"], None),
        (["--task", "x" * 129, "--root", "/r"], None),
        (["--task", "job", "--root", "/r", "--snapshot", "0"], None),
        (["--task", "job", "--root", "/r", "--snapshot", "one"], None),
        (["--task", "job", "--root", "/r", "--snapshot", "\u00b2"], None),  # isdigit() says yes
        (["--root", "/r"], None),
        (["--task", "job", "--root", "/r", "--", "tool", "--task", "x"], ("/r", "job", None)),
        (["--task"], None),
    ],
)
def test_the_command_line_it_reads(
    argv: list[str], expected: tuple[str, str, int | None] | None
) -> None:
    assert _warm.restore_target(argv) == expected


def test_the_root_defaults_like_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from snapstore import root

    monkeypatch.setenv(root.ROOT_ENV, "/from/env")
    assert _warm.restore_target(["--task", "job"]) == ("/from/env", "job", None)
    monkeypatch.delenv(root.ROOT_ENV)
    assert _warm.restore_target(["--task", "job"]) == (str(root.DEFAULT_ROOT), "job", None)


def test_no_check_begins_before_the_command_has_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks parse with json: imported in this thread while the command imports in its
    own, a module can come back half initialized (a lock cycle between them)."""
    asked: list[tuple[str, bytes]] = []
    catalog = Catalog(tmp_path)
    n = _commit(catalog, "job", [ImageFile("pages-1.img", 30, "chunked:aa")])
    path = str(catalog.images_dir("job", n) / "pages-1.img")
    _fake_hook(monkeypatch, asked)
    _warm.imported.clear()
    _warm_up(["--task", "job", "--root", str(tmp_path)])  # the walk is over; the check waits
    assert asked == []
    assert _warm._warmed is not None and not _warm._warmed.checks_known.is_set()
    _warm.imported.set()
    assert _warm.checked(path) == {"ok": True, "path": path}
    assert asked == [("pages-1.img", b"quick")]


def test_the_hook_it_calls_is_fusionfs_verify() -> None:
    assert _warm._VERIFY_XATTR == xattrs.VERIFY
