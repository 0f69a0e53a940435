"""The names of the control extended attributes, defined once.

The mount answers control and query requests through these ``user.fusionfs.*`` attributes
(``fusionfs.control`` serves them, ``fusionfs.client`` is what programs call; the client's
docstring says what each one does). They are ``str``, as ``os.getxattr`` takes them; the core
compares the ``bytes`` FUSE hands it (``os.fsencode``).
"""

from __future__ import annotations

__all__ = [
    "CHUNK_STATS",
    "DEDUP_FROM",
    "FLUSH",
    "GC",
    "INFO",
    "LAYOUT",
    "NO_CACHE",
    "READ_ONCE",
    "STATS",
    "VERIFY",
    "WRITE_BEHIND",
]

INFO = "user.fusionfs.info"
STATS = "user.fusionfs.stats"
FLUSH = "user.fusionfs.flush"
WRITE_BEHIND = "user.fusionfs.write-behind"
READ_ONCE = "user.fusionfs.read-once"
NO_CACHE = "user.fusionfs.no-cache"
LAYOUT = "user.fusionfs.layout"
DEDUP_FROM = "user.fusionfs.dedup-from"
CHUNK_STATS = "user.fusionfs.chunk-stats"
GC = "user.fusionfs.gc"
VERIFY = "user.fusionfs.verify"  # S-CHUNK-10: fusionfs/verify.py
