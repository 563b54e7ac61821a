"""Progress of every long loop (rewrite, gate, evaluate, train-rewriter, sft): a tqdm bar with
rate and ETA on a terminal; off one (a pod's log, a file) the same figures as a log line every
``interval`` seconds and once at the end, since a bar redrawn with carriage returns is unreadable
there."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("patchgap.progress")

LOG_INTERVAL_S = 30.0


def _terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Counts ``unit`` toward ``total`` (None: unknown); ``postfix`` figures ride along."""

    def __init__(
        self,
        desc: str,
        unit: str,
        total: int | None = None,
        *,
        enabled: bool = True,
        initial: int = 0,
        interval: float = LOG_INTERVAL_S,
    ) -> None:
        self.desc, self.unit, self.total = desc, unit, total
        self.enabled = enabled
        self.n = self._start = initial
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._t0 = self._logged = time.monotonic()
        self._bar: Any = None
        if enabled and _terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                desc=desc,
                unit=unit,
                total=total,
                initial=initial,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Add ``n`` done units; ``postfix`` replaces figures such as ``loss=0.41``."""
        self.set(self.n + n, **postfix)

    def set(self, n: int, **postfix: Any) -> None:
        """Set the done units (a trainer's global step)."""
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n - self.n)
        self.n = n
        if self.enabled and self._bar is None:
            now = time.monotonic()
            if now - self._logged >= self.interval:
                self._logged = now
                log.info(self.line())

    def line(self) -> str:
        """The bar's figures as text: done/total, elapsed<remaining, rate, postfix."""
        from tqdm import tqdm

        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else None
        post = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        fmt = (
            "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
            if self.total is not None
            else "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
        )
        return tqdm.format_meter(
            self.n,
            self.total,
            elapsed,
            prefix=self.desc,
            unit=self.unit,
            rate=rate,
            postfix=post or None,
            bar_format=fmt,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            log.info(self.line())
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
