"""KFP metric flattening: the forgetting table as flat ``<model>/<benchmark>/<measure>``
numbers for the component's Metrics artifact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def kfp_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """Flat numbers for KFP Metrics: accuracy per model and benchmark, forgetting, reduction."""
    flat: dict[str, float] = {}
    for label, row in table["models"].items():
        for bench, acc in row["accuracy"].items():
            flat[f"{label}/{bench}/acc"] = acc["acc"]
        for key in (
            "gain_mean",
            "forgetting_mean",
            "reduction_mean_of_ratios",
            "reduction_of_mean",
        ):
            if row.get(key) is not None:
                flat[f"{label}/{key}"] = float(row[key])
    continuous = table.get("continuous") or {}
    for label, row in (continuous.get("models") or {}).items():
        for metric, test in row.get("vs_base", {}).items():
            flat[f"{label}/{metric.replace(':', '/')}/delta"] = float(test["diff"])
        for measure, test in row.get("forgetting", {}).items():
            flat[f"{label}/forgetting/{measure}"] = float(test["diff"])
        for measure, value in (row.get("reduction") or {}).items():
            if value is not None:
                flat[f"{label}/reduction/{measure}"] = float(value)
    return flat
