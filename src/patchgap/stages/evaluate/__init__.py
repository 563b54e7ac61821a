"""Stage evaluate: score base pi0, SFT on D and SFT on D_R (and any other model) on downstream math
and general benchmarks, and write the forgetting table and report.

The package's parts: :mod:`.config` (contract and settings), :mod:`.models` (which models, and
releasing each before the next loads), :mod:`.state` (the resume store), :mod:`.generative` (math
and boxed-letter sets), :mod:`.harness` (general benchmarks through lm-eval), :mod:`.continuous`
(drift and held-out NLL, gold log-probabilities), :mod:`.items` (per-item results and files) and
:mod:`.metrics` (flat KFP metrics). This module runs them per model and writes the report.

The scoring functions are called through this module's names (``generative_eval``,
``lm_eval_general``, ``continuous_eval``, ``pi0_answers``), so that replacing one here, as the
resume tests do to see what runs, takes effect.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.data.evalsets import render_lm_eval_tasks
from patchgap.reports.evaluation import write_report
from patchgap.reports.forgetting import forgetting_table
from patchgap.settings import data_dir as default_data_dir
from patchgap.stages.evaluate.config import (
    INPUTS,
    NAME,
    OPTIONAL_INPUTS,
    OUTPUTS,
    Config,
    DriftSettings,
    HeldoutSettings,
    MathSet,
    ModelEntry,
)
from patchgap.stages.evaluate.continuous import (
    DRIFT,
    DRIFT_ANSWERS,
    HELDOUT_PREFIX,
    continuous_eval,
    continuous_values,
    drift_questions,
    heldout_items,
    pi0_answers,
)
from patchgap.stages.evaluate.generative import _choice_items, _math_items, generative_eval
from patchgap.stages.evaluate.harness import gold_logprobs, lm_eval_general
from patchgap.stages.evaluate.items import ItemResult, write_jsonl_sets
from patchgap.stages.evaluate.metrics import kfp_metrics
from patchgap.stages.evaluate.models import model_key, released, resolve_models
from patchgap.stages.evaluate.state import NOT_IN_FINGERPRINT, EvalState, fingerprint

__all__ = [
    "DRIFT",
    "DRIFT_ANSWERS",
    "HELDOUT_PREFIX",
    "INPUTS",
    "NAME",
    "NOT_IN_FINGERPRINT",
    "OPTIONAL_INPUTS",
    "OUTPUTS",
    "Config",
    "DriftSettings",
    "EvalState",
    "HeldoutSettings",
    "ItemResult",
    "MathSet",
    "ModelEntry",
    "_choice_items",
    "_math_items",
    "continuous_eval",
    "continuous_values",
    "drift_questions",
    "fingerprint",
    "generative_eval",
    "gold_logprobs",
    "heldout_items",
    "kfp_metrics",
    "lm_eval_general",
    "pi0_answers",
    "released",
    "resolve_models",
    "run",
]

log = logging.getLogger("patchgap.stages.evaluate")

#: Per item, for one model: benchmark -> item id -> right or wrong.
Scores = dict[str, dict[str, bool]]
#: Per item, for one model: continuous measure -> item id -> value.
Values = dict[str, dict[str, float]]
#: One model's results so far: benchmark -> items, lm-eval aggregates, lm-eval sample logs.
ModelResults = tuple[dict[str, list[ItemResult]], dict[str, Any], dict[str, list[dict[str, Any]]]]


@dataclass
class EvalSets:
    """What every model is scored on, loaded once per run."""

    data_dir: Path
    math: dict[str, list[Any]]
    choice: dict[str, list[Any]]
    tasks_dir: Path | None  # lm-eval task files of the project sets; None without `general`
    heldout: dict[str, list[Any]]

    @property
    def downstream(self) -> list[str]:
        return list(self.math)


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    out = outputs["report"]
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
    started = time.time()
    scores: dict[str, Scores] = {}
    values: dict[str, Values] = {}
    aggregates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="patchgap-eval-") as tmp:
        work = Path(tmp)
        models = resolve_models(config, inputs.get("models"), work / "models")
        sets = _load_sets(config, data_dir, work)
        state = EvalState.open(config.state_uri, out, fingerprint(config))
        answers = _drift_answers(config, models, drift_questions(config, data_dir), state)
        if answers:
            write_jsonl_sets(out / "drift", {"pi0_answers": answers})
        for label, path in models.items():
            log.info("evaluating %s (%s)", label, path)
            scores[label], values[label], model_aggregates = _score_model(
                config, label, path, state, sets, answers, out
            )
            if model_aggregates is not None:
                aggregates[label] = model_aggregates
    table = _forgetting_table(config, sets, scores, values)
    info = {
        "models": {k: str(v) for k, v in models.items()},
        "limit": config.limit,
        "seed": config.seed,
        "mc_metric": config.mc_metric,
        "drift_questions": len(answers),
        "heldout_items": {n: len(v) for n, v in sets.heldout.items()},
        "seconds": round(time.time() - started, 1),
    }
    write_report(table, out, info, {"lm_eval": aggregates})
    # The report is complete: the per-benchmark state would only duplicate it.
    state.discard()
    return kfp_metrics(table)


def _load_sets(config: Config, data_dir: Path, work: Path) -> EvalSets:
    math_sets = _math_items(config, data_dir)
    choice_sets = _choice_items(config, data_dir)
    tasks_dir = None
    if config.general:
        tasks_dir = render_lm_eval_tasks(work / "tasks", data_dir, config.benchmark_paths)
    heldout = heldout_items(config, data_dir)
    return EvalSets(data_dir, math_sets, choice_sets, tasks_dir, heldout)


def _score_model(
    config: Config,
    label: str,
    path: Path,
    state: EvalState,
    sets: EvalSets,
    answers: Sequence[Mapping[str, Any]],
    out: Path,
) -> tuple[Scores, Values, dict[str, Any] | None]:
    """One model on every set (kept results reused), its item files written; returns its
    scores, its continuous values and its lm-eval aggregates (None without lm-eval sets)."""
    results, aggregates, logs = _evaluate_model(config, path, state, sets.math, sets.choice)
    lm_eval_aggregates = None
    if sets.tasks_dir is not None:
        _general_results(config, path, state, sets, (results, aggregates, logs))
        lm_eval_aggregates = aggregates
        write_jsonl_sets(out / "lm_eval_samples" / label, logs)
    continuous = _continuous_model(config, path, state, answers, sets.heldout)
    write_jsonl_sets(
        out / "items" / label,
        {b: [r.as_dict() for r in items] for b, items in results.items()} | continuous,
    )
    scores = {b: {r.id: r.correct for r in items} for b, items in results.items()}
    general_items = {b: results[b] for b in config.general if b in results}
    model_values = continuous_values(
        general_items, continuous, config.gold_logprob, config.mc_metric == "acc_norm"
    )
    return scores, model_values, lm_eval_aggregates


def _general_results(
    config: Config, path: Path, state: EvalState, sets: EvalSets, so_far: ModelResults
) -> None:
    """Run the general benchmarks this model has no kept result for through lm-eval, saving
    each, and add them to ``so_far`` (results, aggregates, sample logs)."""
    results, aggregates, logs = so_far
    pending = [b for b in config.general if b not in results]
    if not pending or sets.tasks_dir is None:
        return
    sub = config.model_copy(update={"general": pending})
    general, new_aggregates, new_logs = lm_eval_general(sub, path, sets.data_dir, sets.tasks_dir)
    key = model_key(path)
    for bench, items in general.items():
        extra = {"aggregate": new_aggregates.get(bench), "samples": new_logs.get(bench)}
        state.save(key, bench, items, **extra)
    results.update(general)
    aggregates.update(new_aggregates)
    logs.update(new_logs)


def _forgetting_table(
    config: Config,
    sets: EvalSets,
    scores: Mapping[str, Scores],
    values: Mapping[str, Values],
) -> dict[str, Any]:
    general = [f"{n}_gen" for n in sets.choice] + list(config.general)
    return forgetting_table(
        scores,
        sets.downstream,
        general,
        base=config.base,
        baseline=config.baseline,
        rewritten=config.rewritten,
        near_zero=config.near_zero,
        bootstrap_reps=config.bootstrap_reps,
        seed=config.seed,
        values=values,
    )


def _evaluate_model(
    config: Config,
    path: Path,
    state: EvalState,
    math_sets: Mapping[str, Sequence[Any]],
    choice_sets: Mapping[str, Sequence[Any]],
) -> ModelResults:
    """Reuse every saved result of this model; run the generative sets still missing, saving
    each as it finishes. Returns results, lm-eval aggregates and sample logs reused so far."""
    key = model_key(path)
    results: dict[str, list[ItemResult]] = {}
    aggregates: dict[str, Any] = {}
    logs: dict[str, list[dict[str, Any]]] = {}
    benches = [*math_sets, *(f"{n}_gen" for n in choice_sets), *config.general]
    for bench in benches:
        saved = state.load(key, bench)
        if saved is None:
            continue
        results[bench] = saved["items"]
        if saved.get("aggregate") is not None:
            aggregates[bench] = saved["aggregate"]
        if saved.get("samples") is not None:
            logs[bench] = saved["samples"]
    if results:
        log.info("evaluate: %s: reusing %d finished benchmark(s)", path.name, len(results))
    todo_math = {n: v for n, v in math_sets.items() if n not in results}
    todo_choice = {n: v for n, v in choice_sets.items() if f"{n}_gen" not in results}
    results.update(
        generative_eval(
            config,
            path,
            todo_math,
            todo_choice,
            on_set=lambda bench, items: state.save(key, bench, items),
        )
    )
    return results, aggregates, logs


def _drift_answers(
    config: Config,
    models: Mapping[str, Path],
    questions: Sequence[tuple[str, str, str]],
    state: EvalState,
) -> list[dict[str, Any]]:
    """pi0's drift answers: reused from the state when saved, else generated once and saved."""
    if not questions:
        return []
    base = models.get(config.base)
    if base is None:
        log.warning("evaluate: no model labelled %r (pi0): drift is not scored", config.base)
        return []
    key = model_key(base)
    saved = state.load_rows(key, DRIFT_ANSWERS)
    wanted = [f"{b}:{i}" for b, i, _ in questions]
    if saved is not None and [r.get("id") for r in saved["items"]] == wanted:
        log.info("evaluate: reusing pi0's %d drift answers", len(wanted))
        return saved["items"]
    rows = pi0_answers(config, base, questions)
    state.save_rows(key, DRIFT_ANSWERS, rows)
    return rows


def _continuous_model(
    config: Config,
    path: Path,
    state: EvalState,
    answers: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Reuse this model's saved continuous metrics; score those still missing, saving each."""
    key = model_key(path)
    results: dict[str, list[dict[str, Any]]] = {}
    wanted = ([DRIFT] if answers else []) + [f"{HELDOUT_PREFIX}{n}" for n in heldout]
    for metric in wanted:
        saved = state.load_rows(key, metric)
        if saved is not None:
            results[metric] = saved["items"]
    todo_answers = answers if DRIFT in wanted and DRIFT not in results else []
    todo_heldout = {n: v for n, v in heldout.items() if f"{HELDOUT_PREFIX}{n}" not in results}
    results.update(
        continuous_eval(
            config,
            path,
            todo_answers,
            todo_heldout,
            on_metric=lambda metric, rows: state.save_rows(key, metric, rows),
        )
    )
    return {m: results[m] for m in wanted if m in results}
