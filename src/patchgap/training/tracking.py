"""Experiment tracking for train-rewriter and sft (``report_to``: tensorboard, mlflow or none).

The Trainer's own integrations do the logging. TensorBoard writes event files under
``<trainer output>/runs/<run>/``; :func:`tensorboard_sync` uploads them to the store beside the
checkpoints at every checkpoint and at the end, and copies them into the stage's metrics output.
MLflow reads its server and experiment from ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``.
The KFP Metrics artifacts are written either way.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from patchgap.errors import ConfigError
from patchgap.storage.store import Store, join_uri

log = logging.getLogger("patchgap.training.tracking")

ReportTo = Literal["none", "tensorboard", "mlflow"]
REPORT_TO_HELP = (
    "experiment tracking: tensorboard (event files go to the store beside the checkpoints and "
    "into the metrics output), mlflow (server from MLFLOW_TRACKING_URI) or none"
)
TENSORBOARD_DIR = "tensorboard"
_RUNS = "runs"  # the Trainer's TensorBoard folder under its output_dir


def report_to(choice: ReportTo) -> list[str]:
    """The Trainer's ``report_to`` for ``choice``, refusing a tracker that is not installed."""
    if choice == "none":
        return []
    if importlib.util.find_spec(choice) is None:
        raise ConfigError(
            f"report_to={choice}: the {choice} package is not installed; "
            f"pip install 'patchgap[{choice}]'"
        )
    return [choice]


def tensorboard_sync(uri: str | None, copy_to: Path, store: Any | None = None) -> Any:
    """A TrainerCallback that uploads the event files under ``<output_dir>/runs`` to ``uri`` (at
    each checkpoint and at the end; None: no upload) and copies them into ``copy_to`` at the end."""
    from transformers import TrainerCallback

    def upload(runs: Path) -> None:
        if uri is None or not runs.is_dir():
            return

        target = store or Store.from_env()
        # One folder per Trainer run: a resumed training adds its own beside the earlier ones.
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            target.upload_dir(run, join_uri(uri, run.name), {"kind": "tensorboard"})

    class TensorBoardSync(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.is_world_process_zero:
                upload(Path(args.output_dir) / _RUNS)

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if not state.is_world_process_zero:
                return
            runs = Path(args.output_dir) / _RUNS
            if not runs.is_dir():
                log.warning("report_to=tensorboard wrote no event files under %s", runs)
                return
            # The Trainer's TensorBoardCallback comes first and has closed its writer by now.
            upload(runs)
            shutil.copytree(runs, copy_to, dirs_exist_ok=True)
            log.info("TensorBoard logs in %s", ", ".join(str(x) for x in (uri, copy_to) if x))

    return TensorBoardSync()
