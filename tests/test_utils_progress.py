"""Progress when stderr is not a terminal: periodic log lines with rate and ETA, and a closing line."""

from __future__ import annotations

import logging

import pytest

from prodcat.utils import LogProgress, format_seconds, progress


@pytest.fixture
def not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRODCAT_PROGRESS", raising=False)
    monkeypatch.setenv("PRODCAT_PROGRESS_EVERY", "0")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)


def test_progress_logs_rate_eta_and_closing_line(not_a_tty: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prodcat.progress")
    bar = progress(total=10, desc="extract", unit="img")
    assert isinstance(bar, LogProgress)
    for _ in range(5):
        bar.update(2)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "prodcat.progress"]
    assert any("extract: 4/10 img (40%)" in line and "img/s" in line and "ETA" in line for line in lines)
    assert lines[-1].startswith("extract: done, 10 img in ")


def test_progress_wraps_iterables_and_reaches_the_end(not_a_tty: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prodcat.progress")
    assert list(progress(range(3), desc="demo", unit="product")) == [0, 1, 2]
    assert "demo: done, 3 product" in caplog.records[-1].getMessage()


def test_disabled_progress_is_silent(not_a_tty: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prodcat.progress")
    bar = progress(total=3, desc="rank1", disable=True)
    bar.update(3)
    bar.close()
    assert not [r for r in caplog.records if r.name == "prodcat.progress"]


def test_format_seconds() -> None:
    assert format_seconds(5.2) == "5s"
    assert format_seconds(185) == "3m05s"
    assert format_seconds(7260) == "2h01m"
    assert format_seconds(float("inf")) == "?"


def test_progress_lines_reach_the_log_file(not_a_tty: None, tmp_path) -> None:
    from prodcat.utils import get_logger, log_to_file

    path = log_to_file(tmp_path / "logs" / "prodcat.log")
    assert log_to_file(tmp_path / "logs" / "prodcat.log") == path  # idempotent: one handler per file
    try:
        bar = progress(total=4, desc="train run-a", unit="ex")
        bar.update(4)
        bar.close()
        text = path.read_text()
        assert "train run-a: 4/4 ex (100%)" in text
        assert "train run-a: done, 4 ex" in text
        assert text.count("done, 4 ex") == 1
    finally:
        root = get_logger()
        for handler in [h for h in root.handlers if getattr(h, "baseFilename", None) == str(path)]:
            root.removeHandler(handler)
            handler.close()
