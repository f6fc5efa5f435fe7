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


class Clocked(io.StringIO):
    """A stream that records when each line was written."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        import time

        if text.strip():
            self.times.append((time.monotonic(), text.strip()))
        return super().write(text)


def test_progress_lines_arrive_during_a_long_block_counted_from_rows_done(ray_runtime, tiny_assets, tmp_path,
                                                                         monkeypatch):
    """One block of 48 rows (no data file until its end): progress lines keep their interval and count
    rows the actors finished, before the first data file is written."""
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import report, run_job
    from tests.pipeline.conftest import job, prompt

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [prompt(i) for i in range(48)]}), tmp_path / "in" / "p.parquet")
    config = job(*tiny_assets, str(tmp_path / "in"), str(tmp_path / "out"),
                 resources={"rows_per_block": 48, "batch_size": 1, "actors": 1}, generation={"max_new_tokens": 32},
                 routing={"calibration": None, "calibration_score": "raw"})
    every = 0.5
    monkeypatch.setattr(report, "PROGRESS_EVERY", every)
    stream = Clocked()
    monkeypatch.setattr(sys, "stderr", stream)
    run_job(config)
    lines = [(t, text) for t, text in stream.times if "rows" in text and "/48 rows" in text]
    partial = [text for _, text in lines if not text.startswith(("logo-batch: 0/48", "logo-batch: 48/48"))]
    assert partial, "lines with rows done inside the block: " + repr([x for _, x in lines])
    gaps = [b - a for (a, _), (b, _) in zip(lines, lines[1:])]
    assert lines and max(gaps) < every + 3.0, gaps  # the interval held while the block ran
