"""Compile the pipelines to YAML, and find a compiled one by name.

``patchgap compile`` writes ``pipelines/compiled/*.yaml`` (committed, shipped as package data; a
test fails when stale). The output is byte-for-byte deterministic: KFP renders each parameter
default into the comment header with ``str()`` of a dict read back from protobuf, whose key order
changes from process to process, so those lines are re-rendered with sorted keys.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError

PIPELINES = ("full", "rewrite", "watch")


def compiled_dir() -> Path:
    """Where ``patchgap compile`` writes and ``submit`` reads compiled pipelines."""
    return Path(__file__).resolve().parent / "compiled"


def pipeline_package(name_or_path: str) -> Path:
    """A compiled pipeline by name (``full``, ``rewrite``, ``watch``) or a YAML path."""
    if name_or_path in PIPELINES:
        path = compiled_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"{path}: not compiled yet; run `patchgap compile`")
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"pipeline {name_or_path!r}: not a file and not one of {', '.join(PIPELINES)}"
        )
    return path


def compile_all(out_dir: Path | None = None) -> list[Path]:
    from kfp import compiler

    out = Path(out_dir) if out_dir is not None else compiled_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PIPELINES:
        module = importlib.import_module(f"patchgap.pipelines.{name}")
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(module.PIPELINE, str(path))
        path.write_text(stable_header(path.read_text()))
        written.append(path)
    return written


_DEFAULT_LINE = re.compile(r"^(#    \w+: \w+ \[Default: )(.*)(\])$")


def stable_header(text: str) -> str:
    """Re-render the header's ``[Default: ...]`` values with dict keys sorted, recursively."""

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [ordered(v) for v in value]
        return value

    def fix(line: str) -> str:
        match = _DEFAULT_LINE.match(line)
        if match is None or not match.group(2).startswith(("{", "[")):
            return line
        try:
            value = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            return line
        return match.group(1) + str(ordered(value)) + match.group(3)

    lines = text.split("\n")
    end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "\n".join([fix(line) for line in lines[:end]] + lines[end:])
