"""Generative scoring: the math sets (boxed answer) and the boxed-letter multiple-choice sets,
answered greedily by one model through patchgap's generation path and scored per item."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from patchgap.answers import equivalent, extract_answer, extract_choice
from patchgap.data import evalsets as bm
from patchgap.lm.generation import make_generator
from patchgap.lm.models import apply_chat
from patchgap.progress import Progress
from patchgap.prompts import choice_eval_messages, math_eval_messages
from patchgap.stages.evaluate.config import Config
from patchgap.stages.evaluate.items import ItemResult, log_accuracy
from patchgap.stages.evaluate.models import released

#: Option letters of a boxed-letter item, in order.
CHOICE_LETTERS = "ABCDEFGHIJ"


def _math_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    """Each configured math set's fixed seeded subset, by name."""
    sets: dict[str, list[Any]] = {}
    for math_set in config.math:
        if math_set.path is not None:
            items = bm.load_mapped_set(math_set.path, math_set.fields, data_dir)
        else:
            # benchmark_paths moves a named set (to the run's S3 copy, say)
            moved = config.benchmark_paths.get(math_set.name)
            items = bm.load_math_set(math_set.name, data_dir, path=moved)
        sets[math_set.name] = bm.take_subset(items, config.limit_for(math_set.name), config.seed)
    return sets


def _choice_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    """Each configured boxed-letter set's fixed seeded subset, by name (without ``_gen``)."""
    sets = {}
    for name in config.choice:
        items = bm.load_mc_set(name, config.benchmark_paths.get(name), data_dir)
        sets[name] = bm.take_subset(items, config.limit_for(f"{name}_gen"), config.seed)
    return sets


def generative_eval(
    config: Config,
    model_path: Path,
    math_sets: Mapping[str, Sequence[Any]],
    choice_sets: Mapping[str, Sequence[Any]],
    on_set: Callable[[str, list[ItemResult]], None] | None = None,
) -> dict[str, list[ItemResult]]:
    """Greedy answers of one model to every math and boxed-letter item, scored per item;
    ``on_set`` is called as each set finishes (to save it)."""
    if not math_sets and not choice_sets:
        return {}
    work = sum(len(v) for v in math_sets.values()) + sum(len(v) for v in choice_sets.values())
    results: dict[str, list[ItemResult]] = {}
    with released(make_generator(model_path, None, config.generation, work=work)) as generator:
        sets = [(name, items, _score_math_set) for name, items in math_sets.items()]
        sets += [(f"{name}_gen", items, _score_choice_set) for name, items in choice_sets.items()]
        for bench, items, score_set in sets:
            started = time.time()
            scored = score_set(generator, model_path, bench, items)
            results[bench] = scored
            log_accuracy(model_path, bench, scored, time.time() - started)
            if on_set is not None:
                on_set(bench, scored)
    return results


def _score_math_set(
    generator: Any, model_path: Path, bench: str, items: Sequence[Any]
) -> list[ItemResult]:
    """One math set: the boxed answer (or choice letter, for a set with choices) against gold."""
    tokenizer = generator.tokenizer
    prompts = [apply_chat(tokenizer, math_eval_messages(item.question)) for item in items]
    outputs = generate_with_bar(generator, prompts, model_path, bench)
    scored = []
    for item, (answer,) in zip(items, outputs, strict=True):
        if item.choice_labels:
            prediction = extract_choice(answer.text, item.choice_labels)
            correct = prediction == item.gold
        else:
            prediction = extract_answer(answer.text)
            correct = equivalent(answer.text, item.gold)
        scored.append(
            ItemResult(item.id, correct, prediction, item.gold, answer.text, answer.num_tokens)
        )
    return scored


def _score_choice_set(
    generator: Any, model_path: Path, bench: str, items: Sequence[Any]
) -> list[ItemResult]:
    """One multiple-choice set in boxed-letter form: the boxed letter against the gold one."""
    tokenizer = generator.tokenizer
    prompts = []
    for item in items:
        question = f"{item.passage}\n\n{item.question}" if item.passage else item.question
        prompts.append(apply_chat(tokenizer, choice_eval_messages(question, item.options)))
    outputs = generate_with_bar(generator, prompts, model_path, bench)
    scored = []
    for item, (answer,) in zip(items, outputs, strict=True):
        prediction = extract_choice(answer.text, CHOICE_LETTERS[: len(item.options)])
        gold = item.gold_letter
        scored.append(
            ItemResult(
                item.id, prediction == gold, prediction, gold, answer.text, answer.num_tokens
            )
        )
    return scored


def generate_with_bar(
    generator: Any, prompts: list[str], model: Path, bench: str
) -> list[list[Any]]:
    """Greedy generations with a bar (items/s, ETA) per model and benchmark."""
    with Progress(f"{model.name} {bench}", "items", total=len(prompts)) as bar:
        return generator.generate(prompts, progress=bar.update)
