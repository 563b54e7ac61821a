"""Per-item results: one model's outcome on one item, the accuracy line logged as a set
finishes, and the JSONL item files the report folder keeps."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("patchgap.stages.evaluate")


@dataclass
class ItemResult:
    """One model's outcome on one item."""

    id: str
    correct: bool
    prediction: str | None = None
    gold: str | None = None
    text: str | None = None
    num_tokens: int | None = None
    gold_logprob: float | None = None
    gold_logprob_norm: float | None = None
    gold_choice_logprob: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def log_accuracy(model: Path, bench: str, items: Sequence[ItemResult], seconds: float) -> None:
    """One log line per finished (model, benchmark): accuracy, items and time."""
    accuracy = sum(r.correct for r in items) / max(1, len(items))
    log.info(
        "%s %s: acc %.3f on %d items (%.1f s)", model.name, bench, accuracy, len(items), seconds
    )


def write_jsonl_sets(folder: Path, sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """One ``<name>.jsonl`` file per set in ``folder``, a row per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
