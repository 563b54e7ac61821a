"""Bounded reads of the small structured files a user hands over (a model's ``config.json``, a
safetensors header): each failure is one :class:`~patchgap.errors.ConfigError` naming the file,
and no declared size is trusted before it is checked against the file's real size and a sane
bound, so a 100-byte file claiming a 64 GiB header costs nothing.

Standard library only (ground floor).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError

#: A JSON settings file (config.json, tokenizer_config.json) is kilobytes; 64 MiB is generous.
MAX_JSON_BYTES = 64 << 20
#: safetensors itself refuses headers over 100 MB; so do we, before reading one.
MAX_SAFETENSORS_HEADER = 100_000_000


def read_json_file(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a JSON file; too big, unreadable or invalid JSON is one line naming it."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ConfigError(f"{what} {p}: {size} bytes, more than {MAX_JSON_BYTES}; not a {what}")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {p}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} {p}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except (RecursionError, ValueError) as err:
        raise ConfigError(f"{what} {p}: invalid JSON: {str(err)[:200]}") from None


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """The header length and the header of a safetensors file, checked against the file: the
    declared length fits the file and :data:`MAX_SAFETENSORS_HEADER`, the header is a JSON
    object whose every tensor has ``dtype``, ``shape`` and ``data_offsets`` lying within the
    data section (so a truncated file is refused here, naming it, not deep in a loader)."""
    p = Path(path)
    file_size = p.stat().st_size

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{p}: not a safetensors file: {why}")

    with p.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise bad(f"{file_size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > file_size:
            raise bad(f"header declares {header_len} bytes but the file has {file_size}")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"header is not JSON ({str(err)[:120]})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = file_size - 8 - header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(meta, dict)
            and isinstance(meta.get("dtype"), str)
            and isinstance(meta.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in meta["shape"])
            and isinstance(meta.get("data_offsets"), list)
            and len(meta["data_offsets"]) == 2
            and all(isinstance(o, int) for o in meta["data_offsets"])
        )
        if not ok:
            raise bad(f"tensor {name!r}: needs dtype, shape and two data_offsets")
        start, end = meta["data_offsets"]
        if not 0 <= start <= end <= data_size:
            raise bad(
                f"tensor {name!r}: data_offsets [{start}, {end}] outside the {data_size} data "
                "bytes (truncated file?)"
            )
    return header_len, header


def check_safetensors_folder(folder: str | os.PathLike[str]) -> None:
    """Check the header of every ``*.safetensors`` in ``folder`` (see
    :func:`read_safetensors_header`) before a loader maps them."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        read_safetensors_header(f)
