"""Every rule of docs/SEMANTICS.md is quoted by a test, and every rule id quoted anywhere exists.

docs/SEMANTICS.md gives each rule an id (``[S-WRITE-2]`` at the start of its item) and promises
that the tests which check a rule quote its id (``grep -rn "S-WRITE-2" tests/``). This test
keeps that promise true, as Mountpoint's ``semantics_doc_test.rs`` does for its key mapping: it
fails, naming them, when a defined id is quoted by no test file under ``tests/``, and when a
test (or a doc, or the code) names an id that no doc defines (a rule renamed or removed).
docs/snapstore.md defines rules in the same way (``[S-SNAP-DEAD]``) and is held to the same.

Caveat: a quote is only a pointer. Whether the quoting test really enforces its rule is for the
reviewer of that test; this one only keeps the pointers from going missing or stale.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from fusionfs import errors

ROOT = Path(__file__).resolve().parents[2]
RULE_DOCS = [ROOT / "docs" / "SEMANTICS.md", ROOT / "docs" / "snapstore.md"]
THIS = Path(__file__).resolve()

# an id: S-, a capitalised area, then a number (with an optional letter: S-FAIL-1b) or a word
_ID = r"S-[A-Z]+-(?:[0-9]+[a-z]?|[A-Z]+)"
# a definition opens a list item or a paragraph: "- [S-MAP-1] The file ..."
_DEFINITION = re.compile(rf"^(?:- )?\[({_ID})\]", re.MULTILINE)
# a mention anywhere, not part of a longer word ("S-CHUNK-1" inside "S-CHUNK-10" is not one)
_MENTION = re.compile(rf"(?<![\w-])({_ID})(?![\w-])")


def _defined() -> dict[str, Path]:
    where: dict[str, Path] = {}
    for doc in RULE_DOCS:
        for rule in _DEFINITION.findall(doc.read_text()):
            assert rule not in where, f"{rule} is defined twice ({where[rule].name}, {doc.name})"
            where[rule] = doc
    return where


def _mentions(paths: list[Path]) -> dict[str, set[str]]:
    """rule id -> the files (relative to the repository) that name it."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for rule in _MENTION.findall(path.read_text(errors="replace")):
            found.setdefault(rule, set()).add(str(path.relative_to(ROOT)))
    return found


def _test_files() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if p.resolve() != THIS)


def test_the_docs_define_rules() -> None:
    """Guards the two checks below against a change of the docs' format that would leave them
    nothing to check."""
    defined = _defined()
    semantics = [r for r, doc in defined.items() if doc == RULE_DOCS[0]]
    assert len(semantics) >= 50, sorted(semantics)
    for family in ("MAP", "READ", "WRITE", "DUR", "FAIL", "CONS", "XATTR", "RENAME", "UNLINK"):
        assert any(r.startswith(f"S-{family}-") for r in semantics), family


def test_every_rule_is_quoted_by_a_test() -> None:
    defined = _defined()
    quoted = _mentions(_test_files())
    unquoted = sorted(set(defined) - set(quoted), key=_order)
    assert not unquoted, (
        f"{len(unquoted)} rule(s) of {', '.join(sorted({defined[r].name for r in unquoted}))} "
        f"named by no test under tests/: {' '.join(unquoted)}"
    )


def test_no_test_doc_or_code_names_a_rule_that_is_not_defined() -> None:
    defined = _defined()
    sources = [
        *_test_files(),
        *(ROOT / "docs").rglob("*.md"),
        ROOT / "README.md",
        *(ROOT / "fusionfs").rglob("*.py"),
        *(ROOT / "snapstore").rglob("*.py"),
    ]
    stale = {rule: files for rule, files in _mentions(sources).items() if rule not in defined}
    assert not stale, "rule ids that no doc defines: " + "; ".join(
        f"{rule} (in {', '.join(sorted(files))})" for rule, files in sorted(stale.items())
    )


def test_every_errno_the_code_maps_to_is_in_the_errno_table() -> None:
    """The errno table of docs/SEMANTICS.md lists every errno ``fusionfs.errors`` gives an
    error class (an ``EBUSY`` that nothing raised and no doc named was the case in point)."""
    text = RULE_DOCS[0].read_text()
    table = text[text.index("## errno table") :]
    table = table[: table.index("\n## ", 1)]
    documented = set(re.findall(r"^\| `(E[A-Z]+)` \|", table, re.MULTILINE))
    assert {"ENOENT", "EIO"} <= documented, documented
    codes = {getattr(errno, name) for name in documented}  # EOPNOTSUPP is ENOTSUP on Linux
    missing = {errno.errorcode[c] for c in errors._ERRNO.values() if c not in codes}
    assert not missing, f"not in the errno table: {sorted(missing)}"


def _order(rule: str) -> tuple[str, int, str]:
    """S-MAP-2 before S-MAP-10."""
    area, _, tail = rule[2:].partition("-")
    digits = "".join(c for c in tail if c.isdigit())
    return area, int(digits) if digits else 0, tail
