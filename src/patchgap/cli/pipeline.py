"""``patchgap compile`` and ``patchgap run``: compile the KFP pipelines; run one locally."""

from __future__ import annotations

from pathlib import Path

import typer

from patchgap.cli.output import plain_printer


def compile_pipelines(
    names: list[str] | None = typer.Argument(
        None, help="full | rewrite | watch (default: all)", show_default=False
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="folder for <name>.yaml (default: the current folder)"
    ),
) -> None:
    """Compile pipelines to YAML for KFP: <name>.yaml in the current folder or --out DIR."""
    from patchgap.cli import print_error
    from patchgap.errors import PatchgapError
    from patchgap.pipelines.compile import compile_all

    try:
        written = compile_all(out_dir, names)
    except PatchgapError as err:
        print_error(err)
        raise typer.Exit(2) from None
    for path in written:
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
    say = plain_printer()
    prepared = prepare_run(config, start_embedded_s3=embedded_s3, say=say)
    if docker:
        prepared.settings = prepared.settings.model_copy(update={"runner": "docker"})
    run_pipeline(prepared, say=say)
