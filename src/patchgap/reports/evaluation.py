"""The evaluation report: the forgetting table and per-benchmark accuracies as Markdown and
self-contained HTML, with plots (grouped bars per benchmark, gain vs forgetting), the paired
continuous metrics beside them (gold-choice log-probability, drift from pi0, held-out NLL), and
a JSON of every number."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from patchgap.fsutil import write_text_atomic
from patchgap.reports.stats import format_p as _p


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.1%}" if signed else f"{v:.1%}"


def accuracy_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """One row per model: accuracy with its 95% interval on every benchmark."""
    benches = [*table["downstream"], *table["general"]]
    rows = [["model", *benches]]
    for label, row in table["models"].items():
        cells = [label]
        for b in benches:
            a = row["accuracy"].get(b)
            cells.append(
                "n/a"
                if a is None
                else f"{a['acc']:.1%} [{a['low']:.1%}, {a['high']:.1%}] n={a['n']}"
            )
        rows.append(cells)
    return rows


def forgetting_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """One row per tuned model: gain, forgetting per benchmark and mean, reduction, significance."""
    gen = table["general"]
    head = ["model", "downstream gain", *(f"F {b}" for b in gen), "F mean", "p (F>0)"]
    head += ["reduction (mean of ratios)", "reduction (of mean)", "p (F_R vs F_D)"]
    rows = [head]
    for label, row in table["models"].items():
        if label == table["base"]:
            continue
        test = row.get("forgetting_mean_test") or {}
        diff = row.get("forgetting_diff_test") or {}
        cells = [label, _pct(row["gain_mean"], True)]
        cells += [_pct(row["forgetting"].get(b), True) for b in gen]
        cells += [_pct(row["forgetting_mean"], True), _p(test.get("p_bootstrap"))]
        if "reduction" in row:
            cells += [
                _pct(row["reduction_mean_of_ratios"], True),
                _pct(row["reduction_of_mean"], True),
                _p(diff.get("p_bootstrap")),
            ]
        else:
            cells += ["-", "-", "-"]
        rows.append(cells)
    return rows


def metric_label(metric: str) -> str:
    """How a continuous metric key reads in a table."""
    name, _, arg = metric.partition(":")
    return {
        "gold_logprob": f"log P(gold) {arg} (nats/item)",
        "gold_logprob_norm": f"log P(gold) per char {arg}",
        "gold_choice_prob": f"P(gold | choices) {arg} (soft accuracy)",
        "drift_nll": "drift: NLL of pi0's answers (nats/token)",
        "heldout_nll": f"held-out NLL {arg} (nats/token)",
    }.get(name, metric)


def _num(v: float | None, fmt: str = "+.4f") -> str:
    return "n/a" if v is None else format(float(v), fmt)


def _fmts(metric: str) -> tuple[str, str]:
    """Number formats (level, signed difference) of a metric: probabilities in percent."""
    return (".2%", "+.2%") if metric.partition(":")[0] == "gold_choice_prob" else (".4f", "+.4f")


def _ci(test: Mapping[str, Any] | None, fmt: str = "+.4f") -> str:
    if not test:
        return "n/a"
    return f"{_num(test['diff'], fmt)} [{_num(test['low'], fmt)}, {_num(test['high'], fmt)}]"


def continuous_model_rows(
    table: Mapping[str, Any], label: str, against: str = "base"
) -> list[list[str]]:
    """One tuned model's continuous metrics against the base (``against="base"``) or, for a
    rewritten model, against SFT on D (``"baseline"``): the other model's and this model's mean,
    the mean paired difference (this - other) with its 95% interval, p, n and the SD of the
    per-item differences."""
    cont = table.get("continuous") or {}
    row = (cont.get("models") or {}).get(label) or {}
    other = cont.get(against) or against
    rows = [["metric", other, label, f"delta (model - {other}) [95% CI]", "p", "n", "SD of delta"]]
    for metric in cont.get("metrics", []):
        t = row.get(f"vs_{against}", {}).get(metric)
        if not t:
            continue
        rows.append(
            [
                metric_label(metric),
                _num(t["mean_b"], _fmts(metric)[0]),
                _num(t["mean_a"], _fmts(metric)[0]),
                _ci(t, _fmts(metric)[1]),
                _p(t["p_bootstrap"]),
                str(t["n"]),
                _num(t["sd_diff"], _fmts(metric)[0]),
            ]
        )
    return rows


def continuous_forgetting_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """One row per tuned model: forgetting in each gold log-probability form, drift from pi0 and
    held-out NLL change, each with a 95% interval and p against the base."""
    cont = table.get("continuous") or {}
    measures = cont.get("measures") or {}
    rows = [["model"]]
    for name in measures.values():
        head = "drift" if name == "drift from pi0" else f"F {name}"
        rows[0] += [f"{head} [95% CI]", f"p ({head})"]
    rows[0] += ["held-out NLL change [95% CI]", "p (held-out)"]
    for label, row in (cont.get("models") or {}).items():
        cells = [label]
        for m in measures:
            f = row["forgetting"].get(m)
            cells += [_ci(f, _fmts(m)[1]), _p(f["p_bootstrap"] if f else None)]
        h = row.get("heldout")
        cells += [_ci(h), _p(h["p_bootstrap"] if h else None)]
        rows.append(cells)
    return rows


def continuous_reduction_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """One row per rewritten model and measure: D - R against SFT on D with its interval and p,
    and the reduction 1 - R / D."""
    cont = table.get("continuous") or {}
    measures = cont.get("measures") or {}
    rows = [["model", "measure", "D - R [95% CI]", "p", "reduction 1 - R/D"]]
    for label, row in (cont.get("models") or {}).items():
        for m, test in (row.get("forgetting_diff") or {}).items():
            red = (row.get("reduction") or {}).get(m)
            cells = [label, measures.get(m, m), _ci(test, _fmts(m)[1]), _p(test["p_bootstrap"])]
            rows.append(cells + [_pct(red, True)])
    return rows


def continuous_verdicts(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For every rewritten model and measure: does SFT on D_R lose less gold log-probability, or
    drift less from pi0, than SFT on D, by the paired tests (``holds``: favours D_R with
    p < ALPHA)?"""
    cont = table.get("continuous") or {}
    measures = cont.get("measures") or {}
    out = []
    for label, row in (cont.get("models") or {}).items():
        for m, test in (row.get("forgetting_diff") or {}).items():
            diff, p = float(test["diff"]), float(test["p_bootstrap"])
            out.append(
                {
                    "model": label,
                    "baseline": cont.get("baseline"),
                    "measure": measures.get(m, m),
                    "key": m,
                    "d_minus_r": diff,
                    **_verdict(diff, test, p),
                }
            )
    return out


def _verdict(diff: float, test: dict, p: float) -> dict:
    """CI, p and the verdict of "D_R forgets less than D" for one paired difference D - R."""
    return {
        "low": float(test["low"]),
        "high": float(test["high"]),
        "p": p,
        "holds": diff > 0 and p < ALPHA,
        "reversed": diff < 0 and p < ALPHA,  # D_R significantly forgets more
        "direction": "less" if diff > 0 else ("more" if diff < 0 else "equal"),
    }


def _status(verdict: Mapping[str, Any]) -> str:
    if verdict["holds"]:
        return "holds"
    if verdict["reversed"]:
        return "does not hold, the reverse does,"
    return "is not shown"


def continuous_verdict_sentences(table: Mapping[str, Any]) -> list[str]:
    lines = []
    for v in continuous_verdicts(table):
        status = _status(v)
        f = _fmts(v["key"])[1]
        lines.append(
            f"forgetting in {v['measure']}: {v['model']} < {v['baseline']} {status} at this "
            f"size: D - R = {format(v['d_minus_r'], f)} [95% CI {format(v['low'], f)}, "
            f"{format(v['high'], f)}], p = {_p(v['p'])}."
        )
    return lines


CONTINUOUS_NOTE = (
    "Paired per item against the base. log P(gold): lm-eval's log-likelihood of the gold choice "
    "on every general item (nats). P(gold | choices): its probability among the choices "
    "(softmax of their log-likelihoods), the accuracy of a model that answers by sampling: it "
    "moves in points like acc, but every item counts, not only the ones that flip. Per char: "
    "log P(gold) divided by the choice's length, as acc_norm compares. Drift: the NLL per token, "
    "under each model, of pi0's own greedy answers to a fixed set of general questions (model - "
    "base estimates KL(pi0 || model) per token on pi0's outputs). Held-out NLL: the NLL per "
    "token of held-out reference solutions in SFT's chat format. Intervals and p: paired "
    "bootstrap over items."
)
CONTINUOUS_F_NOTE = (
    "F = the mean over general benchmarks of what the gold choice lost (base - model: nats per "
    "item for log P(gold), points for P(gold | choices); positive = forgetting); drift and "
    "held-out NLL change are model - base (nats per token; drift positive = moved away from "
    "pi0, held-out negative = learned). Below, SFT on D_R against SFT on D: D - R > 0 when D_R "
    "forgets (or drifts) less; reduction 1 - R/D only where SFT on D's value is significantly "
    "positive."
)

CONTINUOUS_VS_D_NOTE = (
    "The same metrics paired per item between each model tuned on a rewritten D_R and SFT on D: "
    "a held-out NLL delta near 0 means the same downstream fit (the gain difference is minus "
    "it), a positive P(gold | choices) or negative drift delta means D_R kept more of pi0."
)

ALPHA = 0.05
VERDICT_TEST = (
    "paired bootstrap over items (2,000 resamples within each general benchmark, so each keeps "
    "its weight) of the mean over benchmarks of acc(SFT on D_R) - acc(SFT on D) = F_D - F_R, "
    f"two-sided, alpha = {ALPHA}"
)


def forgetting_verdicts(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For every rewritten model: does SFT on D_R forget less than SFT on D, by the paired test?

    ``holds`` is True only when the mean forgetting difference favours D_R and its two-sided
    paired-bootstrap p is below ``ALPHA``; ``direction`` says which way the point estimate leans.
    """
    out = []
    for label in table.get("rewritten", []):
        row = table["models"].get(label) or {}
        test = row.get("forgetting_diff_test")
        if not test:
            continue
        diff = float(test["diff"])  # F_D - F_R: positive when D_R forgets less
        p = float(test["p_bootstrap"])
        out.append(
            {
                "model": label,
                "baseline": table["baseline"],
                "f_d_minus_f_r": diff,
                **_verdict(diff, test, p),
            }
        )
    return out


CONTINUOUS_TEST = (
    "paired bootstrap over items of D - R (log P(gold) and P(gold | choices): resampled within "
    "each general benchmark, the mean over benchmarks of R's value minus D's; "
    f"drift: the mean of NLL_D - NLL_R on pi0's answers), two-sided, alpha = {ALPHA}"
)


def verdict_sentences(table: Mapping[str, Any]) -> list[str]:
    lines = []
    for v in forgetting_verdicts(table):
        claim = f"forgetting({v['model']}) < forgetting({v['baseline']})"
        status = _status(v)
        lines.append(
            f"{claim} {status} at this size: F_D - F_R = {v['f_d_minus_f_r']:+.1%} "
            f"[95% CI {v['low']:+.1%}, {v['high']:+.1%}], p = {_p(v['p'])}; the point estimate "
            f"says {v['model']} forgets {v['direction']}"
            + (" than" if v["direction"] != "equal" else " as much as")
            + f" {v['baseline']}."
        )
    return lines


def render_text(table: Mapping[str, Any], width: int) -> str:
    """The accuracy and forgetting tables and the verdicts as terminal text ``width`` wide.

    The tables are transposed, one column per model: a run has a handful of models but any
    number of benchmarks, so the columns stay few enough to fit a terminal without cutting."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    grids = [
        ("Accuracy (95% Wilson interval)", "benchmark", accuracy_rows(table)),
        (f"Forgetting against {table['baseline']}", "", forgetting_rows(table)),
    ]
    if table.get("continuous"):
        grids.append(("Forgetting, continuous (paired)", "", continuous_forgetting_rows(table)))
    for title, first, rows in grids:
        grid = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for head in (first, *(r[0] for r in rows[1:])):
            grid.add_column(head, overflow="fold")
        for i, label in enumerate(rows[0][1:], start=1):
            grid.add_row(label, *(r[i] for r in rows[1:]))
        console.print(grid, markup=False)
    for line in verdict_sentences(table) + continuous_verdict_sentences(table):
        console.print(line, markup=False)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def md_table(rows: list[list[str]]) -> str:
    # a "|" inside a cell (log P(gold | choices)) would end the cell
    rows = [[c.replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_bars(table: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: accuracy per benchmark (x) for every model (bars), with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [*table["downstream"], *table["general"]]
    labels = list(table["models"])
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(benches) * max(1, len(labels)) / 2), 4))
    for k, label in enumerate(labels):
        accs, errs = [], [[], []]
        for b in benches:
            a = table["models"][label]["accuracy"].get(b)
            acc = a["acc"] if a else 0.0
            accs.append(acc)
            errs[0].append(acc - a["low"] if a else 0.0)
            errs[1].append(a["high"] - acc if a else 0.0)
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(benches))]
        ax.bar(xs, accs, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(benches)))
    ax.set_xticklabels(benches, rotation=30, ha="right")
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scatter(table: Mapping[str, Any], path: Path) -> Path:
    """Downstream gain (x) against average forgetting (y), one point per tuned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for label, row in table["models"].items():
        if label == table["base"]:
            continue
        x, y = row["gain_mean"], row["forgetting_mean"]
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("downstream gain over base (mean)")
    ax.set_ylabel("forgetting (mean acc_base - acc)")
    ax.set_title("gain vs forgetting: right and low is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table_sections(table: Mapping[str, Any], level: str, note: str) -> list[str]:
    """Markdown lines: accuracy table, the continuous metrics per tuned model, forgetting tables
    (after ``note``), verdicts, caveats."""
    lines = [f"{level} Accuracy (95% Wilson interval)", "", md_table(accuracy_rows(table)), ""]
    cont = table.get("continuous")
    if cont and cont.get("models"):
        lines += [f"{level} Continuous metrics against the base", "", CONTINUOUS_NOTE, ""]
        for label in cont["models"]:
            lines += [f"{level}# {label}", "", md_table(continuous_model_rows(table, label)), ""]
        paired_with_d = [k for k, r in cont["models"].items() if r.get("vs_baseline")]
        if paired_with_d:
            lines += [f"{level} SFT on D_R against SFT on D", "", CONTINUOUS_VS_D_NOTE, ""]
            for label in paired_with_d:
                rows = continuous_model_rows(table, label, "baseline")
                lines += [f"{level}# {label}", "", md_table(rows), ""]
    lines += [
        f"{level} Forgetting",
        "",
        f"Base: `{table['base']}`; SFT on D: `{table['baseline']}`. {note}",
        "",
        md_table(forgetting_rows(table)),
        "",
    ]
    if cont and cont.get("models"):
        lines += [f"{level}# Forgetting in continuous metrics", "", CONTINUOUS_F_NOTE, ""]
        lines += [md_table(continuous_forgetting_rows(table)), ""]
        reductions = continuous_reduction_rows(table)
        if len(reductions) > 1:
            lines += [md_table(reductions), ""]
    verdicts = verdict_sentences(table)
    more = continuous_verdict_sentences(table)
    if verdicts or more:
        lines += [f"{level}# Does SFT on D_R forget less than SFT on D?", ""]
        lines += [f"- {v}" for v in verdicts + more] + [""]
        if verdicts:
            lines += [f"Test: {VERDICT_TEST}.", ""]
        if more:
            lines += [f"Test of the continuous measures: {CONTINUOUS_TEST}.", ""]
    caveats = list(table.get("caveats") or []) + list((cont or {}).get("caveats") or [])
    if caveats:
        lines += [f"{level}# Caveats", ""] + [f"- {c}" for c in caveats] + [""]
    return lines


def render_markdown(table: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    lines = ["# patchgap evaluation", ""]
    if extra:
        lines += [f"- {k}: {v}" for k, v in extra.items()] + [""]
    lines += table_sections(
        table,
        "##",
        "Forgetting F = acc_base - acc on each general benchmark; reduction = 1 - F_R / F_D. "
        "p-values: paired bootstrap over items (per-benchmark McNemar tests are in results.json).",
    )
    lines += ["![accuracy per benchmark](bars.png)", "", "![gain vs forgetting](scatter.png)", ""]
    return "\n".join(lines)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"/>'


def render_html(
    table: Mapping[str, Any], bars: Path, scatter: Path, extra: Mapping[str, Any] | None = None
) -> str:
    meta = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (extra or {}).items()
    )
    cont = table.get("continuous") or {}
    caveats = "".join(
        f"<li>{html.escape(c)}</li>" for c in [*table["caveats"], *cont.get("caveats", [])]
    )
    continuous = ""
    if cont.get("models"):
        continuous = (
            f"<h2>Continuous metrics against the base</h2><p>{html.escape(CONTINUOUS_NOTE)}</p>"
            + "".join(
                f"<h3>{html.escape(label)}</h3>{_html_table(continuous_model_rows(table, label))}"
                for label in cont["models"]
            )
            + "".join(
                f"<h3>{html.escape(label)} against SFT on D</h3>"
                + _html_table(continuous_model_rows(table, label, "baseline"))
                for label, row in cont["models"].items()
                if row.get("vs_baseline")
            )
            + f"<h3>Forgetting in continuous metrics</h3><p>{html.escape(CONTINUOUS_F_NOTE)}</p>"
            + _html_table(continuous_forgetting_rows(table))
            + (
                _html_table(continuous_reduction_rows(table))
                if len(continuous_reduction_rows(table)) > 1
                else ""
            )
            + "<ul>"
            + "".join(f"<li>{html.escape(v)}</li>" for v in continuous_verdict_sentences(table))
            + f"</ul><p>Test: {html.escape(CONTINUOUS_TEST)}.</p>"
        )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f4f4f4}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>patchgap evaluation</title>"
        f"<style>{style}</style></head><body><h1>patchgap evaluation</h1><ul>{meta}</ul>"
        f"<h2>Accuracy (95% Wilson interval)</h2>{_html_table(accuracy_rows(table))}"
        f"<h2>Forgetting</h2><p>F = acc_base - acc; reduction = 1 - F_R / F_D against "
        f"{html.escape(str(table['baseline']))}.</p>{_html_table(forgetting_rows(table))}"
        + (
            "<h3>Does SFT on D_R forget less than SFT on D?</h3><ul>"
            + "".join(f"<li>{html.escape(v)}</li>" for v in verdict_sentences(table))
            + f"</ul><p>Test: {html.escape(VERDICT_TEST)}.</p>"
            if table.get("rewritten")
            else ""
        )
        + continuous
        + (f"<h3>Caveats</h3><ul>{caveats}</ul>" if caveats else "")
        + f"<h2>Plots</h2>{_img(bars)}{_img(scatter)}</body></html>"
    )


def write_report(
    table: Mapping[str, Any],
    out_dir: Path,
    extra: Mapping[str, Any] | None = None,
    numbers: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (plots inlined), ``bars.png``, ``scatter.png`` and
    ``results.json`` (the table plus ``numbers``) into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = plot_bars(table, out_dir / "bars.png")
    scatter = plot_scatter(table, out_dir / "scatter.png")
    md = out_dir / "report.md"
    write_text_atomic(md, render_markdown(table, extra))
    page = out_dir / "report.html"
    write_text_atomic(page, render_html(table, bars, scatter, extra))
    res = out_dir / "results.json"
    payload = {
        "forgetting_table": table,
        "verdicts": forgetting_verdicts(table),
        "continuous_verdicts": continuous_verdicts(table),
        **(numbers or {}),
        "info": dict(extra or {}),
    }
    write_text_atomic(res, json.dumps(payload, indent=2, sort_keys=True, default=str))
    return {"markdown": md, "html": page, "json": res, "bars": bars, "scatter": scatter}
