"""The reproduction report of one published run: dataset construction (gate figures for the RL
rewriter and the prompt-only baseline), accuracies, forgetting, and whether SFT on D_R forgets
less than SFT on D, rendered from the run's own artifacts in the object store.

``patchgap artifacts report RUN --out docs/results.md`` writes it; nothing here recomputes a
figure: every number comes from the run's ``run.json``, its gates' ``gate_metrics.json``, its
rewrite shard summaries and its evaluation ``results.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError, StoreError
from patchgap.fsutil import write_bytes_atomic, write_text_atomic
from patchgap.reports.evaluation import md_table, table_sections
from patchgap.storage.store import join_uri

_GATE = re.compile(r"(?:^|/)(gate(?:-\d+)?)/report/gate_metrics\.json$")
_REWRITE = re.compile(r"(?:^|/)(rewrite(?:-\d+)?)/[^/]+/summary-\d+-of-\d+\.json$")
_RESULTS = re.compile(r"(?:^|/)(evaluate(?:-\d+)?)/report/results\.json$")
_SCATTER = re.compile(r"(?:^|/)(evaluate(?:-\d+)?)/report/scatter\.png$")

RL = "RL rewriter"
PROMPT_ONLY = "prompt-only"


@dataclass
class RunResults:
    """Everything the report needs, as read from one run's outputs."""

    run_id: str
    manifest: dict[str, Any]
    gates: dict[str, dict[str, float]] = field(default_factory=dict)  # by rewriter label
    rewrites: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    scatter_png: bytes | None = None


def _suffix(task: str) -> str:
    return task.split("-", 1)[1] if "-" in task else ""


def collect(store: Any, prefix: str, keys: Sequence[str] | Mapping[str, str]) -> RunResults:
    """Read a run's manifest and report files from ``prefix`` (keys relative to it). A mapping
    gives each key the URI its bytes lie at (an output's objects lie under its upload attempt,
    see ``Store.list_published``); a plain sequence means they lie at ``prefix/key``."""

    def where(key: str) -> str:
        return keys[key] if isinstance(keys, Mapping) else join_uri(prefix, key)

    def read_json(key: str) -> Any:
        uri = where(key)
        try:
            return json.loads(store.get_bytes(uri))
        except json.JSONDecodeError as err:
            raise StoreError(f"{uri}: not valid JSON ({err})") from err

    if "run.json" not in keys:
        raise StoreError(f"{prefix}: no run.json; the run has not been published (yet)")
    manifest = read_json("run.json")
    out = RunResults(run_id=str(manifest.get("run_id", "")), manifest=manifest)

    summaries: dict[str, list[dict[str, Any]]] = {}
    gates: dict[str, dict[str, float]] = {}
    for key in sorted(keys):
        if m := _REWRITE.search(key):
            summaries.setdefault(m.group(1), []).append(read_json(key))
        elif m := _GATE.search(key):
            gates[m.group(1)] = read_json(key)
        elif _RESULTS.search(key):
            out.evaluation = read_json(key)
        elif _SCATTER.search(key):
            out.scatter_png = store.get_bytes(where(key))

    # A gate reads the candidates of the rewrite task with the same suffix (the pipeline defines
    # them in pairs); the rewrite's own summary says whether an adapter was loaded.
    for task, metrics in gates.items():
        rewrite = "rewrite" + (f"-{_suffix(task)}" if _suffix(task) else "")
        shard_summaries = summaries.get(rewrite, [])
        if shard_summaries:
            adapter = "adapter" in str(shard_summaries[0].get("rewriter", ""))
            label = RL if adapter else PROMPT_ONLY
        else:
            label = RL if task == "gate" else PROMPT_ONLY  # first gate defined is the RL one
        if label in out.gates:
            raise StoreError(f"{prefix}: two gates look like the {label} gate ({task})")
        out.gates[label] = metrics
        out.rewrites[label] = shard_summaries
    return out


def _num(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(float(v), fmt)


def construction_rows(results: RunResults) -> list[list[str]]:
    labels = [x for x in (PROMPT_ONLY, RL) if x in results.gates]
    rows = [["figure (under pi0)", *labels]]
    spec = [
        ("records", "records", ".0f"),
        ("accepted (rewrite kept)", "accepted_count", ".0f"),
        ("fallback to the reference", "fallback_count", ".0f"),
        ("acceptance rate", "acceptance_rate", ".1%"),
        ("mean NLL of D", "mean_nll_d", ".3f"),
        ("mean NLL of D_R", "mean_nll_d_r", ".3f"),
        ("NLL gap (D - D_R)", "nll_gap", "+.3f"),
        ("mean tokens D", "mean_tokens_d", ".0f"),
        ("mean tokens D_R", "mean_tokens_d_r", ".0f"),
        ("embedding distance D", "diversity_d_embedding_distance", ".4f"),
        ("embedding distance D_R", "diversity_d_r_embedding_distance", ".4f"),
        ("distinct-1 D_R", "diversity_d_r_distinct_1", ".3f"),
        ("distinct-2 D_R", "diversity_d_r_distinct_2", ".3f"),
        ("distinct-2 D", "diversity_d_distinct_2", ".3f"),
    ]
    for name, key, fmt in spec:
        rows.append([name, *(_num(results.gates[x].get(key), fmt) for x in labels)])
        if key == "nll_gap":
            # The gap above counts every fallback as 0; this one is over the accepted alone.
            rows.append(
                [
                    "NLL gap, accepted records only, paired [95% CI]",
                    *(_accepted_gap(results.gates[x]) for x in labels),
                ]
            )
    if any(
        results.gates[x].get(k) is not None
        for x in labels
        for k in ("accepted_greedy", "accepted_sample")
    ):
        rows.append(
            [
                "accepted greedy / sampled candidates",
                *(
                    f"{_num(results.gates[x].get('accepted_greedy', 0), '.0f')} / "
                    f"{_num(results.gates[x].get('accepted_sample', 0), '.0f')}"
                    for x in labels
                ),
            ]
        )
    rows.append(["judge", *(_judge(results.gates[x]) for x in labels)])
    rows.append(
        [
            "rewrite tokens/s",
            *(
                _num(_mean([s["metrics"].get("tokens_per_s") for s in results.rewrites[x]]), ".1f")
                for x in labels
            ),
        ]
    )
    return rows


def _accepted_gap(metrics: dict[str, Any]) -> str:
    if metrics.get("nll_gap_accepted_n") is None:
        return "n/a"  # a gate from before this figure existed
    # Deferred: it loads numpy.
    from patchgap.reports.gate import gap_text

    return gap_text(metrics)


def _judge(metrics: dict[str, Any]) -> str:
    if metrics.get("judge_description"):
        return str(metrics["judge_description"]).split(":", 1)[0]
    return "pi0" if metrics.get("judge") else "off"


def _mean(values: Sequence[float | None]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return sum(got) / len(got) if got else None


def _md(rows: list[list[str]]) -> str:
    return md_table(rows)


def render(results: RunResults, scatter_name: str | None = None) -> str:
    """The report as Markdown (no interpretation: that is the reader's, beside it)."""
    man = results.manifest
    env = man.get("environment") or {}
    inputs = man.get("inputs") or {}
    counts = inputs.get("dataset_counts") or {}
    lines = [
        f"## Run `{results.run_id}`",
        "",
        f"- status: {man.get('status')}, finished {man.get('finished_at')}, pipeline "
        f"{_num((man.get('timings') or {}).get('pipeline_seconds'), '.0f')} s "
        f"(`{man.get('pipeline')}` pipeline)",
        f"- config: `{man.get('config_file')}`; git commit `{env.get('git_commit')}`",
        f"- D: `{inputs.get('dataset_uri')}` ({counts.get('selected', 'n/a')} records), "
        f"sha256 `{inputs.get('dataset_sha256')}`",
        f"- outputs: `{man.get('uri')}`",
        "",
    ]
    if results.gates:
        lines += ["### Dataset construction (gate)", "", _md(construction_rows(results)), ""]
    ev = results.evaluation
    if ev is None:
        lines += ["No evaluation results in this run.", ""]
        return "\n".join(lines)
    lines += table_sections(
        ev["forgetting_table"],
        "###",
        "F = acc_base - acc on each general benchmark (percentage points); reduction = "
        "1 - F_R / F_D; p (F>0): paired bootstrap of the mean forgetting against the base; "
        "p (F_R vs F_D): paired bootstrap of the mean difference against SFT on D.",
    )
    if scatter_name:
        lines += [f"![gain vs forgetting]({scatter_name})", ""]
    return "\n".join(lines)


BEGIN = "<!-- patchgap report: begin -->"
END = "<!-- patchgap report: end -->"


def write(results: RunResults, out: Path) -> Path:
    """Write the report to ``out`` (Markdown) and its scatter plot beside it.

    When ``out`` already holds the two marker comments, only the text between them is replaced,
    so a hand-written interpretation around the generated tables survives a re-run.
    """
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    marked = BEGIN in old and END in old and old.index(BEGIN) < old.index(END)
    if old.strip() and not marked:
        # A file of the user's own (a README) is never replaced wholesale by a report.
        raise ConfigError(
            f"--out {out}: exists and has no '{BEGIN}' ... '{END}' markers; add them where "
            "the report goes, or choose a new file"
        )
    scatter = None
    if results.scatter_png is not None:
        scatter = out.with_name(f"{out.stem}-scatter.png")
        write_bytes_atomic(scatter, results.scatter_png)
    body = render(results, scatter.name if scatter else None)
    if marked:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    else:
        text = f"{BEGIN}\n{body}\n{END}\n"
    write_text_atomic(out, text)
    return out
