"""``patchgap stage NAME``: run one stage alone from a run YAML and local paths or S3 URIs,
exactly as its container entrypoint would (both call :func:`patchgap.stages.base.run_from_args`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from patchgap.logs import setup_logging
from patchgap.stages import STAGES


def stage(
    name: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)} (dashes allowed)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="run YAML"),
    inputs: list[str] = typer.Option([], "--input", "-i", help="NAME=PATH_OR_S3_URI (repeat)"),
    outputs: list[str] = typer.Option([], "--output", help="NAME=PATH_OR_S3_URI (repeat)"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override (repeat)"),
    force: bool = typer.Option(False, "--force", help="recompute even when outputs are complete"),
) -> None:
    """Run one stage (train-rewriter, rewrite, gate, sft, evaluate) outside any pipeline."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.stages.base import run_from_args, stage_module

    setup_logging()
    module = stage_module(name)
    result = run_from_args(module, config, module.NAME, overrides, inputs, outputs, force=force)
    state = "skipped (already complete)" if result.skipped else f"done in {result.seconds:.1f}s"
    typer.echo(f"{module.NAME}: {state}")
    typer.echo(json.dumps(result.metrics, indent=2, sort_keys=True))
