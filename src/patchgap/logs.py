"""Logging set-up shared by the CLI and the stage entrypoints (rich handler, one format)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; ``PATCHGAP_LOG_LEVEL`` overrides the default INFO."""
    lvl = (level or os.environ.get("PATCHGAP_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if getattr(root, "_patchgap_configured", False):
        root.setLevel(lvl)
        return
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # Logs go to stderr so that stdout carries only results (``-o json`` pipes into jq).
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False
        )
        fmt = "%(message)s"
    except ImportError:  # rich is a core dependency; this only guards broken installs
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(lvl)
    root._patchgap_configured = True  # type: ignore[attr-defined]
