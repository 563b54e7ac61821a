"""Command-line items shared by every entry point: ``KEY=VALUE`` pairs (``--set``, ``--input``,
``--output``, ``-p``), split one way with one error message.

Standard library only (ground floor): the CLI imports it at start-up.
"""

from __future__ import annotations

from patchgap.errors import ConfigError


def split_key_value(
    item: str, flag: str, expected: str = "KEY=VALUE", example: str | None = None
) -> tuple[str, str]:
    """Split one ``KEY=VALUE`` command-line item at its first ``=``: the key stripped, the value
    as given (it may itself hold ``=``). An item without ``=`` is a one-line error naming the
    flag (or what the item is) and the item, with ``example`` when given."""
    key, sep, value = item.partition("=")
    if not sep:
        hint = f", e.g. {example}" if example else ""
        raise ConfigError(f"{flag} {item!r}: expected {expected}{hint}")
    return key.strip(), value
