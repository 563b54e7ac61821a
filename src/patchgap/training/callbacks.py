"""TrainerCallbacks of the trainers: per-step metrics rows with the reward's share of the step
for train-rewriter, progress bars (steps, reward or loss, rate, ETA), and checkpoint upload to the
store for train-rewriter and sft, snapshots along sft."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from patchgap.progress import Progress
from patchgap.training.checkpoints import CHECKPOINT_PREFIX, METRICS_FILE, CheckpointStore
from patchgap.training.metrics import MetricsLog, row_from_logs
from patchgap.training.snapshots import snapshot_steps

log = logging.getLogger("patchgap.training")


class StepMetricsCallback(TrainerCallback):
    """Times each optimizer step and the reward calls inside it, writes one row per logged step.

    ``reward_seconds`` is a callable returning the reward function's cumulative scoring time
    (``GroupRewardFunction.seconds``); the difference over a step is that step's reward time.
    Only the main process writes.
    """

    def __init__(
        self, metrics: MetricsLog, reward_seconds: Any, progress: bool = True, total: int = 0
    ) -> None:
        self.metrics = metrics
        self.reward_seconds = reward_seconds
        self.progress = progress
        self.total = total
        self._bar: Any = None
        self._t0 = 0.0
        self._r0 = 0.0
        self._last: tuple[float | None, float | None] = (None, None)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.progress and state.is_world_process_zero:
            total = state.max_steps or self.total or None
            self._bar = Progress("GRPO", "step", total=total, initial=state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._t0 = time.perf_counter()
        self._r0 = float(self.reward_seconds())

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        step_s = time.perf_counter() - self._t0
        self._last = (step_s, float(self.reward_seconds()) - self._r0)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary log has no loss; it is not a step
        step_s, reward_s = self._last
        row = row_from_logs(logs, state.global_step, step_s, reward_s)
        self.metrics.append(row)
        if self._bar is not None:
            self._bar.set(
                state.global_step,
                reward=f"{row['reward']:.3f}" if row["reward"] is not None else "-",
                r_task=f"{row['r_task']:.2f}" if row["r_task"] is not None else "-",
                s_step=f"{step_s:.1f}" if step_s is not None else "-",
            )
        else:
            log.info(
                "step %d: reward %s, r_task %s, %.1f s/step",
                state.global_step,
                row["reward"],
                row["r_task"],
                step_s or 0.0,
            )

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ProgressCallback(TrainerCallback):
    """Optimizer steps as a :class:`~patchgap.progress.Progress` bar (rate, ETA) with the last
    logged ``keys`` (the loss); replaces the Trainer's own bar and its printed log dicts."""

    def __init__(self, desc: str, keys: tuple[str, ...] = ("loss",)) -> None:
        self.desc = desc
        self.keys = keys
        self._bar: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.is_world_process_zero:
            total = state.max_steps or None
            self._bar = Progress(self.desc, "step", total=total, initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self._bar is not None:
            self._bar.set(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if self._bar is not None and logs:
            figures = {k: f"{logs[k]:.4g}" for k in self.keys if isinstance(logs.get(k), float)}
            self._bar.set(state.global_step, **figures)

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CheckpointSyncCallback(TrainerCallback):
    """After the Trainer writes ``checkpoint-<step>`` locally, upload it (manifest last).

    With ``metrics``, the rows so far go into the checkpoint, so a resumed run keeps the whole
    curve. ``keep`` complete checkpoints stay in the store (None: all). The upload is
    synchronous: the next step starts only once the checkpoint is complete in the store, which
    is what bounds the loss on preemption to one checkpoint interval.
    """

    def __init__(
        self, checkpoints: CheckpointStore, keep: int | None, metrics: MetricsLog | None = None
    ) -> None:
        self.checkpoints = checkpoints
        self.keep = keep
        self.metrics = metrics
        self.uploaded: list[int] = []

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero:
            return
        step = state.global_step
        local = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
        if not local.is_dir():
            log.warning("checkpoint folder %s missing after save; not uploaded", local)
            return
        if self.metrics is not None:
            self.metrics.save_copy(local / METRICS_FILE)
        t0 = time.perf_counter()
        uri = self.checkpoints.upload(local, step)
        self.uploaded.append(step)
        log.info("checkpoint step %d uploaded to %s in %.1f s", step, uri, time.perf_counter() - t0)
        if self.keep:
            removed = self.checkpoints.prune(self.keep)
            if removed:
                log.info("pruned checkpoints of steps %s", removed)


class SnapshotCallback(TrainerCallback):
    """Calls ``save(step)`` on every process after each snapshot step but the last (the final
    model is saved by the trainer's owner anyway). Every process takes part because gathering
    sharded weights is a collective; ``save`` decides who writes."""

    def __init__(self, fractions: Sequence[float], save: Callable[[int], None]) -> None:
        self.fractions = list(fractions)
        self.save = save
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.steps = snapshot_steps(self.fractions, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        step = state.global_step
        if step in self.steps and step < state.max_steps:
            self.save(step)
