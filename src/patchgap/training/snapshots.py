"""Snapshots of a model along training: which optimizer steps get one (fractions of the run's
steps) and where they lie (the callback that takes them is in :mod:`.callbacks`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Folder inside a trained model's folder that holds its snapshots, one ``step-<N>`` each.
SNAPSHOTS_DIR = "snapshots"


def snapshot_folder(step: int) -> str:
    """The folder name of the snapshot taken after optimizer step ``step``."""
    return f"step-{step}"


def snapshot_steps(fractions: Sequence[float], total_steps: int) -> list[int]:
    """The optimizer steps at ``fractions`` of ``total_steps``: rounded up, at least 1, at most
    ``total_steps``, deduplicated, ascending."""
    if total_steps < 1:
        return []
    return sorted({min(total_steps, max(1, math.ceil(f * total_steps - 1e-9))) for f in fractions})
