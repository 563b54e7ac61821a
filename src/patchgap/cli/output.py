"""How commands print results: ``-o table`` (the default, rich tables that keep one row per line
when piped) or ``-o json`` (one JSON document on stdout alone; messages and logs go to stderr)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

import typer
from rich.console import Console, RenderableType


class Format(str, Enum):
    table = "table"
    json = "json"


OUTPUT_FORMAT = typer.Option(
    Format.table,
    "--output-format",
    "-o",
    case_sensitive=False,
    help="table (default) or json (stdout holds only the JSON document).",
)

# Rich falls back to 80 columns when stdout is not a terminal, wrapping every wide table in a pipe
# or a log file; off a terminal a table takes its natural width instead.
_PIPE_WIDTH = 1000


def stdout_console() -> Console:
    """A console on stdout that only wraps at a real terminal's width."""
    console = Console()
    return console if console.is_terminal else Console(width=_PIPE_WIDTH)


def plain_printer() -> Callable[[str], None]:
    """Print text on stdout as it is: no markup, no re-wrapping of pre-rendered tables."""
    return functools.partial(
        stdout_console().print, markup=False, emoji=False, highlight=False, soft_wrap=True
    )


class Output:
    """One command's printer for the chosen format."""

    def __init__(self, fmt: Format) -> None:
        self.json = fmt == Format.json
        self.out = stdout_console()
        self.err = Console(stderr=True)

    def say(self, text: str) -> None:
        """A message for people: on stdout beside a table, on stderr beside JSON."""
        console = self.err if self.json else self.out
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    def result(self, data: Any, *renderables: RenderableType) -> None:
        """Print ``data`` as JSON, or ``renderables`` (tables, lines) for people; lines are plain
        text (``[test]`` in a source name is not rich markup)."""
        if self.json:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
            return
        for item in renderables:
            text = isinstance(item, str)
            self.out.print(item, markup=not text, highlight=False, soft_wrap=text)
