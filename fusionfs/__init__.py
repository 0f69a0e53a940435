"""fusionfs: a FUSE filesystem over S3-compatible object storage or a local directory.

Public API for programs: ``fusionfs.client`` (find a mount, read its stats, make it durable).
The filesystem itself is started with ``fusionfs mount`` (``fusionfs.cli``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
