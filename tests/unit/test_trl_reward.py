"""The GRPOTrainer reward adapter scores whole groups of K and refuses mixed or split groups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from patchgap.errors import ConfigError
from patchgap.reward.rewards import RewardTerms, group_rewards
from patchgap.reward.trl_adapter import (
    GroupAlignmentError,
    GroupRewardFunction,
    check_group_alignment,
    split_groups,
)


class RecordingScorer:
    """Scores a candidate right when it contains the reference answer; records the groups seen."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, list[str]]] = []

    def score_groups(
        self,
        questions: Sequence[str],
        reference_answers: Sequence[str],
        groups_of_candidates: Sequence[Sequence[str]],
    ) -> list[list[RewardTerms]]:
        out = []
        for q, a, group in zip(questions, reference_answers, groups_of_candidates, strict=True):
            self.seen.append((q, a, list(group)))
            ok = [a in c for c in group]
            out.append(group_rewards(ok, None, [float(len(c)) for c in group], np.eye(len(group))))
        return out


def _batch(records: list[tuple[str, str]], k: int, order: list[int]) -> dict:
    """A reward call the way TRL makes it: each sampled prompt index repeated K times in a row."""
    prompts, questions, answers, ids, completions = [], [], [], [], []
    for idx in order:
        q, a = records[idx]
        for j in range(k):
            prompts.append(f"Rewrite: {q}")
            questions.append(q)
            answers.append(a)
            ids.append(f"rec-{idx}")
            completions.append(f"step {j}: the answer is {a if j % 2 == 0 else 'wrong'}")
    return {
        "prompts": prompts,
        "completions": completions,
        "question": questions,
        "reference_answer": answers,
        "id": ids,
    }


RECORDS = [(f"What is {i} + {i}?", str(2 * i)) for i in range(6)]


def test_scores_each_group_together_and_logs_means() -> None:
    scorer = RecordingScorer()
    fn = GroupRewardFunction(scorer, num_generations=4)
    logged: dict[str, float] = {}
    batch = _batch(RECORDS, 4, [3, 0, 5])
    rewards = fn(
        **batch, log_metric=lambda name, v: logged.__setitem__(name, v), trainer_state=None
    )
    assert len(rewards) == 12
    assert [s[0] for s in scorer.seen] == [RECORDS[3][0], RECORDS[0][0], RECORDS[5][0]]
    assert all(len(s[2]) == 4 for s in scorer.seen)
    # Even-numbered completions carry the right answer: gated in with 1 + ..., odd ones get 0.
    assert [r > 0 for r in rewards] == [True, False] * 6
    # Two feasible members per group: equal lengths give r_dist 0.5 each, orthogonal embeddings
    # give r_div 0.5 each.
    assert rewards[0] == pytest.approx(1.0 + 0.35 * 0.5 + 0.5 * 0.5)
    assert logged["reward/r_task"] == pytest.approx(0.5)
    assert fn.last_means["total"] == pytest.approx(sum(rewards) / 12)


def test_mixed_group_is_refused() -> None:
    fn = GroupRewardFunction(RecordingScorer(), num_generations=4)
    batch = _batch(RECORDS, 4, [1, 2])
    # Swap one completion's record between the two groups: the runs of 4 are no longer pure.
    for key in ("prompts", "question", "reference_answer", "id"):
        batch[key][3], batch[key][4] = batch[key][4], batch[key][3]
    with pytest.raises(GroupAlignmentError, match="mixes"):
        fn(**batch)


def test_split_group_is_refused() -> None:
    fn = GroupRewardFunction(RecordingScorer(), num_generations=4)
    batch = _batch(RECORDS, 4, [1, 2])
    # A process slice that starts in the middle of a group (what a misaligned split produces).
    cut = {k: v[2:10] for k, v in batch.items()}
    with pytest.raises(GroupAlignmentError):
        fn(**cut)
    short = {k: v[:6] for k, v in batch.items()}
    with pytest.raises(GroupAlignmentError, match="split"):
        fn(**short)


def test_same_prompt_text_but_different_ids_is_refused() -> None:
    # Two records with the same question: only the id column shows that a run of K is mixed.
    batch = _batch([("Same?", "1"), ("Same?", "1")], 2, [0, 1])
    batch["id"] = ["rec-0", "rec-1", "rec-0", "rec-1"]
    with pytest.raises(GroupAlignmentError, match="'id'"):
        split_groups(batch["prompts"], {"id": batch["id"]}, 2)


def test_missing_column_names_the_column() -> None:
    fn = GroupRewardFunction(RecordingScorer(), num_generations=2, answer_column="gold")
    batch = _batch(RECORDS, 2, [0])
    with pytest.raises(ConfigError, match="'gold'"):
        fn(**batch)


def test_conversational_completions() -> None:
    scorer = RecordingScorer()
    fn = GroupRewardFunction(scorer, num_generations=2)
    batch = _batch(RECORDS, 2, [4])
    batch["completions"] = [[{"role": "assistant", "content": c}] for c in batch["completions"]]
    assert fn(**batch)[1] == 0.0
    assert scorer.seen[0][2][0].startswith("step 0")


def test_alignment_check_accepts_aligned_configs() -> None:
    assert (
        check_group_alignment(per_device_train_batch_size=5, num_generations=5, world_size=4) == 5
    )
    # steps_per_generation defaults to gradient_accumulation_steps, as in TRL.
    assert (
        check_group_alignment(
            per_device_train_batch_size=4,
            num_generations=8,
            world_size=2,
            gradient_accumulation_steps=2,
        )
        == 8
    )
    assert (
        check_group_alignment(
            per_device_train_batch_size=2, num_generations=5, world_size=1, generation_batch_size=10
        )
        == 10
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        # TRL itself accepts this one (global generation batch 4 x 2 = 8 = one group of 8), but
        # each process would score half a group.
        dict(per_device_train_batch_size=4, num_generations=8, world_size=2),
        dict(per_device_train_batch_size=3, num_generations=2, world_size=2),
        dict(per_device_train_batch_size=2, num_generations=5, world_size=5),
        dict(
            per_device_train_batch_size=2, num_generations=4, world_size=2, generation_batch_size=4
        ),
    ],
)
def test_alignment_check_refuses_configs_that_split_groups(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="multiple of"):
        check_group_alignment(**kwargs)


def test_process_slices_of_a_refused_config_really_split_groups() -> None:
    # Simulate TRL's ordering (each prompt K times in a row) and accelerate's per-process slices:
    # the config the check refuses produces a slice the reward refuses, the accepted one does not.
    k, n_prompts = 4, 4
    order = list(range(n_prompts))
    batch = _batch(RECORDS, k, order)
    fn = GroupRewardFunction(RecordingScorer(), num_generations=k)
    for per_process, accepted in ((8, True), (6, False)):
        ok = True
        try:
            check_group_alignment(
                per_device_train_batch_size=per_process, num_generations=k, world_size=2
            )
        except ConfigError:
            ok = False
        assert ok is accepted
        process_1 = {key: v[per_process : 2 * per_process] for key, v in batch.items()}
        if accepted:
            assert len(fn(**process_1)) == per_process
        else:
            with pytest.raises(GroupAlignmentError):
                fn(**process_1)


def test_reference_solutions_reach_the_scorer_when_the_dataset_has_them() -> None:
    """The reasoning-check judge compares each rewrite with its reference solution y*."""

    class SolutionScorer(RecordingScorer):
        def __init__(self) -> None:
            super().__init__()
            self.solutions: list[list[str] | None] = []

        def score_groups(self, questions, reference_answers, groups, reference_solutions=None):
            self.solutions.append(
                None if reference_solutions is None else list(reference_solutions)
            )
            return super().score_groups(questions, reference_answers, groups)

    scorer = SolutionScorer()
    fn = GroupRewardFunction(scorer, num_generations=2)
    batch = _batch(RECORDS, 2, [4, 1])
    fn(**batch)  # a dataset without the column: nothing is passed
    batch["reference_solution"] = [f"y* of {i}" for i in batch["id"]]
    fn(**batch)
    assert scorer.solutions == [None, ["y* of rec-4", "y* of rec-1"]]
    # A run of K must share its reference solution too.
    batch["reference_solution"][1] = "another y*"
    with pytest.raises(GroupAlignmentError, match="reference_solution"):
        fn(**batch)
