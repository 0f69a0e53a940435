"""Random plans of concurrent file work, and the in-memory model they are checked against.

Shared by the core's model test (``tests/fs/test_staging_model.py``) and the real mount's
(``tests/mount/test_concurrent_writes.py``). A plan starts from a few files of random size and
runs phases, one after another:

- ``Writes``: several workers write into one file at once, each through its own descriptor, each
  a random set of byte ranges that no other worker touches in that phase (so the outcome does not
  depend on the interleaving, and the model is exact): 1-byte writes, writes straddling chunk
  boundaries, multi-MiB writes, ranges past the end (an append, or a gap the file is extended
  over), in random order, with fsyncs in between. The descriptors close at the end of the phase.
- ``Truncate``, ``Rename``: one call, between phases.
- ``Remount``: everything closed, a fresh filesystem with an empty cache reads the files back.

After every phase every file must read back as the model says, through the filesystem and in
the store.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence

from hypothesis import strategies as st

__all__ = [
    "FILES",
    "Model",
    "Piece",
    "Plan",
    "Remount",
    "Rename",
    "Truncate",
    "Writes",
    "by_worker",
    "payload",
    "plans",
    "requests",
]

FILES = ("f0", "f1")


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclasses.dataclass(frozen=True)
class Piece:
    worker: int
    off: int
    length: int
    seed: int
    fsync_after: bool

    def data(self) -> bytes:
        return payload(self.seed, self.length)


@dataclasses.dataclass(frozen=True)
class Writes:
    name: str
    workers: int
    pieces: tuple[Piece, ...]  # in each worker's order (a worker's own pieces keep this order)
    read_write: bool  # O_RDWR instead of O_WRONLY


@dataclasses.dataclass(frozen=True)
class Truncate:
    name: str
    size: int


@dataclasses.dataclass(frozen=True)
class Rename:
    src: str
    dst: str


@dataclasses.dataclass(frozen=True)
class Remount:
    pass


Phase = Writes | Truncate | Rename | Remount


@dataclasses.dataclass(frozen=True)
class Plan:
    initial: tuple[tuple[str, int, int], ...]  # (name, size, seed)
    phases: tuple[Phase, ...]


class Model:
    """What every file holds."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}

    def write(self, name: str, off: int, data: bytes) -> None:
        buf = self.files[name]
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = data

    def truncate(self, name: str, size: int) -> None:
        buf = self.files[name]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    def rename(self, src: str, dst: str) -> None:
        self.files[dst] = self.files.pop(src)

    def apply(self, phase: Phase) -> None:
        if isinstance(phase, Writes):
            for p in phase.pieces:
                self.write(phase.name, p.off, p.data())
        elif isinstance(phase, Truncate):
            self.truncate(phase.name, phase.size)
        elif isinstance(phase, Rename):
            self.rename(phase.src, phase.dst)


def _cuts(draw: st.DrawFn, limit: int, chunk: int) -> list[int]:
    """Sorted distinct offsets in (0, limit): near chunk boundaries, and anywhere."""
    n = draw(st.integers(2, 12))
    near = st.builds(
        lambda k, d: max(1, min(limit - 1, k * chunk + d)),
        st.integers(1, max(1, limit // chunk)),
        st.integers(-3, 3),
    )
    anywhere = st.integers(1, max(1, limit - 1))
    return sorted(set(draw(st.lists(st.one_of(near, anywhere), min_size=n, max_size=n))))


@st.composite
def plans(
    draw: st.DrawFn, *, max_size: int, chunk: int, workers: int = 3, max_phases: int = 6
) -> Plan:
    """Plans over ``FILES`` whose files stay under about ``max_size`` bytes."""
    sizes: dict[str, int] = {}
    initial = []
    for name in FILES:
        size = draw(st.one_of(st.integers(0, 3 * chunk), st.integers(0, max_size)))
        initial.append((name, size, draw(st.integers(0, 1 << 30))))
        sizes[name] = size
    phases: list[Phase] = []
    for _ in range(draw(st.integers(1, max_phases))):
        kind = draw(
            st.sampled_from(["writes", "writes", "writes", "truncate", "rename", "remount"])
        )
        names = sorted(sizes)
        if kind == "writes":
            name = draw(st.sampled_from(names))
            limit = max(2, min(max_size, sizes[name] + draw(st.integers(0, 2 * chunk + 7))))
            bounds = [0, *_cuts(draw, limit, chunk), limit]
            segments = list(itertools.pairwise(bounds))
            chosen = draw(
                st.lists(
                    st.sampled_from(range(len(segments))),
                    unique=True,
                    min_size=1,
                    max_size=len(segments),
                )
            )
            n_workers = draw(st.integers(1, workers))
            pieces = []
            for i in chosen:
                lo, hi = segments[i]
                pieces.append(
                    Piece(
                        draw(st.integers(0, n_workers - 1)),
                        lo,
                        hi - lo,
                        draw(st.integers(0, 1 << 30)),
                        draw(st.booleans()),
                    )
                )
            phases.append(Writes(name, n_workers, tuple(pieces), draw(st.booleans())))
            sizes[name] = max(sizes[name], *(p.off + p.length for p in pieces))
        elif kind == "truncate":
            name = draw(st.sampled_from(names))
            size = draw(st.one_of(st.integers(0, sizes[name] + chunk), st.integers(0, max_size)))
            phases.append(Truncate(name, size))
            sizes[name] = size
        elif kind == "rename":
            src = draw(st.sampled_from(names))
            dst = draw(st.sampled_from([*FILES, "g"]))
            if dst != src:
                phases.append(Rename(src, dst))
                sizes[dst] = sizes.pop(src)
        else:
            phases.append(Remount())
    return Plan(tuple(initial), tuple(phases))


def by_worker(phase: Writes) -> list[list[Piece]]:
    out: list[list[Piece]] = [[] for _ in range(phase.workers)]
    for p in phase.pieces:
        out[p.worker].append(p)
    return out


def requests(piece: Piece, max_request: int) -> Sequence[tuple[int, bytes]]:
    """The piece as the kernel would send it: requests of at most ``max_request`` bytes."""
    data = piece.data()
    return [(piece.off + i, data[i : i + max_request]) for i in range(0, len(data), max_request)]
