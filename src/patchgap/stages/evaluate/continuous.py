"""Continuous metrics: pi0's drift answers to a fixed sample of general questions, the NLL of
those answers and of held-out reference solutions under each model, and the per-item values
the forgetting report pairs against the base."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from patchgap.data import evalsets as bm
from patchgap.data.registry import named_sets
from patchgap.lm.generation import make_generator
from patchgap.lm.likelihood import CompletionScorer, chat_completion_ids
from patchgap.lm.models import apply_chat
from patchgap.progress import Progress
from patchgap.prompts import render
from patchgap.reward.reasoning import neutral_solution
from patchgap.stages.evaluate.config import Config
from patchgap.stages.evaluate.generative import generate_with_bar
from patchgap.stages.evaluate.items import ItemResult
from patchgap.stages.evaluate.models import released

log = logging.getLogger("patchgap.stages.evaluate")

#: State and item-file names of the continuous metrics (per model), and of pi0's drift answers.
DRIFT = "drift_nll"
DRIFT_ANSWERS = "drift_answers"
HELDOUT_PREFIX = "heldout_nll_"


def drift_questions(config: Config, data_dir: Path | None) -> list[tuple[str, str, str]]:
    """The fixed general questions pi0 answers for the drift metric: (benchmark, id, text)."""
    if not config.drift.enabled:
        return []

    names = config.drift.benchmarks
    if names is None:
        names = [b for b in config.general if b in named_sets("choice")]
    if not names:
        if config.general:  # without general benchmarks no forgetting is asked for at all
            log.warning(
                "evaluate: drift is on but no project multiple-choice set to draw questions "
                "from; set drift.benchmarks (e.g. [arc_easy, piqa]) or drift.enabled: false"
            )
        return []
    sets = {b: bm.load_mc_set(b, config.benchmark_paths.get(b), data_dir) for b in names}
    excluded = tuple(config.drift.exclude)
    if excluded:  # before the draw, so the sample stays the seeded one of what is left
        sets = {
            b: [i for i in items if not f"{b}:{i.id}".startswith(excluded)]
            for b, items in sets.items()
        }
    return bm.general_questions(sets, config.drift.questions, config.seed)


def heldout_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    """The held-out problems with reference solutions, a fixed seeded subset per set."""
    if not config.heldout.enabled:
        return {}

    return {
        name: bm.take_subset(
            bm.load_heldout_set(name, config.benchmark_paths.get(name), data_dir),
            config.heldout.limit,
            config.seed,
        )
        for name in config.heldout.sets
    }


def pi0_answers(
    config: Config, base_path: Path, questions: Sequence[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """pi0's greedy answer to every drift question (the texts every model is scored on)."""
    gen_cfg = config.generation.model_copy(update={"max_new_tokens": config.drift.max_new_tokens})
    started = time.time()
    with released(make_generator(base_path, None, gen_cfg, work=len(questions))) as generator:
        tokenizer = generator.tokenizer  # type: ignore[attr-defined]
        prompts = [apply_chat(tokenizer, [{"role": "user", "content": q}]) for _, _, q in questions]
        outputs = generate_with_bar(generator, prompts, base_path, "drift answers")
    rows = [
        {
            "id": f"{bench}:{item_id}",
            "benchmark": bench,
            "question": question,
            "answer": answer.text,
            "num_tokens": answer.num_tokens,
            "finish_reason": answer.finish_reason,
        }
        for (bench, item_id, question), (answer,) in zip(questions, outputs, strict=True)
    ]
    log.info(
        "%s: %d drift answers, %d tokens (%.1f s)",
        base_path.name,
        len(rows),
        sum(r["num_tokens"] for r in rows),
        time.time() - started,
    )
    return rows


def continuous_eval(
    config: Config,
    model_path: Path,
    answers: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Any]],
    on_metric: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """One model's NLL of pi0's drift answers (``answers``, may be empty) and of the held-out
    reference solutions (``heldout``), per item: ``nll`` (nats per token), ``tokens``,
    ``nll_sum``. ``on_metric`` is called as each metric finishes (to save it)."""
    if not answers and not heldout:
        return {}
    scorer = CompletionScorer.load(
        model_path,
        device=config.generation.device,
        dtype=config.generation.dtype,
        trust_remote_code=config.generation.trust_remote_code,
        max_batch_tokens=config.nll_batch_tokens,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    with released(scorer):
        for metric, ids, pairs in _nll_jobs(config, scorer.tokenizer, answers, heldout):
            started = time.time()
            with Progress(f"{model_path.name} {metric}", "items", total=len(pairs)) as bar:
                scored = scorer.score(pairs, progress=bar.update)
            rows = [
                {
                    "id": item_id,
                    "nll": score.mean if score.tokens else None,
                    "tokens": score.tokens,
                    "nll_sum": score.nll,
                }
                for item_id, score in zip(ids, scored, strict=True)
            ]
            results[metric] = rows
            _log_nll(model_path, metric, rows, time.time() - started)
            if on_metric is not None:
                on_metric(metric, rows)
    return results


def _log_nll(
    model_path: Path, metric: str, rows: Sequence[Mapping[str, Any]], seconds: float
) -> None:
    scored = [r["nll"] for r in rows if r["nll"] is not None]
    tokens = sum(r["tokens"] for r in rows)
    log.info(
        "%s %s: mean NLL %.4f nats/token on %d items, %d tokens (%.1f s, %.0f tokens/s)",
        model_path.name,
        metric,
        sum(scored) / max(1, len(scored)),
        len(rows),
        tokens,
        seconds,
        tokens / max(seconds, 1e-9),
    )


def _nll_jobs(
    config: Config,
    tokenizer: Any,
    answers: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Any]],
) -> list[tuple[str, list[str], list[tuple[list[int], list[int]]]]]:
    """(metric, item ids, (prompt, completion) token ids) for every NLL ``continuous_eval``
    scores."""
    jobs: list[tuple[str, list[str], list[tuple[list[int], list[int]]]]] = []
    if answers:
        # An answer cut at its token limit never closed its turn: score only its own tokens.
        pairs = [
            chat_completion_ids(
                tokenizer,
                answer["question"],
                answer["answer"],
                close_turn=answer["finish_reason"] == "stop",
            )
            for answer in answers
        ]
        jobs.append((DRIFT, [str(answer["id"]) for answer in answers], pairs))
    for name, records in heldout.items():
        template = config.heldout.prompt_template
        pairs = [
            chat_completion_ids(
                tokenizer,
                render(template, question=record.question),
                neutral_solution(record.solution)
                if config.heldout.form == "neutral"
                else record.solution,
                max_tokens=config.heldout.max_tokens,
            )
            for record in records
        ]
        jobs.append((f"{HELDOUT_PREFIX}{name}", [str(record.id) for record in records], pairs))
    return jobs


def continuous_values(
    general: Mapping[str, Sequence[ItemResult]],
    continuous: Mapping[str, Sequence[Mapping[str, Any]]],
    gold_logprob: bool = True,
    normalised: bool = True,
) -> dict[str, dict[str, float]]:
    """One model's per-item continuous values keyed as the forgetting report reads them:
    ``gold_logprob:<bench>``, ``gold_choice_prob:<bench>`` (the gold choice's probability among
    the choices), ``gold_logprob_norm:<bench>`` (with ``normalised``: when acc_norm is the
    headline), ``drift_nll``, ``heldout_nll:<set>`` (item id -> value)."""
    out: dict[str, dict[str, float]] = {}
    if gold_logprob:
        forms = {
            "gold_logprob": lambda r: r.gold_logprob,
            "gold_choice_prob": lambda r: (
                None if r.gold_choice_logprob is None else math.exp(r.gold_choice_logprob)
            ),
        }
        if normalised:
            forms["gold_logprob_norm"] = lambda r: r.gold_logprob_norm
        for bench, items in general.items():
            for form, get in forms.items():
                by_item = {r.id: v for r in items if (v := get(r)) is not None}
                if by_item:
                    out[f"{form}:{bench}"] = by_item
    for metric, rows in continuous.items():
        key = (
            f"heldout_nll:{metric.removeprefix(HELDOUT_PREFIX)}"
            if metric.startswith(HELDOUT_PREFIX)
            else metric
        )
        by_item = {str(r["id"]): float(r["nll"]) for r in rows if r.get("nll") is not None}
        if by_item:
            out[key] = by_item
    return out
