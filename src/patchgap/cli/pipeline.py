"""``patchgap compile`` and ``patchgap run``: compile the KFP pipelines; run one locally."""

from __future__ import annotations

from pathlib import Path

import typer

from patchgap.cli import print_error
from patchgap.cli.output import plain_printer
from patchgap.errors import PatchgapError
from patchgap.logs import setup_logging
from patchgap.pipelines.compile import compile_all


def compile_pipelines(
    names: list[str] | None = typer.Argument(
        None, help="full | rewrite | watch (default: all)", show_default=False
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="folder for <name>.yaml (default: the current folder)"
    ),
) -> None:
    """Compile pipelines to YAML for KFP: <name>.yaml in the current folder or --out DIR."""
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
    check: bool = typer.Option(
        False,
        "--check",
        help="only the preflight: check the YAML, data, evaluation sets, models (and images "
        "with --docker); starts and writes nothing; exit 0 when all pass, 2 otherwise",
    ),
) -> None:
    """Run a pipeline on this machine: check every input, stage data and model in S3, run,
    publish the run."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.run.preflight import check_and_prepare, run_preflight

    setup_logging()
    say = plain_printer()
    if check:
        report = run_preflight(config, docker=docker or None, say=say)
        report.raise_for_failures()
        say(report.summary())
        return
    # Deferred: kept out of the CLI's start-up.
    from patchgap.run.execute import run_pipeline

    prepared = check_and_prepare(config, docker=docker, start_embedded_s3=embedded_s3, say=say)
    run_pipeline(prepared, say=say)
