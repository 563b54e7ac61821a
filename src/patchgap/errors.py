"""User-facing errors: each names the file, record, key or URI at fault and says what to do."""

from __future__ import annotations


class PatchgapError(Exception):
    """A mistake a user can fix. The CLI prints its message as one line, without a traceback."""


class ConfigError(PatchgapError):
    """A configuration file or flag is invalid (unknown key, bad value, unresolved model)."""


class DataError(PatchgapError):
    """A dataset cannot be read at all (as opposed to single bad records, which are rejected)."""


class StoreError(PatchgapError):
    """Object storage is unreachable, misconfigured, or an object failed verification."""


class ChecksumError(StoreError):
    """An object's sha256 does not match its manifest."""
