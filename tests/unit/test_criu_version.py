"""snapstore's CRIU check (``criu --version``) runs once per binary and can start early
(``prefetch``), so a command's start-up does not wait for a process start it could overlap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapstore import criu
from snapstore.errors import CriuUnavailable


def _fake_criu(path: Path, version: str, log: Path) -> Path:
    path.write_text(f'#!/bin/sh\necho run >> "{log}"\necho "Version: {version}"\n')
    path.chmod(0o755)
    return path


def test_the_version_is_checked_once_per_binary(tmp_path: Path) -> None:
    log = tmp_path / "runs"
    exe = _fake_criu(tmp_path / "criu", "4.1", log)
    first = criu._check(exe, "test")
    assert isinstance(first, criu.Criu) and first.version == "4.1"
    assert criu._check(exe, "test") == first
    assert log.read_text().count("run") == 1
    # a binary changed on disk is checked again (and refused if too old)
    _fake_criu(exe, "3.19", log)
    os.utime(exe, ns=(1, 1))
    assert "older than 4.0" in str(criu._check(exe, "test"))
    assert log.read_text().count("run") == 2


def test_prefetch_checks_the_criu_find_criu_then_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "runs"
    exe = _fake_criu(tmp_path / "criu", "4.2", log)
    monkeypatch.setenv("CRIU", str(exe))
    criu.prefetch().join(10)
    assert log.read_text().count("run") == 1
    found = criu.find_criu()
    assert found.path == exe and found.version == "4.2"
    assert log.read_text().count("run") == 1  # no second process


def test_likely_criu_names_the_binary_before_its_check_and_the_check_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore starts ``criu lazy-pages`` with ``likely_criu`` while the version check
    runs: it must name the binary ``find_criu`` checks first, without running it."""
    log = tmp_path / "runs"
    exe = _fake_criu(tmp_path / "criu", "4.3", log)
    monkeypatch.setenv("CRIU", str(exe))
    likely = criu.likely_criu()
    assert likely is not None and likely.path == exe and likely.version == "unchecked"
    assert not log.exists()  # not run
    assert criu.find_criu().version == "4.3"
    assert criu.likely_criu() == criu.Criu(exe, "4.3")  # once checked, the checked answer
    # no $CRIU: the first criu on PATH, then the default install
    monkeypatch.delenv("CRIU")
    monkeypatch.setenv("PATH", str(tmp_path))
    likely = criu.likely_criu()
    assert likely is not None and likely.path == exe
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setattr(criu, "DEFAULT_PREFIX_CRIU", tmp_path / "none" / "criu")
    assert criu.likely_criu() is None
    with pytest.raises(CriuUnavailable, match="no criu on PATH"):
        criu.find_criu()
