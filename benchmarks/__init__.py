"""Benchmark suite for fusionfs (and, later, snapstore): honest, side-by-side figures.

Run ``python -m benchmarks fs --quick`` for a first look; see ``benchmarks/README.md`` for what each
scenario means and how to run against MinIO or AWS. Caveats: the figures are only as good as the
machine they run on (compare ratios measured inside one run, not absolute figures across runs),
and against the local s3rver the server itself is often the ceiling (see ``docs`` in the README).

Modules: ``s3rver`` (a local S3 server for a run), ``proxy`` (a TCP proxy that adds latency,
bandwidth caps and faults), ``harness`` (timing, statistics, output, progress), ``fs`` (the
filesystem benchmark), ``snap`` (checkpoint/restore), ``window`` (reclamation window fit),
``plots`` (PNG plots of a run), ``__main__`` (the command line).
"""

__all__: list[str] = []
