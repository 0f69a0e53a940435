"""The memory the snap benchmark's task holds, generated in-process for the ceiling row.

``tests/snap/memtask.py`` (the task) is a script, not a module of the package; this loads it by
path so that the benchmark compresses exactly the bytes the task holds (``--memory random`` or
``fastq``) without a second copy of the generator.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["memory_sample"]

_MEMTASK = Path(__file__).resolve().parent.parent / "tests" / "snap" / "memtask.py"
_module: ModuleType | None = None


def _memtask() -> ModuleType:
    global _module
    if _module is None:
        spec = importlib.util.spec_from_file_location("_bench_memtask", _MEMTASK)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {_MEMTASK}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _module = module
    return _module


def memory_sample(content: str, seed: int, mib: int) -> bytes:
    """The first ``mib`` MiB of what ``memtask.py --content CONTENT --seed SEED`` holds."""
    task = _memtask()
    block = task._Fastq().block if content == "fastq" else task._random_block
    return b"".join(block(seed, i) for i in range(mib))
