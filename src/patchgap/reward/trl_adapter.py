"""The reward adapter for TRL's GRPOTrainer: whole groups of K rewrites scored together.

How TRL 1.16 feeds a reward function (trl/trainer/grpo_trainer.py, utils.RepeatSampler):

- ``RepeatSampler(mini_repeat_count=num_generations, ...)`` yields each prompt index
  ``num_generations`` times in a row, so the K completions of one prompt are consecutive.
- Each process generates for its own slice of the generation batch and calls the reward
  function on that slice, *before* the rewards are gathered across processes
  (``_calculate_rewards``: ``reward_func(prompts=, completions=, completion_ids=, **columns)``
  where every dataset column arrives as a list aligned with the completions, plus
  ``trainer_state``, ``log_extra`` and ``log_metric``).
- A process's slice holds ``per_device_train_batch_size * steps_per_generation`` completions
  (``GRPOConfig.__post_init__``: ``generation_batch_size = per_device_train_batch_size *
  world_size * steps_per_generation``, ``steps_per_generation`` defaulting to
  ``gradient_accumulation_steps``). TRL itself only requires the *global* generation batch to be a
  multiple of K, so with several processes a group can be cut in two; :func:`check_group_alignment`
  refuses such a configuration at start-up and :class:`GroupRewardFunction` refuses a batch whose
  runs of K do not share one prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from patchgap.errors import ConfigError
from patchgap.reward.rewards import RewardTerms, term_means

# Keyword arguments TRL adds to every reward call besides the dataset columns.
_TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")


class GroupAlignmentError(RuntimeError):
    """A batch handed to the reward does not consist of complete, unmixed groups of K."""


class GroupScorer(Protocol):
    """What the adapter needs from a scorer (``patchgap.reward.scoring.GroupRewardScorer``)."""

    def score_groups(
        self,
        questions: Sequence[str],
        reference_answers: Sequence[str],
        groups_of_candidates: Sequence[Sequence[str]],
        reference_solutions: Sequence[str] | None = None,
    ) -> list[list[RewardTerms]]: ...


def check_group_alignment(
    per_device_train_batch_size: int,
    num_generations: int,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    generation_batch_size: int | None = None,
    per_device_eval_batch_size: int | None = None,
) -> int:
    """Refuse a GRPO configuration whose per-process generation batch would split a group of K.

    Mirrors TRL 1.16's own arithmetic and returns the number of completions each process scores
    per call. Raises :class:`ConfigError` naming the settings and a fix otherwise.

    >>> check_group_alignment(per_device_train_batch_size=4, num_generations=4, world_size=2)
    4
    >>> check_group_alignment(per_device_train_batch_size=6, num_generations=4, world_size=2,
    ...                       gradient_accumulation_steps=2)
    12
    """
    k = num_generations
    if k < 2:
        raise ConfigError(f"num_generations={k}: GRPO and the group reward need at least 2 (K)")
    if per_device_train_batch_size < 1 or world_size < 1:
        raise ConfigError("per_device_train_batch_size and world_size must be >= 1")
    step_batch = per_device_train_batch_size * world_size
    if generation_batch_size is not None and steps_per_generation is not None:
        raise ConfigError("set generation_batch_size or steps_per_generation, not both")
    if generation_batch_size is not None:
        if generation_batch_size % step_batch:
            raise ConfigError(
                f"generation_batch_size={generation_batch_size} is not a multiple of "
                f"per_device_train_batch_size * world_size = {step_batch}"
            )
        steps = generation_batch_size // step_batch
    else:
        steps = (
            steps_per_generation
            if steps_per_generation is not None
            else gradient_accumulation_steps
        )
    per_process = per_device_train_batch_size * steps
    if per_process % k:
        raise ConfigError(
            f"each of the {world_size} process(es) scores {per_process} completions per generation "
            f"batch (per_device_train_batch_size={per_device_train_batch_size} x "
            f"steps_per_generation={steps}), not a multiple of num_generations (K)={k}, so groups "
            f"of K would be split across processes and the group reward would be wrong; make "
            f"per_device_train_batch_size * steps_per_generation a multiple of {k}"
        )
    if per_device_eval_batch_size is not None and per_device_eval_batch_size % k:
        raise ConfigError(
            f"per_device_eval_batch_size={per_device_eval_batch_size} is not a multiple of "
            f"num_generations (K)={k}: evaluation groups would be split across processes"
        )
    return per_process


def check_grpo_args(args: Any) -> int:
    """:func:`check_group_alignment` on a built ``trl.GRPOConfig`` (after its ``__post_init__``)."""
    eval_bs = None
    strategy = getattr(args, "eval_strategy", "no")
    if getattr(strategy, "value", strategy) != "no":
        eval_bs = args.per_device_eval_batch_size
    return check_group_alignment(
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        world_size=getattr(args, "world_size", 1),
        steps_per_generation=args.steps_per_generation,
        per_device_eval_batch_size=eval_bs,
    )


def _completion_text(completion: Any) -> str:
    # Conversational datasets hand over a list of messages; the rewrite is the last one's content.
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


def _key(value: Any) -> str:
    # Prompts may be strings or message lists; repr compares both exactly.
    return value if isinstance(value, str) else repr(value)


def split_groups(prompts: Sequence[Any], columns: dict[str, Sequence[Any]], k: int) -> list[slice]:
    """Cut a TRL reward batch into consecutive runs of K; raise if a run is split or mixed.

    >>> split_groups(["a", "a", "b", "b"], {"question": ["x", "x", "y", "y"]}, 2)
    [slice(0, 2, None), slice(2, 4, None)]
    """
    n = len(prompts)
    if n % k:
        raise GroupAlignmentError(
            f"reward batch of {n} completions is not a whole number of groups of K={k}: a group "
            f"was split (check per_device_train_batch_size * steps_per_generation)"
        )
    for name, values in columns.items():
        if len(values) != n:
            raise GroupAlignmentError(
                f"column {name!r} has {len(values)} values for {n} completions"
            )
    slices = [slice(s, s + k) for s in range(0, n, k)]
    for g, sl in enumerate(slices):
        head = _key(prompts[sl.start])
        if any(_key(p) != head for p in prompts[sl]):
            raise GroupAlignmentError(
                f"group {g} (completions {sl.start}..{sl.stop - 1}) mixes different prompts: "
                f"groups of K={k} are misaligned or split"
            )
        for name, values in columns.items():
            first = _key(values[sl.start])
            if any(_key(v) != first for v in values[sl]):
                raise GroupAlignmentError(
                    f"group {g} (completions {sl.start}..{sl.stop - 1}) mixes values of column "
                    f"{name!r}: groups of K={k} are misaligned or split"
                )
    return slices


class GroupRewardFunction:
    """A GRPOTrainer reward function computing each group's paper reward together.

    ``question_column`` and ``answer_column`` name the dataset columns holding the question x and
    the reference answer a*; ``solution_column`` (if present in the dataset) the reference
    solution y*, which the reasoning-check judge compares against; ``id_column`` (if present)
    makes the alignment check robust to two records with the same prompt text. Per-term means go
    to TRL's ``log_metric`` as ``reward/<term>`` and are kept in :attr:`last_means`;
    :attr:`seconds` accumulates the time spent scoring, for the reward's share of a GRPO step.
    """

    def __init__(
        self,
        scorer: GroupScorer,
        num_generations: int,
        question_column: str = "question",
        answer_column: str = "reference_answer",
        id_column: str | None = "id",
        solution_column: str | None = "reference_solution",
        on_groups: Callable[[list[list[RewardTerms]]], None] | None = None,
    ) -> None:
        if num_generations < 2:
            raise ConfigError(f"num_generations={num_generations}: the group reward needs K >= 2")
        self.scorer = scorer
        self.k = num_generations
        self.question_column = question_column
        self.answer_column = answer_column
        self.id_column = id_column
        self.solution_column = solution_column
        self.on_groups = on_groups
        self.last_means: dict[str, float] = {}
        self.last_terms: list[list[RewardTerms]] = []
        self.seconds = 0.0
        self.calls = 0
        # TRL names reward functions by __name__ in its logs.
        self.__name__ = "patchgap_group_reward"

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        start = time.perf_counter()
        for needed in (self.question_column, self.answer_column):
            if needed not in kwargs:
                have = sorted(k for k in kwargs if k not in _TRL_EXTRAS)
                raise ConfigError(f"reward: dataset column {needed!r} missing; columns: {have}")
        if len(completions) != len(prompts):
            raise GroupAlignmentError(f"{len(completions)} completions for {len(prompts)} prompts")
        columns = {
            self.question_column: kwargs[self.question_column],
            self.answer_column: kwargs[self.answer_column],
        }
        for optional in (self.id_column, self.solution_column):
            if optional and optional in kwargs:
                columns[optional] = kwargs[optional]
        slices = split_groups(prompts, columns, self.k)
        questions = [str(columns[self.question_column][sl.start]) for sl in slices]
        answers = [str(columns[self.answer_column][sl.start]) for sl in slices]
        groups = [[_completion_text(c) for c in completions[sl]] for sl in slices]
        if self.solution_column and self.solution_column in columns:
            solutions = [str(columns[self.solution_column][sl.start]) for sl in slices]
            terms = self.scorer.score_groups(
                questions, answers, groups, reference_solutions=solutions
            )
        else:
            terms = self.scorer.score_groups(questions, answers, groups)
        if len(terms) != len(groups) or any(len(t) != self.k for t in terms):
            raise GroupAlignmentError("scorer returned a different number of groups or rewrites")
        self.last_terms = terms
        self.last_means = term_means(terms)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for name, value in self.last_means.items():
                if not math.isnan(value):
                    log_metric(f"reward/{name}", value)
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            flat = [t for g in terms for t in g]
            for name in ("r_task", "r_dist", "r_div"):
                log_extra(name, [getattr(t, name) for t in flat])
        if self.on_groups is not None:
            self.on_groups(terms)
        return [t.total for g in terms for t in g]
