"""More than one GPU in the pod: re-run a training stage (train-rewriter, sft) under ``accelerate
launch`` with a DeepSpeed ZeRO or FSDP config from configs/accelerate/, one process per GPU. We
write no distributed runtime: accelerate starts the processes, TRL/transformers do the rest. Past
one node, Kubeflow Trainer (a TrainJob, patchgap.kfp.trainjob) starts the same entrypoint under
torchrun on every node instead.

``PATCHGAP_PROCESSES=N`` forces N processes through the same path: on a machine without a GPU
they run on the CPU (configs/accelerate/cpu.yaml: torchrun, gloo), which is how the distributed
test tier exercises this code without a GPU."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from patchgap.errors import ConfigError, PatchgapError
from patchgap.settings import configs_dir

log = logging.getLogger("patchgap.training.launch")

#: Set in the children so they never re-launch again.
CHILD_ENV = "PATCHGAP_DISTRIBUTED_CHILD"
#: Force this many processes (N >= 1); on the CPU when no GPU is visible.
PROCESSES_ENV = "PATCHGAP_PROCESSES"
#: Where the accelerate configs are when the package runs outside a checkout (images copy them).
CONFIG_DIR_ENV = "PATCHGAP_ACCELERATE_CONFIG_DIR"


def in_distributed_process() -> bool:
    """True inside a process started by accelerate/torchrun (or one of our children)."""
    return (
        os.environ.get(CHILD_ENV) == "1"
        or int(os.environ.get("WORLD_SIZE", "1")) > 1
        or "LOCAL_RANK" in os.environ
    )


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_count(stage: str | None = None) -> tuple[int, bool]:
    """How many processes to run and whether on the CPU: ``PATCHGAP_PROCESSES`` when set (at most
    the visible GPUs, any number on a machine without one), else one per visible GPU."""
    gpus = visible_gpus()
    raw = os.environ.get(PROCESSES_ENV, "").strip()
    if not raw:
        return gpus, False
    where = f"{stage + ': ' if stage else ''}{PROCESSES_ENV}={raw!r}"
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{where}: expected a whole number of processes, 1 or more")
    n = int(raw)
    if gpus and n > gpus:
        raise ConfigError(f"{where}: more processes than the {gpus} visible GPU(s)")
    return n, gpus == 0


def accelerate_config_dir() -> Path:
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)

    return configs_dir() / "accelerate"


def accelerate_config(strategy: str, explicit: str | None = None, stage: str | None = None) -> Path:
    """The accelerate config file for ``zero2``, ``zero3`` or ``fsdp`` (or the explicit one)."""
    path = Path(explicit) if explicit else accelerate_config_dir() / f"{strategy}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{stage + ': ' if stage else ''}accelerate config {path} not found; set "
            f"accelerate_config or {CONFIG_DIR_ENV} to the folder holding {strategy}.yaml"
        )
    return path


def launch_command(
    config_file: Path,
    num_processes: int,
    run_yaml: Path,
    stage: str,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
) -> list[str]:
    """``python -m accelerate.commands.launch ... -m patchgap.stages.<stage> --config ...``; the
    run YAML holds the stage's config under its own section."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_processes",
        str(num_processes),
        "-m",
        f"patchgap.stages.{stage}",
        "--config",
        str(run_yaml),
        "--section",
        stage,
    ]
    for name, path in sorted(inputs.items()):
        cmd += ["--input", f"{name}={path}"]
    for name, path in sorted(outputs.items()):
        cmd += ["--output", f"{name}={path}"]
    return cmd


def maybe_relaunch(
    config: Any,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
    stage: str,
    *,
    auto: str = "zero2",
    summary_name: str = "summary.json",
) -> dict[str, Any] | None:
    """Run ``stage`` under accelerate when more than one GPU is visible (or ``PATCHGAP_PROCESSES``
    asks for more than one process); None = run here.

    ``config.distributed`` names the accelerate config; its ``auto`` stands for the stage's
    ``auto`` argument (zero2 unless the stage passes another: sft, full fine-tuning, zero3). The
    children get the same config (with a shared ``work_dir``, so they see one checkpoint folder)
    and write into the same local output folders; the main one writes the summary
    (``summary_name`` in the ``metrics`` output), which is what this returns. Errors name
    ``stage``.
    """
    if config.distributed == "none" or in_distributed_process():
        return None
    n, on_cpu = process_count(stage)
    if n <= 1:
        return None
    # DeepSpeed and FSDP want GPUs; on the CPU the processes run plain data parallel over gloo.
    strategy = "cpu" if on_cpu else auto if config.distributed == "auto" else config.distributed
    explicit = None if on_cpu else config.accelerate_config
    config_file = accelerate_config(strategy, explicit, stage)
    with tempfile.TemporaryDirectory(prefix=f"patchgap-{stage}-launch-") as tmp:
        work = Path(config.work_dir) if config.work_dir else Path(tmp) / "work"
        child = config.model_copy(update={"work_dir": str(work)})
        run_yaml = Path(tmp) / "run.yaml"
        run_yaml.write_text(yaml.safe_dump({stage: child.model_dump(mode="json")}))
        cmd = launch_command(config_file, n, run_yaml, stage, inputs, outputs)
        where = "CPU processes" if on_cpu else "GPUs"
        log.info("%d %s: re-launching %s under accelerate (%s)", n, where, stage, config_file.name)
        proc = subprocess.run(cmd, env={**os.environ, CHILD_ENV: "1"}, check=False)
        if proc.returncode != 0:
            raise PatchgapError(
                f"{stage}: `accelerate launch` with {config_file} on {n} {where} exited "
                f"with status {proc.returncode} (see the log above)"
            )
    summary = Path(outputs["metrics"]) / summary_name
    if not summary.is_file():
        raise PatchgapError(f"{stage}: distributed run wrote no {summary}")
    # Numbers as floats, as the stage returns them; lists (sft's snapshot_steps) as they are.
    return {
        k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        for k, v in json.loads(summary.read_text()).items()
    }
