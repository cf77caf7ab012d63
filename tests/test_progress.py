"""Progress bars: drawn only when the command line turns them on; ``advance`` moves the innermost stage."""

import io
import sys

from asd_ray.progress import advance, bars_on, stage


def test_bars_are_drawn_only_when_turned_on_and_count_what_advance_reports(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with stage("embed", total=3):
        advance(3)  # nothing drawn: library use
    assert err.getvalue() == ""
    with bars_on():
        with stage("embed", total=5):
            advance(2)
            with stage("banks", total=1, unit="machine"):
                advance()  # the innermost bar
            advance(3)
    out = err.getvalue()
    assert "embed" in out and "5/5" in out and "banks" in out and "1/1" in out
    advance(7)  # no open bar: a no-op
