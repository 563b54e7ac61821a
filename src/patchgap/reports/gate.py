"""The gate report: streaming statistics of D versus D_R, and their Markdown, HTML and PNG forms.

Two NLL gaps are reported. The overall one (mean NLL of D minus mean NLL of D_R over every
record) counts each fallback as a gap of 0, since D_R holds the reference there; the paired gap
over the accepted records alone (reference NLL minus chosen rewrite NLL, record by record, with a
seeded bootstrap 95% interval) says whether the rewrites that were kept sit closer to pi0 than
the references they replace.
"""

from __future__ import annotations

import base64
import html
import json
import math
import random
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchgap.fsutil import write_text_atomic
from patchgap.reports.stats import bootstrap_ci

REPORT_MD = "gate_report.md"
REPORT_HTML = "gate_report.html"
REPORT_PNG = "gate_plot.png"
METRICS_JSON = "gate_metrics.json"


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over all word n-grams of ``texts`` (0 when there are none)."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean of (1 - cos) / 2 over all pairs of rows (0 for fewer than two rows)."""
    m = embeddings.shape[0]
    if m < 2:
        return 0.0
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms == 0, 1.0, norms)
    # Sum of cosines over distinct pairs from the squared norm of the sum of unit rows.
    s = unit.sum(axis=0)
    cos_pairs = (float(s @ s) - float((unit * unit).sum())) / 2.0
    pairs = m * (m - 1) / 2.0
    return (1.0 - cos_pairs / pairs) / 2.0


def _is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _summary(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "max": math.nan}
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()),
    }


class GateStats:
    """Figures gathered one record at a time; memory grows only by a few numbers per record and
    a fixed-size seeded sample of texts for the diversity measures."""

    def __init__(
        self, sample_size: int = 1000, seed: int = 0, max_n: int = 2, judge: bool | str = True
    ):
        self.records = 0
        self.accepted = 0
        self.fallback = 0
        # The judge in words (the stage passes the scorer's description); True/False: on/off.
        if isinstance(judge, bool):
            judge = "on" if judge else "off (r_task = answer check)"
        self.judge = judge
        self.seed = seed
        self.reasons: Counter[str] = Counter()
        self.judge_failed: Counter[str] = Counter()
        self.chosen_by: Counter[str] = Counter()
        # Per accepted record with both NLLs finite: NLL(reference) - NLL(chosen rewrite).
        self.gap_accepted = array("d")
        self.fallback_reasons: Counter[str] = Counter()
        self.trials: Counter[int] = Counter()
        self.nll_d = array("d")
        self.nll_dr = array("d")
        self.len_d = array("i")
        self.len_dr = array("i")
        self.sample_size = sample_size
        self.max_n = max_n
        self._rng = random.Random(seed)
        self.sample_d: list[str] = []
        self.sample_dr: list[str] = []
        self.diversity: dict[str, float] = {}

    def add(
        self, rec: Any, decision: Any, nll_ref: float | None, n_tokens: int, ref_tokens: int
    ) -> None:
        self.records += 1
        if decision.status == "accepted":
            self.accepted += 1
            nll_dr = decision.nll
            if decision.trial is not None:
                self.trials[int(decision.trial)] += 1
            self.chosen_by[getattr(decision, "sampling", None) or "unknown"] += 1
            if _is_finite(nll_ref) and _is_finite(nll_dr):
                self.gap_accepted.append(float(nll_ref) - float(nll_dr))  # type: ignore[arg-type]
        else:
            self.fallback += 1
            self.fallback_reasons[decision.fallback_reason or "unknown"] += 1
            nll_dr = nll_ref
        for reason in decision.reasons:
            if reason not in ("chosen", "feasible"):
                self.reasons[reason] += 1
        # Decisions made without per-candidate judge details carry none (an empty tuple).
        failed_by_candidate = getattr(decision, "judge_failed", ()) or ()
        for reason, failed in zip(decision.reasons, failed_by_candidate, strict=False):
            if reason == "judge_rejected":
                self.judge_failed.update(failed)
        self.nll_d.append(nll_ref if nll_ref is not None else math.nan)
        self.nll_dr.append(nll_dr if nll_dr is not None else math.nan)
        self.len_d.append(ref_tokens)
        self.len_dr.append(n_tokens)
        # Reservoir sample (Algorithm R): a uniform sample of fixed size from a stream.
        if len(self.sample_dr) < self.sample_size:
            self.sample_d.append(rec.solution)
            self.sample_dr.append(decision.solution)
        else:
            j = self._rng.randrange(self.records)
            if j < self.sample_size:
                self.sample_d[j] = rec.solution
                self.sample_dr[j] = decision.solution

    def embed_diversity(self, embedder: Any) -> None:
        """Mean pairwise embedding distance of the D_R (and D) sample, and distinct-n."""
        for name, texts in (("d_r", self.sample_dr), ("d", self.sample_d)):
            emb = embedder.encode(texts) if len(texts) >= 2 else np.zeros((len(texts), 1))
            self.diversity[f"{name}_embedding_distance"] = mean_pairwise_distance(np.asarray(emb))
            for n in range(1, self.max_n + 1):
                self.diversity[f"{name}_distinct_{n}"] = distinct_n(texts, n)

    def accepted_gap(self) -> dict[str, float]:
        """The paired NLL gap over the accepted records: mean of NLL(y*) - NLL(chosen rewrite)
        with a seeded percentile-bootstrap 95% interval (NaN when nothing was accepted)."""
        gaps = list(self.gap_accepted)
        if not gaps:
            nan = math.nan
            return {
                "nll_gap_accepted": nan,
                "nll_gap_accepted_low": nan,
                "nll_gap_accepted_high": nan,
                "nll_gap_accepted_n": 0.0,
            }
        low, high = bootstrap_ci(gaps, seed=self.seed)
        return {
            "nll_gap_accepted": float(np.mean(gaps)),
            "nll_gap_accepted_low": low,
            "nll_gap_accepted_high": high,
            "nll_gap_accepted_n": float(len(gaps)),
        }

    def metrics(self) -> dict[str, float]:
        nll_d = _summary(self.nll_d)["mean"]
        nll_dr = _summary(self.nll_dr)["mean"]
        out = {
            "records": float(self.records),
            "accepted_count": float(self.accepted),
            "fallback_count": float(self.fallback),
            "acceptance_rate": self.accepted / self.records if self.records else 0.0,
            "mean_nll_d": nll_d,
            "mean_nll_d_r": nll_dr,
            # Positive: D_R sits closer to pi0's own distribution than D does.
            "nll_gap": nll_d - nll_dr,
            "mean_tokens_d": _summary(self.len_d)["mean"],
            "mean_tokens_d_r": _summary(self.len_dr)["mean"],
            **self.accepted_gap(),
        }
        for how, n in sorted(self.chosen_by.items()):
            out[f"accepted_{how}"] = float(n)
        for criterion, n in sorted(self.judge_failed.items()):
            out[f"judge_failed_{criterion}"] = float(n)
        out.update({f"diversity_{k}": v for k, v in self.diversity.items()})
        return out


def plot(stats: GateStats, path: Path) -> Path:
    """A three-panel PNG: reject reasons, NLL under pi0 (D vs D_R), lengths (D vs D_R)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    reasons = stats.reasons.most_common()
    ax = axes[0]
    if reasons:
        ax.bar([r for r, _ in reasons], [c for _, c in reasons], color="#c0504d")
        ax.tick_params(axis="x", rotation=20)
    else:
        ax.text(0.5, 0.5, "no rejected candidates", ha="center", va="center")
    ax.set_title(f"rejected candidates (acceptance {stats.metrics()['acceptance_rate']:.1%})")
    for ax, (a, b), title in (
        (axes[1], (stats.nll_d, stats.nll_dr), "mean token NLL under pi0"),
        (axes[2], (stats.len_d, stats.len_dr), "solution length (tokens)"),
    ):
        va = [v for v in a if math.isfinite(v)]
        vb = [v for v in b if math.isfinite(v)]
        if va or vb:
            bins = np.histogram_bin_edges(np.asarray(va + vb, dtype=float), bins=20)
            ax.hist(va, bins=bins, alpha=0.6, label="D (reference)")
            ax.hist(vb, bins=bins, alpha=0.6, label="D_R")
            ax.legend()
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def _sections(
    stats: GateStats, metrics: dict[str, float], extra: dict[str, Any]
) -> list[tuple[str, list[tuple[str, Any]]]]:
    len_d, len_dr = _summary(stats.len_d), _summary(stats.len_dr)
    nll_d, nll_dr = _summary(stats.nll_d), _summary(stats.nll_dr)
    return [
        (
            "Gate",
            [
                ("records", stats.records),
                ("accepted", stats.accepted),
                ("fallback (reference solution kept)", stats.fallback),
                ("acceptance rate", f"{metrics['acceptance_rate']:.1%}"),
                ("judge", stats.judge),
                *((f"fallback: {k}", v) for k, v in stats.fallback_reasons.most_common()),
                *((f"accepted at trial {k}", v) for k, v in sorted(stats.trials.items())),
                *((f"accepted {k} candidate", v) for k, v in sorted(stats.chosen_by.items())),
                *((f"input: {k}", v) for k, v in extra.items()),
            ],
        ),
        (
            "Rejected candidates by reason",
            [
                *stats.reasons.most_common(),
                *((f"judge: {k}", v) for k, v in stats.judge_failed.most_common()),
            ]
            or [("none", 0)],
        ),
        (
            "NLL under pi0 (mean token NLL, QA context)",
            [
                ("D mean / median", f"{_fmt(nll_d['mean'])} / {_fmt(nll_d['median'])}"),
                ("D_R mean / median", f"{_fmt(nll_dr['mean'])} / {_fmt(nll_dr['median'])}"),
                ("gap (D - D_R), fallbacks count 0", _fmt(metrics["nll_gap"])),
                (
                    "gap on the accepted records, paired (y* - rewrite) [95% CI]",
                    gap_text(metrics),
                ),
            ],
        ),
        (
            "Length (tokens)",
            [
                (
                    f"{name} mean / median / p90 / max",
                    " / ".join(_fmt(s[k]) for k in ("mean", "median", "p90", "max")),
                )
                for name, s in (("D", len_d), ("D_R", len_dr))
            ],
        ),
        (
            f"Diversity (sample of {len(stats.sample_dr)} records)",
            [(k.replace("_", " "), _fmt(v)) for k, v in stats.diversity.items()],
        ),
    ]


def gap_text(metrics: dict[str, Any]) -> str:
    """``+0.123 [+0.050, +0.200] n=71`` for the paired gap on the accepted records."""
    n = int(metrics.get("nll_gap_accepted_n") or 0)
    if n == 0:
        return "n/a (no accepted record)"
    return (
        f"{metrics['nll_gap_accepted']:+.3f} [{metrics['nll_gap_accepted_low']:+.3f}, "
        f"{metrics['nll_gap_accepted_high']:+.3f}] n={n}"
    )


def write_report(
    stats: GateStats, out_dir: Path, extra: dict[str, Any] | None = None
) -> dict[str, float]:
    """Write gate_report.md, gate_report.html (plot embedded), gate_plot.png, gate_metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    metrics = stats.metrics()
    png = plot(stats, out_dir / REPORT_PNG)
    sections = _sections(stats, metrics, extra)

    md = ["# Gate report", ""]
    for title, rows in sections:
        md += [f"## {title}", "", "| | |", "|---|---|"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in rows]
        md.append("")
    md += [f"![gate plot]({REPORT_PNG})", ""]
    write_text_atomic(out_dir / REPORT_MD, "\n".join(md))

    img = base64.b64encode(png.read_bytes()).decode("ascii")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Gate report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "td{border:1px solid #ccc;padding:4px 10px}</style></head><body>",
        "<h1>Gate report</h1>",
    ]
    for title, rows in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><table>")
        parts += [
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in rows
        ]
        parts.append("</table>")
    parts.append(f"<img alt='gate plot' src='data:image/png;base64,{img}' style='width:100%'>")
    parts.append("</body></html>")
    write_text_atomic(out_dir / REPORT_HTML, "\n".join(parts))

    full = {
        **metrics,
        "reasons": dict(stats.reasons),
        "fallback_reasons": dict(stats.fallback_reasons),
        "accepted_by_trial": {str(k): v for k, v in sorted(stats.trials.items())},
        "judge_description": stats.judge,
        **extra,
    }
    write_text_atomic(
        out_dir / METRICS_JSON,
        json.dumps(full, indent=2, sort_keys=True, default=_json_safe) + "\n",
    )
    return metrics


def _json_safe(x: Any) -> Any:
    return str(x)
