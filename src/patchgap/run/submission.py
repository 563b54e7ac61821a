"""A run YAML as a cluster submission (``patchgap submit --config RUN.yaml``): the preflight, D
staged in the configured store, pi0 and the evaluation sets put in S3 where they are local, and
the pipeline arguments the compiled pipeline takes, the same ones a local run passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError
from patchgap.run.execute import pipeline_arguments
from patchgap.run.inputs import inputs_to_s3
from patchgap.run.preflight import run_preflight
from patchgap.run.prepare import Say, prepare_run


def submission_arguments(config_path: Path, say: Say = print) -> tuple[str, dict[str, Any]]:
    """(pipeline name, its arguments) for ``config_path``; every input the pods read is in S3
    or is a hub id they resolve themselves. Nothing is uploaded unless the preflight passed."""
    report = run_preflight(config_path, docker=False, hub_here=False, say=say)
    report.raise_for_failures()
    say(report.summary())
    adapter = report.settings.adapter_uri if report.settings else None
    if report.settings and report.settings.pipeline == "rewrite" and adapter:
        if not adapter.startswith("s3://"):
            raise ConfigError(
                f"{config_path} [run.adapter_uri]: {adapter} is on this machine and pods read "
                f"s3:// only: `patchgap models push {adapter} s3://BUCKET/adapters/NAME`, then "
                "set adapter_uri to that URI"
            )
    prepared = prepare_run(config_path, start_embedded_s3=False, hub_here=False, say=say)
    inputs_to_s3(prepared, say)
    return prepared.settings.pipeline, pipeline_arguments(prepared)
