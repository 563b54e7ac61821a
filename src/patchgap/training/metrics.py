"""Per-step training metrics of the rewriter: one row per GRPO step built from TRL's logs, kept
as JSONL, summarised for KFP Metrics and drawn as reward curves.

Names follow the paper: ``reward`` is the mean gated total, ``r_task``/``r_dist``/``r_div`` the
per-term means (``r_dist``, ``r_div`` and ``nll`` over feasible rewrites only, as
:func:`patchgap.reward.rewards.term_means` computes them), ``gate_pass_rate`` the share of
rewrites with r_task = 1. ``reward_share`` is the reward function's share of the step's wall time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from patchgap.fsutil import write_text_atomic

#: Row key -> TRL log key (``reward/<term>`` come from the log_metric calls of
#: patchgap.reward.trl_adapter).
LOG_KEYS = {
    "epoch": "epoch",
    "reward": "reward",
    "reward_std": "reward_std",
    "r_task": "reward/r_task",
    "r_dist": "reward/r_dist",
    "r_div": "reward/r_div",
    "nll": "reward/nll",
    "judge_p_yes": "reward/judge_p_yes",
    "answer_ok": "reward/answer_ok",
    "feasible": "reward/feasible",
    "kl": "kl",
    "loss": "loss",
    "entropy": "entropy",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "completion_length": "completions/mean_length",
    "clipped_completions": "completions/clipped_ratio",
    "clip_ratio": "clip_ratio/region_mean",
    "frac_reward_zero_std": "frac_reward_zero_std",
}

#: Curves drawn in the plot, in order.
PLOT_TERMS = ("reward", "r_task", "r_dist", "r_div")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def row_from_logs(
    logs: Mapping[str, Any], step: int, step_seconds: float | None, reward_seconds: float | None
) -> dict[str, float | int | None]:
    """One metrics row from a TRL ``on_log`` payload plus the timings of that step.

    >>> row = row_from_logs({"reward": 1.2, "reward/r_task": 0.8, "kl": 0.01}, 3, 2.0, 0.5)
    >>> row["step"], row["reward"], row["gate_pass_rate"], row["reward_share"]
    (3, 1.2, 0.8, 0.25)
    """
    row: dict[str, float | int | None] = {"step": int(step)}
    for key, src in LOG_KEYS.items():
        row[key] = _num(logs.get(src))
    row["gate_pass_rate"] = row["r_task"]
    row["seconds_per_step"] = _num(step_seconds)
    row["reward_seconds"] = _num(reward_seconds)
    if step_seconds and reward_seconds is not None and step_seconds > 0:
        row["reward_share"] = round(min(1.0, reward_seconds / step_seconds), 6)
    else:
        row["reward_share"] = None
    return row


class MetricsLog:
    """Append-only JSONL of step rows; survives a restart through the checkpoint copy."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def restore(self, source: Path | None, up_to_step: int) -> None:
        """Load a checkpoint's rows, keeping steps <= ``up_to_step`` (the resume point)."""
        self.rows = []
        if source is not None and source.is_file():
            for line in source.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    if int(row.get("step", 0)) <= up_to_step:
                        self.rows.append(row)
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        # Re-logging a step after a resume replaces it instead of duplicating it.
        if any(r.get("step") == row.get("step") for r in self.rows):
            self.rows = [r for r in self.rows if r.get("step") != row.get("step")] + [row]
            self._rewrite()
            return
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        write_text_atomic(self.path, text)

    def save_copy(self, dest: Path) -> None:
        """Write the rows (deduplicated, in step order) to ``dest``."""
        rows = sorted(self.rows, key=lambda r: int(r.get("step", 0)))
        write_text_atomic(dest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _mean(values: Iterable[Any]) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return sum(nums) / len(nums) if nums else None


def summarize(rows: Sequence[Mapping[str, Any]], tail: int = 5) -> dict[str, float]:
    """Scalar figures for KFP Metrics: first/last values (means over up to ``tail`` steps, at
    most half the run each, so first and last never share a step) and run means.

    >>> s = summarize([{"step": 1, "reward": 0.5}, {"step": 2, "reward": 1.5}])
    >>> s["steps"], s["reward_first"], s["reward_last"]
    (2.0, 0.5, 1.5)
    """
    ordered = sorted(rows, key=lambda r: int(r.get("step", 0)))
    out: dict[str, float] = {"steps": float(ordered[-1]["step"]) if ordered else 0.0}
    if not ordered:
        return out
    tail = max(1, min(tail, len(ordered) // 2))
    head, last = ordered[:tail], ordered[-tail:]
    for key in ("reward", "r_task", "r_dist", "r_div", "nll", "gate_pass_rate", "kl", "loss"):
        first = _mean(r.get(key) for r in head)
        final = _mean(r.get(key) for r in last)
        if first is not None:
            out[f"{key}_first"] = first
        if final is not None:
            out[f"{key}_last"] = final
    for key in ("seconds_per_step", "reward_share", "completion_length"):
        value = _mean(r.get(key) for r in ordered)
        if value is not None:
            out[f"{key}_mean"] = value
    return out


def plot_reward_curves(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """A PNG with the reward and each term per step (top) and KL and loss (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods and CI
    import matplotlib.pyplot as plt

    ordered = sorted(rows, key=lambda r: int(r.get("step", 0)))
    steps = [int(r["step"]) for r in ordered]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key in PLOT_TERMS:
        ys = [_num(r.get(key)) for r in ordered]
        pts = [(s, y) for s, y in zip(steps, ys, strict=True) if y is not None]
        if pts:
            top.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=key)
    top.set_ylabel("reward (mean per step)")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize="small")
    for key in ("kl", "loss"):
        ys = [_num(r.get(key)) for r in ordered]
        pts = [(s, y) for s, y in zip(steps, ys, strict=True) if y is not None]
        if pts:
            bottom.plot(*zip(*pts, strict=True), marker=".", label=key)
    bottom.set_xlabel("GRPO step")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="best", fontsize="small")
    fig.suptitle(title or "rewriter training: reward curves")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
