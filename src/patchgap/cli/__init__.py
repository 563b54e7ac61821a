"""The ``patchgap`` command (typer): thin, each command calls the packages below.

May import: everything.
"""

from __future__ import annotations


def print_error(message: object) -> None:
    """Print a user-facing error as one line on stderr. The message is user text (keys, paths,
    ``gsm8k:train:``, ``[gate]``): never read as rich markup or emoji codes."""
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)
    console.print(Text.assemble(("error:", "red"), " ", str(message)))
