"""What the documentation names exists: the repository's files and folders it writes in
backticks, the tests it cites as evidence (``tests/x.py::test_y``; a bare ``::test_y`` is in
the file the document named last), and the dotted names of the node's modules, classes and
functions (``node.db.queries.page``).

A reader who follows a reference finds it; a rename that leaves a document behind fails here.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [*ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "CONFORMANCE.md"],
    key=lambda p: str(p),
)
_PATH = re.compile(
    r"`((?:node|models|integration|benchmarks|scripts|tests|docs|deploy)/[\w/.*-]+)`"
)
_TEST = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|`::(\w+)")
_DOTTED = re.compile(r"`((?:node|models|integration)(?:\.\w+)+)(?:\([^`]*\))?`")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _defines(test_file: str, name: str) -> bool:
    text = (ROOT / test_file).read_text(encoding="utf-8")
    return re.search(rf"^(async )?def {re.escape(name)}\(", text, re.M) is not None


def test_there_are_documents() -> None:
    assert len(DOCUMENTS) > 10 and all(p.is_file() for p in DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_named_paths_exist(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    missing = [p for p in _PATH.findall(text) if not any(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"{document.name} names paths that do not exist: {missing}"


def _test_references(text: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line, file, test) for each reference; a bare ``::test`` takes the file last named."""
    last: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        for m in _TEST.finditer(line):
            if m.group(1):
                last = m.group(1)
                yield number, last, m.group(2)
            else:
                yield number, last, m.group(3)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_cited_tests_exist(document: Path) -> None:
    for line, test_file, name in _test_references(document.read_text(encoding="utf-8")):
        where = f"{document.name}:{line}"
        assert test_file is not None, f"{where}: ::{name} names no file before it"
        assert (ROOT / test_file).is_file(), f"{where}: {test_file} does not exist"
        if name is not None:
            assert _defines(test_file, name), f"{where}: {test_file} has no {name}"


def _resolve(dotted: str) -> object:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        module = ".".join(parts[:k])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj: object = importlib.import_module(module)
            for attribute in parts[k:]:
                obj = getattr(obj, attribute)
            return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_dotted_names_resolve(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    for dotted in _DOTTED.findall(text):
        try:
            _resolve(dotted)
        except (ModuleNotFoundError, AttributeError) as exc:
            pytest.fail(f"{document.name}: {dotted} does not resolve ({exc!r})")
