"""What the ``fs`` and ``snap`` benchmarks share: settings of the store, the store itself (a
local s3rver or a given endpoint, maybe behind ``benchmarks.proxy``), a run prefix deleted at
the end, the scratch directory, the output directory, and ``Bench``: recording a row, the
progress display, and one failed step noted without losing the others.

Caveats: the store's prefix is deleted at the end even after a failure (errors are printed, not
raised); a scratch directory with a mount still in it is left in place rather than deleted
through the mount (which would delete objects in the bucket).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.harness import (
    CpuMeter,
    Measurement,
    ProxyProcess,
    Results,
    Steps,
    run_cmd,
    timestamp,
)

__all__ = [
    "SEED",
    "Bench",
    "BenchError",
    "Store",
    "StoreSettings",
    "common_settings",
    "count_objects",
    "delete_under",
    "open_store",
    "out_dir",
    "proxy_address",
    "proxy_args",
    "remove_work_dir",
    "run_in_store",
]

SEED = 20240601
_OUT = Path(__file__).resolve().parent / "out"


class BenchError(Exception):
    """A setup problem reported as one line (no traceback)."""


@dataclass
class StoreSettings:
    """The settings both benchmarks take (``python -m benchmarks fs|snap``'s common options)."""

    endpoint_url: str | None = None
    bucket: str | None = None
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    error_rate: float = 0.0
    link_mbps: float = 0.0
    runs: int = 3
    out: Path | None = None
    quick: bool = False

    @property
    def proxied(self) -> bool:
        return bool(self.latency_ms or self.bandwidth_mbps or self.link_mbps or self.error_rate)


def out_dir(settings: StoreSettings, prefix: str = "") -> Path:
    """Where the results go: ``--out``, else ``benchmarks/out/PREFIX<timestamp>``."""
    return settings.out or _OUT / f"{prefix}{timestamp()}"


def common_settings(settings: StoreSettings) -> dict[str, Any]:
    """The entries of results.json's settings that both benchmarks write."""
    return {
        "out": str(settings.out) if settings.out else None,
        "bandwidth_unit": "megabits per second per connection and direction",
        "link_unit": "megabits per second, all connections together, per direction",
    }


# -- the store: a server, maybe behind the proxy ---------------------------------------------


@dataclass
class Store:
    setup_url: str  # for preparing data: straight to the server
    url: str  # what every measured client uses (the proxy, when one is configured)
    bucket: str
    prefix: str  # ends with "/"
    env: dict[str, str]
    # processes whose CPU the read scenarios report (the local server, the proxy): name -> pid
    cpu_pids: dict[str, Callable[[], int | None]] = field(default_factory=dict)

    def cpu_meter(self, daemon: int | None = None) -> CpuMeter:
        """A meter of the server's and the proxy's CPU, this process's (and its waited-for
        children's), and ``daemon``'s (a mount's process)."""
        pids = {name: get() for name, get in self.cpu_pids.items()}
        pids["daemon"] = daemon
        return CpuMeter(pids)

    def client(self, url: str | None = None, pool: int = 16) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=url or self.url,
            aws_access_key_id=self.env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=self.env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=self.env.get("AWS_SESSION_TOKEN"),
            region_name=self.env.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                max_pool_connections=pool,
                retries={"max_attempts": 10, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=10,
                read_timeout=120,
            ),
        )


def proxy_address(url: str) -> tuple[str, int] | None:
    """(host, port) that a proxy in front of ``url`` forwards to; None if it cannot (https)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or parsed.hostname is None:
        return None
    return parsed.hostname, parsed.port or 80


def proxy_args(settings: StoreSettings, latency_ms: float) -> list[str]:
    """``benchmarks.proxy``'s arguments: ``latency_ms`` and the settings' bandwidth, link and
    error rate, with the benchmarks' seed."""
    args = ["--latency-ms", str(latency_ms), "--bandwidth-mbps", str(settings.bandwidth_mbps)]
    args += ["--link-mbps", str(settings.link_mbps), "--error-rate", str(settings.error_rate)]
    return [*args, "--seed", str(SEED)]


@contextlib.contextmanager
def open_store(settings: StoreSettings, results: Results, console: Console) -> Iterator[Store]:
    from benchmarks.s3rver import LocalS3rver

    stack = contextlib.ExitStack()
    cpu_pids: dict[str, Callable[[], int | None]] = {}
    with stack:
        env = dict(os.environ)
        if settings.endpoint_url is None:
            console.print("starting a local s3rver (npm s3rver 3.7.1) ...")
            server = stack.enter_context(LocalS3rver(bucket="bench"))
            env.update(
                AWS_ACCESS_KEY_ID=server.access_key,
                AWS_SECRET_ACCESS_KEY=server.secret_key,
                AWS_DEFAULT_REGION="us-east-1",
            )
            env.pop("AWS_SESSION_TOKEN", None)
            env.pop("AWS_PROFILE", None)
            setup_url, bucket = server.endpoint_url, "bench"
            stack.callback(lambda: results.extra.update(s3rver_restarts=server.restarts))
            cpu_pids["server"] = lambda: server.pid
        else:
            if not settings.bucket:
                raise BenchError("--endpoint-url needs --bucket")
            setup_url, bucket = settings.endpoint_url, settings.bucket
            env.setdefault("AWS_DEFAULT_REGION", env.get("AWS_REGION", "us-east-1"))
        url = setup_url
        if settings.proxied:
            address = proxy_address(setup_url)
            if address is None:
                raise BenchError(
                    "the proxy (--latency-ms/--bandwidth-mbps/--link-mbps/--error-rate) needs http"
                )
            proxy = ProxyProcess(address, proxy_args(settings, settings.latency_ms))
            # Registered first, so it runs after the proxy has stopped and printed its counters.
            stack.callback(lambda: results.extra.update(proxy_stats=proxy.stats))
            stack.enter_context(proxy)
            url = proxy.endpoint_url
            cpu_pids["proxy"] = lambda: proxy.pid
        prefix = f"fusionfs-bench-{timestamp()}-{random.getrandbits(24):06x}/"
        store = Store(setup_url, url, bucket, prefix, env, cpu_pids)
        stack.callback(_delete_prefix, store, console)
        yield store


def count_objects(client: Any, bucket: str, prefix: str, size: int | None = None) -> int:
    """Objects under ``prefix`` (of ``size`` bytes, if given), directory markers not counted."""
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/") and (size is None or obj["Size"] == size):
                n += 1
    return n


def delete_under(client: Any, bucket: str, prefix: str) -> None:
    """Deletes every object under ``prefix``."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})


def _delete_prefix(store: Store, console: Console) -> None:
    """Deletes everything the run created (bounded: errors are reported, not raised)."""
    try:
        delete_under(store.client(store.setup_url), store.bucket, store.prefix)
    except Exception as exc:  # cleanup must not hide the run's own outcome
        console.print(f"[yellow]could not delete s3://{store.bucket}/{store.prefix}: {exc}")


# -- scratch directory --------------------------------------------------------------------------


def remove_work_dir(work: Path, console: Console) -> None:
    """Deletes the scratch directory, but never through a mount that is still there (that
    would delete objects in the bucket): such mounts are lazily detached and left in place."""
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(str(work) + "/"):
                mounts.append(target)
    if mounts:
        for target in mounts:
            run_cmd(["fusermount3", "-u", "-z", target], timeout=30)
        console.print(f"[yellow]left {work} in place: {len(mounts)} mount(s) were still there")
        return
    shutil.rmtree(work, ignore_errors=True)


# -- the benchmark object -------------------------------------------------------------------------


class Bench:
    """One benchmark run on one store: rows recorded into ``results``, progress shown while
    ``progress`` is open. Subclasses set ``name`` and ``row_format`` and write ``run``."""

    name = ""
    #: a recorded row as logged: scenario, tool, run number (from 1), value, unit
    row_format = "{scenario:<16} {tool:<14} run {run}: {value:10.1f} {unit}"

    def __init__(self, store: Store, results: Results, console: Console, work: Path) -> None:
        self.store = store
        self.results = results
        self.console = console
        self.work = work
        self._steps: Steps | None = None

    def run(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """After ``run`` (also when interrupted), with the store still open: add notes."""

    def record(
        self, scenario: str, tool: str, run: int, value: float, unit: str, **extras: float
    ) -> None:
        self.results.add(Measurement(scenario, tool, run, value, unit, dict(extras)))
        detail = "".join(f", {k} {v:.3g}" for k, v in extras.items())
        row = self.row_format.format(
            scenario=scenario, tool=tool, run=run + 1, value=value, unit=unit
        )
        self.log(row + detail)

    def log(self, text: str) -> None:
        if self._steps is not None:
            self._steps.log(text)
        else:
            self.console.print(text)

    def step(self, text: str) -> None:
        if self._steps is not None:
            self._steps.step(text)

    def advance(self) -> None:
        if self._steps is not None:
            self._steps.advance()

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[None]:
        """The progress display of ``total`` steps, starting with "setting up"."""
        with Steps(self.console, self.name, total) as steps:
            self._steps = steps
            try:
                self.step("setting up")
                yield
            finally:
                self._steps = None

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        """Runs ``fn``; if it fails (not for a setup problem or an interrupt), the failure
        becomes a note of the results and the benchmark goes on with its other steps."""
        try:
            fn()
        except (BenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # one failed step must not lose the others
            note = f"{what} failed: {exc!r}"[:500]
            self.results.notes.append(note)
            self.log(f"[red]{note}")


def run_in_store(
    settings: StoreSettings,
    results: Results,
    console: Console,
    *,
    work_prefix: str,
    out: Path,
    make: Callable[[Store, Path], Bench],
) -> int:
    """Opens the store and a scratch directory, makes the benchmark (``make``), runs it and
    writes the results to ``out``. The exit status: 0; 130 if interrupted (partial results
    written); 1 on a setup problem (printed; no results)."""
    work = Path(tempfile.mkdtemp(prefix=work_prefix))
    status = 0
    try:
        with open_store(settings, results, console) as store:
            bench = make(store, work)
            try:
                bench.run()
            except KeyboardInterrupt:
                results.notes.append("interrupted: partial results")
                status = 130
            bench.finish()
    except BenchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        remove_work_dir(work, console)
    results.write(out, console)
    return status
