"""Progress bar: redrawn in place on a terminal, one line at a time into a log."""

import io

from diffbias_core.base.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_stream_gets_whole_lines_without_carriage_returns():
    log = io.StringIO()
    with Progress(1000, "stage", stream=log) as bar:
        for _ in range(1000):
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2  # the opening line and the closing one: no line per update
    assert "0.0%" in lines[0] and "100.0%" in lines[-1]


def test_terminal_is_redrawn_in_place():
    terminal = Terminal()
    with Progress(4, "stage", stream=terminal) as bar:
        bar.update(4)
    text = terminal.getvalue()
    assert text.startswith("\rstage") and "100.0%" in text.rsplit("\r", 1)[-1]
    assert text.count("\n") == 1


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    with Progress(3, "stage", stream=log, enabled=False) as bar:
        bar.update(3)
    assert log.getvalue() == ""
