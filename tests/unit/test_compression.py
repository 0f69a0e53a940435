"""The chunk encoder's zstd settings (fusionfs.chunked.codec, level 1): a narrow match finder,
chosen because a checkpoint on a small machine is CPU-bound (issue 19). Its frames stay plain
zstd."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import zstandard

from fusionfs.chunked import codec

_MEMTASK = Path(__file__).resolve().parent.parent / "snap" / "memtask.py"


def _fastq(mib: int) -> bytes:
    pytest.importorskip("numpy")
    spec = importlib.util.spec_from_file_location("memtask", _MEMTASK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fastq = module._Fastq()
    return b"".join(fastq.block(3, i) for i in range(mib))


def test_level_1_trades_a_few_percent_of_ratio_for_a_narrow_match_finder() -> None:
    data = _fastq(2)
    chunk = 128 << 10
    plain = zstandard.ZstdCompressor(level=1)
    ours = sum(len(codec.encode_chunk(data[o : o + chunk], 1)) for o in range(0, len(data), chunk))
    reference = sum(len(plain.compress(data[o : o + chunk])) for o in range(0, len(data), chunk))
    # the narrow table finds fewer of the (rare) matches: a little bigger, never much
    assert reference < ours <= reference * 1.10
    assert len(data) / ours >= 2.6  # still about 3x on sequencing-like memory


def test_level_1_frames_are_plain_zstd_with_their_size() -> None:
    data = _fastq(1)[: 200 << 10]
    frame = codec.encode_chunk(data, 1)
    assert isinstance(frame, bytes) and len(frame) < len(data)
    assert zstandard.get_frame_parameters(frame).content_size == len(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    other = codec.encode_chunk(data, 3)  # other levels are zstd's own
    assert other == zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
