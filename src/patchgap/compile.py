"""Compile the pipelines under ``pipelines/`` to YAML (committed; a test fails when stale)."""

from __future__ import annotations

import importlib
from pathlib import Path

PIPELINES = ("full", "rewrite", "watch")


def compile_all(out_dir: Path | None = None) -> list[Path]:
    from kfp import compiler

    from patchgap.cluster import compiled_dir

    out = Path(out_dir) if out_dir is not None else compiled_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PIPELINES:
        module = importlib.import_module(f"pipelines.{name}")
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(module.PIPELINE, str(path))
        written.append(path)
    return written
