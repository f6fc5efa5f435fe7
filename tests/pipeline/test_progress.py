"""The one progress line: rows done, rows/s and ETA; without a terminal, one line per interval."""

from __future__ import annotations

import io

from pipeline.report import ProgressLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_one_line_per_interval_and_one_at_the_end():
    out = io.StringIO()
    line = ProgressLine(1000, stream=out, every=3600)
    line.started -= 10.0  # as if 10 s had passed
    line.update(100)  # within the interval: nothing printed
    assert out.getvalue() == ""
    line.update(250, final=True)
    text = out.getvalue()
    assert text.count("\n") == 1 and "\r" not in text
    assert text.startswith("logo-batch: 250/1,000 rows (25.0%), 25.0 rows/s, ETA 0:00:30")
    line.every = 0.0
    line.update(500)
    assert out.getvalue().count("\n") == 2


def test_on_a_terminal_the_line_is_rewritten_in_place():
    out = Terminal()
    line = ProgressLine(10, stream=out)
    line.started -= 5.0
    line.update(5)
    line.update(10, final=True)
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("ETA 0:00:00\n")
    assert ProgressLine(0, stream=io.StringIO()).text(0, 0.0).endswith("(100.0%), 0.0 rows/s, ETA ?")
