"""The SFT calibration sweep's figures and decision rule (``benchmarks/sft_sweep.py`` runs the
sweep): grid points ``lr:epochs``, the paired differences of a fine-tuned model against the base
on the same items, and the rule, fixed before the sweep ran, that picks the setting every SFT row
of a run uses. Kept here rather than in the script because the rule decides results and is
tested like the rest of the package.

The rule: a setting qualifies when its held-out NLL falls (CI below 0) and it forgets
significantly (P(gold | choices) falls with p < 0.05, or, failing that on every setting, the drift
rises with p < 0.05). Of the qualifying settings the one that forgets most (largest fall in
P(gold | choices), then the largest drift) is chosen.
"""

from __future__ import annotations

from typing import Any

from patchgap.errors import ConfigError
from patchgap.reports.stats import paired_mean_diff


def parse_grid(text: str) -> list[tuple[float, float]]:
    """``"2e-5:1,1e-4:3"`` -> [(2e-5, 1.0), (1e-4, 3.0)]; a part without ``:epochs`` is a
    :class:`ConfigError` naming it."""
    grid = []
    for part in text.split(","):
        lr, _, epochs = part.partition(":")
        if not epochs:
            raise ConfigError(f"--grid: {part!r} is not lr:epochs")
        grid.append((float(lr), float(epochs)))
    return grid


def tag(lr: float, epochs: float) -> str:
    """The folder and key name of one grid point, e.g. ``lr0.0001-ep2``."""
    return f"lr{lr:g}-ep{epochs:g}"


def tag_plain(chosen: dict[str, Any]) -> str:
    """A chosen row as the sweep's last line writes it, ``<lr>:<epochs>``."""
    return f"{chosen['lr']:g}:{chosen['epochs']:g}"


def paired(model: dict[str, Any], base: dict[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    """Paired differences (model - base) of each figure of the sweep: P(gold | choices) and
    acc_norm in points, pooled over the general benchmarks; drift and held-out NLL per token."""
    out: dict[str, dict[str, Any]] = {}
    for metric, scale in (("gold_choice_prob", 100.0), ("acc_norm", 100.0)):
        a, b = [], []
        for bench, items in base["general"].items():
            for rid, v in items.items():
                w = model["general"][bench].get(rid)
                if w is None or v[metric] is None or w[metric] is None:
                    continue
                a.append(scale * w[metric])
                b.append(scale * v[metric])
        out[metric] = paired_mean_diff(a, b, 2000, seed).as_dict()
    for metric in ("drift_nll", "heldout_nll_gsm8k"):
        bv = {r["id"]: r["nll"] for r in base["nll"][metric] if r["nll"] is not None}
        mv = {r["id"]: r["nll"] for r in model["nll"][metric] if r["nll"] is not None}
        ids = [i for i in bv if i in mv]
        diff = paired_mean_diff([mv[i] for i in ids], [bv[i] for i in ids], 2000, seed)
        out[metric] = diff.as_dict()
    return out


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pre-stated rule (see the module's docstring); None when no setting qualifies."""
    fits = [r for r in rows if r["diff"]["heldout_nll_gsm8k"]["high"] < 0]

    def forgets_p(r: dict[str, Any]) -> bool:
        d = r["diff"]["gold_choice_prob"]
        return d["diff"] < 0 and d["p_bootstrap"] < 0.05

    def drifts(r: dict[str, Any]) -> bool:
        d = r["diff"]["drift_nll"]
        return d["diff"] > 0 and d["p_bootstrap"] < 0.05

    ok = [r for r in fits if forgets_p(r)] or [r for r in fits if drifts(r)]
    if not ok:
        return None
    return min(
        ok, key=lambda r: (r["diff"]["gold_choice_prob"]["diff"], -r["diff"]["drift_nll"]["diff"])
    )
