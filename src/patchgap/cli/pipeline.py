"""``patchgap compile`` and ``patchgap run``: compile the KFP pipelines; run one locally."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(markup=False, emoji=False, highlight=False)


def compile_pipelines(
    out_dir: Path | None = typer.Option(
        None, "--out", help="folder for the YAML (default: pipelines/compiled)"
    ),
) -> None:
    """Compile every pipeline (full, rewrite, watch) to YAML for KFP."""
    from patchgap.pipelines.compile import compile_all

    for path in compile_all(out_dir):
        typer.echo(str(path))


def run(
    config: Path = typer.Option(..., "--config", "-c", help="run YAML, e.g. configs/demo.yaml"),
    docker: bool = typer.Option(
        False, "--docker", help="run the stage images with kfp.local.DockerRunner"
    ),
    embedded_s3: bool = typer.Option(
        True,
        "--embedded-s3/--no-embedded-s3",
        help="start the local S3 server if no endpoint is set",
    ),
) -> None:
    """Run a pipeline on this machine: stage data and model in S3, run, publish the run."""
    from patchgap.logs import setup_logging
    from patchgap.run.execute import run_pipeline
    from patchgap.run.prepare import prepare_run

    setup_logging()
    prepared = prepare_run(config, start_embedded_s3=embedded_s3, say=console.print)
    if docker:
        prepared.settings = prepared.settings.model_copy(update={"runner": "docker"})
    run_pipeline(prepared, say=console.print)
