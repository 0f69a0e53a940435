"""The container recipe in the README and docs/spot.md is what the tests build and run: the
Containerfile verbatim (scripts/build-task-image.sh builds the image from it step by step), and
the ``podman run`` flags of tests/snap/test_container.py."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "containers" / "Containerfile"
DOCS = [ROOT / "README.md", ROOT / "docs" / "spot.md"]


def _run_flags() -> list[str]:
    """RUN_FLAGS of tests/snap/test_container.py, read without importing it (its conftest)."""
    text = (ROOT / "tests" / "snap" / "test_container.py").read_text()
    match = re.search(r"RUN_FLAGS = \[(.*?)\]", text, re.DOTALL)
    assert match
    return re.findall(r'"([^"]+)"', match.group(1))


def test_docs_carry_the_containerfile_the_tests_build() -> None:
    containerfile = CONTAINERFILE.read_text().rstrip()
    for doc in DOCS:
        blocks = re.findall(r"```dockerfile\n(.*?)\n```", doc.read_text(), re.DOTALL)
        assert blocks == [containerfile], f"{doc.name}: its Containerfile is not {CONTAINERFILE}"


def test_docs_give_the_podman_flags_the_tests_use() -> None:
    flags = shlex.join(_run_flags())
    assert "--device /dev/fuse" in flags and "seccomp=unconfined" in flags
    for doc in DOCS:
        text = doc.read_text()
        assert f"podman run {flags}" in text, f"{doc.name} lacks: podman run {flags}"
        assert "-v /opt/fusionfs/criu:/opt/fusionfs/criu:ro" in text
    spot = DOCS[1].read_text()
    assert f"containerOptions = '{flags} -v /opt/fusionfs/criu:/opt/fusionfs/criu:ro'" in spot


def test_the_image_build_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    """build-task-image.sh reads every Containerfile instruction; one it cannot turn into a
    mmdebstrap step is refused (so the documented Containerfile cannot drift from the image)."""
    script = (ROOT / "scripts" / "build-task-image.sh").read_text()
    for instruction in ("FROM debian:", "RUN ", "COPY ", "ENV ", "CMD "):
        assert instruction in script
    assert 'die "$file: this script cannot build: $line"' in script
    for line in CONTAINERFILE.read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.split()[0] in {"FROM", "RUN", "COPY", "ENV", "CMD"}, line
    entry = ROOT / "containers" / "snapstore-entry"
    done = subprocess.run(["sh", str(entry)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.startswith("usage: snapstore-entry")
