"""Open the built site in a real browser (headless Chromium) and fail on what a reader would see
broken: a missing page, a broken internal link or anchor, an equation left as TeX, a script error.

    python docs/check_site.py                 # check docs/_build/html (build it first)
    python docs/check_site.py --build         # build the site (warnings are errors), then check it

It serves the site on 127.0.0.1, opens the index, one method page and one API page in Chromium
(Debian's ``/usr/bin/chromium``, or ``$CHROMIUM``) driven by Playwright, and for each page checks:

* the page loads (HTTP 200) with no JavaScript error and no failed request for its own files;
* every internal link on it leads to a page of the site, and a ``#fragment`` to an element with
  that id;
* every equation (Sphinx's ``.math`` elements) was typeset by MathJax (holds an ``mjx-container``,
  no ``merror``), and the method page has equations.

Exit status 0 when all hold, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import pathlib
import subprocess
import sys
import threading
import urllib.parse

DOCS = pathlib.Path(__file__).resolve().parent
PAGES = {  # page -> does it need equations
    "index.html": False,
    "methods/sam.html": True,
    "_autosummary/sam_optax.rules.sam.html": False,
}
CHROMIUM_ARGS = [  # what a closed network needs (no background calls home), as root (no sandbox)
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def build(out: pathlib.Path) -> None:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)]
    subprocess.run(cmd, check=True)


def serve(root: pathlib.Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


def internal_links(page, base: str) -> list[str]:
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    return sorted({h for h in hrefs if h.startswith(base)})


def check_link(context, url: str, ids_cache: dict) -> str | None:
    """None when ``url`` (a page of the site, maybe with a fragment) resolves, else the problem."""
    target, _, fragment = url.partition("#")
    if target not in ids_cache:
        response = context.request.get(target)
        if response.status != 200:
            ids_cache[target] = None
        else:
            p = context.new_page()
            p.set_content(response.text())
            ids_cache[target] = set(p.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
            p.close()
    ids = ids_cache[target]
    if ids is None:
        return f"broken link {url}: no such page"
    if fragment and urllib.parse.unquote(fragment) not in ids:
        return f"broken link {url}: no element with id {fragment!r}"
    return None


def check_math(page, needs_math: bool) -> list[str]:
    page.wait_for_function("() => !window.MathJax || !window.MathJax.startup || window.MathJax.startup.promise")
    page.evaluate("() => window.MathJax && window.MathJax.startup ? window.MathJax.startup.promise : null")
    total = page.eval_on_selector_all(".math", "els => els.length")
    raw = page.eval_on_selector_all(".math", "els => els.filter(e => !e.querySelector('mjx-container')).length")
    errors = page.eval_on_selector_all("mjx-merror, [data-mjx-error]", "els => els.length")
    problems = []
    if needs_math and total == 0:
        problems.append("no equations on a page that has them")
    if raw:
        problems.append(f"{raw} of {total} equations not rendered (still TeX)")
    if errors:
        problems.append(f"{errors} equations rendered as TeX errors")
    return problems


def check_page(browser_context, base: str, path: str, needs_math: bool, ids_cache: dict) -> list[str]:
    page = browser_context.new_page()
    errors, failed = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(r.url) if r.url.startswith(base) else None)
    page.on("response", lambda r: failed.append(r.url) if r.url.startswith(base) and r.status >= 400 else None)
    response = page.goto(base + path, wait_until="load")
    if response is None or response.status != 200:
        page.close()
        return [f"missing page (HTTP {None if response is None else response.status})"]
    problems = check_math(page, needs_math)
    problems += [f"script error: {e}" for e in errors] + [f"failed request: {u}" for u in dict.fromkeys(failed)]
    for url in internal_links(page, base):
        problem = check_link(browser_context, url, ids_cache)
        if problem:
            problems.append(problem)
    page.close()
    return problems


def check_site(root: pathlib.Path, pages=PAGES) -> list[str]:
    """Every problem found on ``pages`` of the built site in ``root``, as ``"page: problem"``."""
    from playwright.sync_api import sync_playwright

    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    problems = []
    try:
        with sync_playwright() as pw:
            exe = os.environ.get("CHROMIUM", "/usr/bin/chromium")
            browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            context = browser.new_context()
            ids_cache: dict = {}
            for path, needs_math in pages.items():
                problems += [f"{path}: {p}" for p in check_page(context, base, path, needs_math, ids_cache)]
            browser.close()
    finally:
        server.shutdown()
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--site", default=str(DOCS / "_build" / "html"), help="the built site (default docs/_build/html)"
    )
    parser.add_argument("--build", action="store_true", help="build the site first (sphinx-build -W)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.site)
    if args.build:
        build(root)
    if not (root / "index.html").exists():
        parser.error(f"--site {root} has no index.html: build the site first (or pass --build)")
    problems = check_site(root)
    for p in problems:
        print(p)
    print(f"{len(PAGES)} pages checked in Chromium: " + ("all fine" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
