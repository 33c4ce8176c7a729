"""Generated blocks in the docs pages: the text between a page's start and end markers is
replaced, atomically, by a script's output (tests/test_benchmark_pages.py checks that each block
equals its script's output for the committed results)."""

import os
import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "benchmarks"


def write_block(page: pathlib.Path, start: str, end: str, text: str) -> None:
    """Replace what lies between ``start`` and ``end`` in ``page`` by ``text``.

    Raises:
      ValueError: the page lacks either marker or has them out of order (nothing is written).
    """
    body = page.read_text()
    if start not in body or end not in body or body.index(start) > body.index(end):
        raise ValueError(f"{page} has no {start} ... {end} markers: nothing was written")
    i, j = body.index(start) + len(start), body.index(end)
    fd, tmp = tempfile.mkstemp(dir=page.parent, prefix=f".{page.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(body[:i] + "\n" + text + "\n" + body[j:])
    os.replace(tmp, page)  # never a half-written page


def block(page: pathlib.Path, start: str, end: str) -> str:
    """The text between the markers, as ``write_block`` writes it (without the newlines around)."""
    body = page.read_text()
    return body[body.index(start) + len(start) : body.index(end)].strip("\n")
