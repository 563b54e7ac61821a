"""``patchgap demo``: the main job on the embedded default. Starts the local S3 server, stages the
demo dataset in it, prepares the demo model, then runs the full pipeline of configs/demo.yaml."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(markup=False, emoji=False, highlight=False)


def default_demo_config() -> Path:
    from patchgap.settings import configs_dir

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
    from patchgap.logs import setup_logging
    from patchgap.run.execute import run_pipeline
    from patchgap.run.prepare import prepare_run

    setup_logging()
    cfg_path = config or default_demo_config()
    prepared = prepare_run(cfg_path, start_embedded_s3=True, say=console.print)
    if prepare_only:
        return
    run_pipeline(prepared, say=console.print)
