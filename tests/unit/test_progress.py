"""Progress of long loops: a bar with rate and ETA on a terminal, log lines in a pod's log."""

from __future__ import annotations

import logging

import pytest

from patchgap import progress
from patchgap.progress import Progress


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "patchgap.progress"]


def test_off_a_terminal_progress_is_log_lines_with_rate_and_eta(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with Progress("gate", "candidates", total=10, interval=0) as bar:
        bar.update(4, accepted="2/3")
        bar.update(6)
    first, last = _lines(caplog)[0], _lines(caplog)[-1]
    assert first.startswith("gate: 4/10 candidates [") and "<" in first  # elapsed<remaining
    assert "candidates/s" in first and first.endswith("accepted=2/3]")
    assert last.startswith("gate: 10/10 candidates")


def test_log_lines_are_periodic_not_one_per_update(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with Progress("sft", "step", total=100, initial=20, interval=3600) as bar:
        for step in range(21, 41):
            bar.set(step, loss="0.5")
    (only,) = _lines(caplog)  # the closing summary
    assert only.startswith("sft: 40/100 step") and "loss=0.5" in only


def test_disabled_progress_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with Progress("rewrite", "rec", enabled=False, interval=0) as bar:
        bar.update(3)
    assert _lines(caplog) == []


def test_on_a_terminal_it_is_a_tqdm_bar_on_stderr(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(progress, "_terminal", lambda: True)
    with Progress("evaluate", "items", total=8) as bar:
        bar.update(8, acc="0.5")
    err = capsys.readouterr().err
    assert "evaluate: 100%" in err and "8/8" in err and "items/s" in err and "acc=0.5" in err
    assert _lines(caplog) == []
