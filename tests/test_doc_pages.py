"""The code on the docs pages runs as written.

Every page in docs/guide/ and docs/methods/ is run top to bottom: its ```python blocks in order,
in one namespace, each followed by the hidden checks written right after it as an HTML comment
(``<!-- check`` on its own line, Python code, ``-->``), which the rendered page does not show.
A block opened with ```python and preceded by ``<!-- no-run -->`` (a multi-host launch, say) is
shown but not run.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted([*(DOCS / "guide").glob("*.md"), *(DOCS / "methods").glob("*.md")])

# A python block, or a hidden check; a no-run marker keeps the block that follows it from running.
PIECE = re.compile(r"(<!-- no-run -->\s*)?```python\n(.*?)```|<!-- check\n(.*?)-->", flags=re.S)


def pieces(text):
    """``(kind, code)`` in page order: kind is "block", "check" or "shown" (not run)."""
    out = []
    for m in PIECE.finditer(text):
        if m.group(3) is not None:
            out.append(("check", m.group(3)))
        else:
            out.append(("shown" if m.group(1) else "block", m.group(2)))
    return out


def test_pieces_are_found_in_order():
    text = "a\n```python\nx = 1\n```\n<!-- check\nassert x == 1\n-->\n<!-- no-run -->\n```python\nboom()\n```\n"
    assert pieces(text) == [("block", "x = 1\n"), ("check", "assert x == 1\n"), ("shown", "boom()\n")]


def test_there_are_pages():
    assert PAGES, "docs/guide and docs/methods have no pages"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[f"{p.parent.name}/{p.stem}" for p in PAGES])
def test_page_code_runs(page):
    ns = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for i, (kind, code) in enumerate(pieces(page.read_text())):
        if kind != "shown":
            exec(compile(code, f"{page.relative_to(DOCS)}[{i}:{kind}]", "exec"), ns)
            ran += 1
    if page.stem != "index":
        assert ran, f"{page.name} has no code that runs"


TEST_REF = re.compile(r"(tests/test_\w+\.py)?::(\w+)")


def cited_tests(text):
    """``(file, function)`` for each ``tests/test_x.py::name`` on a page; a bare ``::name`` is in
    the file named last before it."""
    refs, current = [], None
    for m in TEST_REF.finditer(text):
        current = m.group(1) or current
        refs.append((current, m.group(2)))
    return refs


def test_test_references_are_read_with_their_file():
    text = "Tested: `tests/test_a.py::test_x`, `::test_y` and `tests/test_b.py::test_z[p]`; `::orphan`"
    assert cited_tests(text) == [
        ("tests/test_a.py", "test_x"),
        ("tests/test_a.py", "test_y"),
        ("tests/test_b.py", "test_z"),
        ("tests/test_b.py", "orphan"),
    ]


def test_every_test_a_page_names_exists():
    # The pages back their claims with "Tested: tests/test_x.py::test_y": a renamed or deleted
    # test must not leave a page citing it.
    missing, count = [], 0
    for page in [*PAGES, *DOCS.glob("*.md")]:
        for file, name in cited_tests(page.read_text()):
            count += 1
            path = DOCS.parent / file if file else None
            if path is None or not re.search(rf"^def {name}\(", path.read_text() if path.exists() else "", re.M):
                missing.append(f"{page.relative_to(DOCS)}: {file}::{name}")
    assert count > 100 and missing == []
