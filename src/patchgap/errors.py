"""User-facing errors: each names the file, record, key or URI at fault and says what to do;
and :func:`user_message`, the one place that turns any exception a user can cause into the one
line the CLI prints (exit code 2)."""

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


# -- the one mapping from an exception to the line a user reads ---------------------------------


def _os_error(err: OSError) -> str:
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    what = err.strerror or type(err).__name__
    return f"{where}: {what}" if where else f"{what} ({err})"


def _first_line(text: object, limit: int | None = 300) -> str:
    """``text`` as one line: its lines joined; a library's text (which may quote a whole
    document) cut at ``limit`` characters."""
    lines = str(text).strip().splitlines()
    return " ".join(line.strip() for line in lines)[:limit] if lines else ""


def user_message(err: BaseException) -> str | None:
    """The one line the CLI prints for ``err``, or ``None`` when ``err`` is a defect (a bug to
    report, shown with its traceback). Every family a user's input or environment can cause is
    listed here and only here: the commands raise, the CLI's entry maps."""
    if isinstance(err, PatchgapError):
        return _first_line(err, limit=None)  # the project's own text: kept whole
    try:  # third-party families, matched by class where the library is installed
        import yaml

        if isinstance(err, yaml.YAMLError):
            return f"invalid YAML: {_first_line(err)}"
    except ImportError:  # pragma: no cover - yaml is a dependency
        pass
    try:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        if isinstance(err, ParamValidationError):
            return f"S3 request refused: {_first_line(err.kwargs.get('report') or err)}"
        if isinstance(err, ClientError):
            info = err.response.get("Error", {})
            op = getattr(err, "operation_name", "request")
            return f"S3 {op}: {info.get('Code', '?')}: {_first_line(info.get('Message') or err)}"
        if isinstance(err, BotoCoreError):
            return f"S3: {_first_line(err)}"
    except ImportError:  # pragma: no cover - botocore is a dependency
        pass
    if type(err).__name__ == "SafetensorError":
        return f"unreadable safetensors file: {_first_line(err)}"
    import json

    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
    if isinstance(err, OSError):
        return _os_error(err)
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.start}): {err.reason}"
    if isinstance(err, MemoryError):
        return "out of memory: an input declares more data than this machine can hold"
    return None
