"""Ctrl-C for long runs: SIGINT only sets a flag, checked at safe points.

Python's default handler raises ``KeyboardInterrupt`` at whatever bytecode runs
next, for example inside JAX's compilation or dispatch code while XLA threads
still work on the same buffers; that can crash the process ("Fatal Python
error: Segmentation fault") or be swallowed by a library. Within
:func:`sigint_sets_flag` a SIGINT only records the request; the training loop
and the benchmark call :func:`check` between steps, epochs and methods, which
raises :class:`Interrupted` there, where stopping is safe.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested = False


class Interrupted(Exception):
    """Ctrl-C (SIGINT) was received; raised by :func:`check` at a safe point."""


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _requested
    _requested = True


def requested() -> bool:
    """Whether a SIGINT arrived inside :func:`sigint_sets_flag`."""
    return _requested


def check() -> None:
    """Raises :class:`Interrupted` if a SIGINT arrived."""
    if _requested:
        raise Interrupted("interrupted (Ctrl-C)")


@contextlib.contextmanager
def sigint_sets_flag() -> Iterator[None]:
    """Within the block, SIGINT sets the flag read by :func:`check` (main thread only;
    elsewhere the block runs with the process's handler unchanged)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = False
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False
