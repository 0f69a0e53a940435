"""Fixtures of the compatibility layer: real programs on a real mount, on every store.

``compat_mount`` is a fresh, empty store mounted at ``compat_mount.path``, parametrized over the
local-directory store (``local``, the embedded default) and every S3 server of
``tests/s3servers.py`` whose session fixture is defined (``moto`` always; ``s3rver`` and
``rgw`` once ``s3rver_server`` / ``rgw_server`` exist in ``tests/conftest.py``): the ids are
``[local]``, ``[moto]``, ``[s3rver]``, ``[rgw]``. Which servers are there is decided at
collection time by ``pytest_generate_tests`` asking pytest's fixture manager whether a fixture
named ``<name>_server`` is visible to the test, so a server whose fixture is not defined is not
a test at all (rather than a skip, which ``CI=true`` would turn into a failure), and it becomes
one as soon as its fixture is defined, with nothing to switch on. A test narrows the stores with
``@pytest.mark.parametrize("_compat_store", ["moto"], indirect=True)``.

After the program, a test calls ``compat_mount.remount_cold()``: it records every entry under
the mount (type, permission bits, symlink target, sha256 of every file), unmounts every mount
of the store, empties the cache, mounts again and checks that the same tree comes back.

The daemons' logs are checked by ``fusion_mount`` (``tests/conftest.py``), as for every mount
test: a WARNING or ERROR record in any mount's log fails the test unless
``@pytest.mark.allow_logs`` declares a substring of it. Mount options come from
``@pytest.mark.compat_mount_args("--opt", "value")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from compat_support import CompatMount
from s3servers import SERVERS, S3Server, bucket_on

STORES_LOCAL = "local"
_PREFIX = "compat"  # the mounts see s3://BUCKET/compat (a prefix, as a real pipeline would)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "compat_mount_args(*args): extra 'fusionfs mount' arguments for compat_mount",
    )


def _server_fixture(name: str) -> str:
    return "moto" if name == "moto" else f"{name}_server"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``compat_mount`` over ``local`` and the servers whose fixture exists."""
    if "compat_mount" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if "_compat_store" in (names if isinstance(names, (list, tuple)) else str(names)):
            return  # the test names its stores itself (a narrower list)
    manager: Any = metafunc.config.pluginmanager.get_plugin("funcmanage")
    servers = [
        name
        for name in SERVERS
        if manager.getfixturedefs(_server_fixture(name), metafunc.definition)
    ]
    metafunc.parametrize("_compat_store", [STORES_LOCAL, *servers], indirect=True)


@pytest.fixture
def _compat_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(name, source, env) of a fresh, empty store (parametrized by pytest_generate_tests)."""
    name = str(request.param)
    if name == STORES_LOCAL:
        root = tmp_path / "store"
        root.mkdir()
        yield name, str(root), {}
        return
    server: S3Server = request.getfixturevalue(_server_fixture(name))
    with bucket_on(server) as bucket:
        yield name, f"{bucket.source}/{_PREFIX}", dict(bucket.env)


@pytest.fixture
def compat_mount(
    request: pytest.FixtureRequest,
    _compat_store: tuple[str, str, dict[str, str]],
    fusion_mount: Any,
) -> Iterator[CompatMount]:
    """The store mounted (see the module docstring)."""
    name, source, env = _compat_store
    extra = tuple(str(a) for m in request.node.iter_markers("compat_mount_args") for a in m.args)
    mount = CompatMount(name, source, env, fusion_mount, extra)
    yield mount
    for node in mount.nodes:  # a clean unmount (fusion_mount's teardown would force it)
        if node.proc.poll() is None:
            node.unmount()
