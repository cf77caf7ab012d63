"""Progress bars for a person at a terminal: one per stage of a command (discover, embed, banks, scoring,
report), on stderr, with the rate (clips/s while embedding). No ray here.

Library calls draw nothing: the command line turns bars on with ``bars_on()``. Code deep in a stage reports
work done with ``advance(n)``, which moves the innermost open bar, so that embedders and machine maps need no
progress argument. Driver thread only.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

_enabled = False
_open: list = []  # the open bars, innermost last
_last: list = []  # time.monotonic() of the last work reported, drawn or not (the resource watchdog reads it)


@contextlib.contextmanager
def bars_on(enabled: bool = True) -> Iterator[None]:
    """Draw the bars of the stages opened inside this block (``enabled`` False: draw none)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "clip") -> Iterator[None]:
    """A bar for the stage run inside this block: ``total`` items of ``unit`` (None: unknown). On a terminal it
    redraws five times a second; into a file or a CI log it writes a line at most every 30 s, and its last state."""
    if not _enabled:
        yield
        return
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    with tqdm(total=total, desc=f"{name:<9}", unit=unit, file=sys.stderr, mininterval=0.2 if tty else 30.0,
              dynamic_ncols=tty, ncols=None if tty else 100, leave=True) as bar:
        _open.append(bar)
        try:
            yield
        finally:
            _open.remove(bar)


def advance(n: int = 1) -> None:
    """``n`` more items of the innermost open stage are done (nothing drawn when no bar is)."""
    if n:
        _last[:] = [time.monotonic()]
    if _open:
        _open[-1].update(n)


def note(text: str) -> None:
    """Show ``text`` after the innermost open bar (a stage's running counts, a loss); nothing without a bar."""
    if _open:
        _open[-1].set_postfix_str(text, refresh=True)


def last_progress() -> float | None:
    """When work was last reported with ``advance`` (``time.monotonic()``), or None."""
    return _last[0] if _last else None
