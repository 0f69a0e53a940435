"""The benchmark task's sequencing-like memory (tests/snap/memtask.py ``--content fastq``): every
page distinct, about 3x with zstd, the same bytes for the same seed (restores are checked
against a regeneration), and the script's own check accepts it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import zstandard

from tests.helpers import wait_for

_MEMTASK = Path(__file__).resolve().parent.parent / "snap" / "memtask.py"
_PAGE = 4096


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("memtask", _MEMTASK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastq_memory_is_distinct_pages_that_compress_about_3x() -> None:
    pytest.importorskip("numpy")
    fastq = _load()._Fastq()
    data = b"".join(fastq.block(7, i) for i in range(8))  # 8 MiB
    assert len(data) == 8 << 20
    pages = {data[o : o + _PAGE] for o in range(0, len(data), _PAGE)}
    assert len(pages) == len(data) // _PAGE, "a page repeats another"
    comp = zstandard.ZstdCompressor(level=1)
    stored = sum(
        len(comp.compress(data[o : o + (128 << 10)])) for o in range(0, len(data), 128 << 10)
    )
    assert 2.6 <= len(data) / stored <= 3.4
    records = data[: 2 * fastq.REC].split(b"\n")
    assert records[0].startswith(b"@SRR8512345.00000000000 ")
    assert set(records[1]) <= set(b"ACGT") and len(records[1]) == 100
    assert records[2] == b"+" and len(records[3]) == 100
    assert fastq.block(7, 3) == data[3 << 20 : 4 << 20]  # the same seed gives the same bytes
    assert fastq.block(8, 3) != data[3 << 20 : 4 << 20]


@pytest.mark.timeout(60)
def test_memtask_verifies_its_fastq_memory(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    argv = [sys.executable, str(_MEMTASK), "--state", str(tmp_path), "--mib", "16"]
    proc = subprocess.Popen([*argv, "--content", "fastq"], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), 30, "memtask ready")
        os.kill(proc.pid, signal.SIGUSR2)  # the incremental benchmark's 10 % rewrite
        wait_for(lambda: (tmp_path / "changed").exists(), 30, "memtask changed")
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: (tmp_path / "verify.json").exists(), 30, "memtask verified")
        assert json.loads((tmp_path / "verify.json").read_text())["ok"] is True
    finally:
        proc.kill()
        proc.wait(10)
