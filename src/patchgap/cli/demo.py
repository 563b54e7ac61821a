"""``patchgap demo``: the main job on the embedded default. Checks every input of configs/demo.yaml
(the preflight), starts the local S3 server, stages the demo dataset in it, prepares the demo
model, then runs the full pipeline."""

from __future__ import annotations

from pathlib import Path

import typer

from patchgap.cli.output import plain_printer
from patchgap.logs import setup_logging
from patchgap.settings import configs_dir


def default_demo_config() -> Path:
    path = configs_dir() / "demo.yaml"
    if not path.is_file():
        raise typer.BadParameter(f"{path} not found; pass --config")
    return path


def demo(
    config: Path | None = typer.Option(None, "--config", "-c", help="run YAML (default: demo)"),
    prepare_only: bool = typer.Option(
        False, "--prepare-only", help="start S3, stage data and model, do not run the pipeline"
    ),
) -> None:
    """Run all five stages on a small real model with local S3 (what `make demo` calls)."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.run.execute import run_pipeline
    from patchgap.run.preflight import check_and_prepare

    setup_logging()
    say = plain_printer()
    cfg_path = config or default_demo_config()
    # The preflight first: a broken input is reported before the server starts.
    prepared = check_and_prepare(cfg_path, start_embedded_s3=True, say=say)
    if prepare_only:
        return
    run_pipeline(prepared, say=say)
