"""Full-object checksums (S3's flexible checksums) of object bodies: what a store reports, and
how to compute and combine them.

A ``Checksum`` is the CRC of an object's whole body, as S3 reports it for a single PUT or for a
multipart upload of type ``FULL_OBJECT`` (``x-amz-checksum-crc32c`` etc., base64 of the
big-endian value). A ``COMPOSITE`` multipart checksum (a checksum of the parts' checksums,
``"...-N"``) cannot be checked without the part boundaries and is never turned into one.

The CRCs come from ``awscrt`` (the AWS common runtime, which botocore itself uses for CRC32C and
CRC64NVME): hardware-accelerated, the GIL released, and with ``combine_*`` functions, so chunks
can be checksummed apart, in worker threads, and combined in order afterwards without a second
pass over the bytes (see ``docs/design/cache.md``, "What each check catches").

Caveat: a CRC catches accidental corruption (bit flips, torn or misplaced bytes), not forgery.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from awscrt import checksums as _crt

__all__ = [
    "ALGORITHMS",
    "UPLOAD_ALGORITHM",
    "Checksum",
    "combine",
    "compute",
    "compute_all",
    "decode",
    "encode",
    "from_headers",
]

#: Algorithm names as S3 spells them (``ChecksumCRC32C``), with the function computing it
#: (``fn(data, previous)``), the one combining two (``fn(crc_a, crc_b, len_b)``) and the width.
_FUNCS: Final[
    dict[str, tuple[Callable[[bytes | memoryview, int], int], Callable[[int, int, int], int], int]]
] = {
    "CRC32C": (_crt.crc32c, _crt.combine_crc32c, 4),
    "CRC64NVME": (_crt.crc64nvme, _crt.combine_crc64nvme, 8),
    "CRC32": (_crt.crc32, _crt.combine_crc32, 4),
}
ALGORITHMS: Final = tuple(_FUNCS)
#: What fusionfs sends with its uploads: the fastest of the three here (0.11-0.24 s per GiB on
#: this project's 2-core machines, CRC64NVME 0.2-0.47 s; see docs/design/cache.md).
UPLOAD_ALGORITHM: Final = "CRC32C"


@dataclasses.dataclass(frozen=True, slots=True)
class Checksum:
    """The full-object checksum of one object version."""

    algorithm: str  # one of ALGORITHMS
    value: int
    source: str = "server"  # "server" (the store reported it) or "metadata" (recorded at upload)

    def b64(self) -> str:
        return encode(self.algorithm, self.value)


def compute(algorithm: str, data: bytes | memoryview, previous: int = 0) -> int:
    """The CRC ``algorithm`` of ``data`` (continuing ``previous``)."""
    return _FUNCS[algorithm][0](data, previous)


def compute_all(algorithm: str, pieces: Iterable[bytes | memoryview]) -> int:
    crc = 0
    fn = _FUNCS[algorithm][0]
    for piece in pieces:
        crc = fn(piece, crc)
    return crc


def combine(algorithm: str, crc_a: int, crc_b: int, len_b: int) -> int:
    """The CRC of ``A || B`` from the CRCs of ``A`` and ``B`` and the length of ``B``."""
    return _FUNCS[algorithm][1](crc_a, crc_b, len_b)


def encode(algorithm: str, value: int) -> str:
    """S3's wire form: base64 of the big-endian value."""
    return base64.b64encode(value.to_bytes(_FUNCS[algorithm][2], "big")).decode("ascii")


def decode(algorithm: str, text: str) -> int | None:
    """The value of S3's wire form, or None if ``text`` is not one (a composite ``...-N``)."""
    if algorithm not in _FUNCS or "-" in text:
        return None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        return None
    if len(raw) != _FUNCS[algorithm][2]:
        return None
    return int.from_bytes(raw, "big")


def from_headers(resp: Mapping[str, object]) -> Checksum | None:
    """The full-object checksum in a HEAD or GET response parsed by boto3
    (``ChecksumCRC32C``, ``ChecksumType``), or None (none, composite, or unknown)."""
    if str(resp.get("ChecksumType") or "FULL_OBJECT") != "FULL_OBJECT":
        return None
    for algorithm in ALGORITHMS:
        text = resp.get(f"Checksum{algorithm}")
        if isinstance(text, str):
            value = decode(algorithm, text)
            if value is not None:
                return Checksum(algorithm, value)
    return None
