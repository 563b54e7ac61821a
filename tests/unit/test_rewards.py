"""The paper's reward math on hand-computable groups (arXiv 2602.11220)."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest

from patchgap.reward import rewards
from patchgap.reward.rewards import (
    dist_rewards,
    div_rewards,
    gated_total,
    group_rewards,
    leave_one_out_diversity,
    set_diversity,
    term_means,
)


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(rewards)
    assert result.attempted > 5
    assert result.failed == 0


def test_dist_normalises_with_population_std() -> None:
    # ell = [1, 3]: mean 2, population std 1 (sample std would be sqrt 2), z = [-1, 1].
    r = dist_rewards([1.0, 3.0], [True, True])
    z = np.array([-1.0, 1.0]) / (1.0 + 1e-6)
    assert r == pytest.approx(1.0 / (1.0 + np.exp(z)), abs=1e-12)
    assert r[0] == pytest.approx(0.7310585, abs=1e-6)
    assert r[0] + r[1] == pytest.approx(1.0)


def test_dist_lower_nll_gets_higher_reward() -> None:
    r = dist_rewards([0.9, 1.4, 2.2, 1.1], [True] * 4)
    assert list(np.argsort(-r)) == [0, 3, 1, 2]


def test_dist_one_feasible_sample_gets_one_half() -> None:
    # The paper: one feasible sample uses mean = ell, std = 1, so z = 0 and r_dist = 0.5.
    r = dist_rewards([7.3, 0.1, 2.0], [False, True, False])
    assert r.tolist() == [0.0, 0.5, 0.0]


def test_dist_all_infeasible_is_zero() -> None:
    assert dist_rewards([0.5, 1.0, 2.0], [False, False, False]).tolist() == [0.0, 0.0, 0.0]


def test_dist_ignores_infeasible_nll_in_the_statistics() -> None:
    # The infeasible member's huge NLL must not move the feasible members' mean and std.
    with_outlier = dist_rewards([1.0, 3.0, 100.0], [True, True, False])
    assert with_outlier[:2] == pytest.approx(dist_rewards([1.0, 3.0], [True, True]))
    assert with_outlier[2] == 0.0


def test_dist_equal_nll_all_get_one_half() -> None:
    # std = 0: the 1e-6 keeps z finite (0), every member gets 0.5.
    assert dist_rewards([2.0, 2.0, 2.0], [True] * 3).tolist() == [0.5, 0.5, 0.5]


def test_dist_unmeasurable_nll_gets_zero_and_is_left_out() -> None:
    r = dist_rewards([1.0, math.inf, 3.0], [True, True, True])
    assert r[1] == 0.0
    assert r[[0, 2]] == pytest.approx(dist_rewards([1.0, 3.0], [True, True]))


def _brute_force_loo(emb: np.ndarray) -> np.ndarray:
    # The O(m^3) definition: recompute the mean pairwise distance without each member.
    def d(u: np.ndarray, v: np.ndarray) -> float:
        return (1.0 - float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))) / 2.0

    def mean_pairwise(rows: list[np.ndarray]) -> float:
        pairs = list(itertools.combinations(rows, 2))
        return sum(d(u, v) for u, v in pairs) / len(pairs) if pairs else 0.0

    full = mean_pairwise(list(emb))
    return np.array(
        [
            max(0.0, full - mean_pairwise([e for j, e in enumerate(emb) if j != i]))
            for i in range(len(emb))
        ]
    )


@pytest.mark.parametrize("m", [2, 3, 5, 8, 13])
def test_diversity_closed_form_matches_brute_force(m: int) -> None:
    rng = np.random.default_rng(m)
    emb = rng.normal(size=(m, 16))
    assert leave_one_out_diversity(emb) == pytest.approx(_brute_force_loo(emb), abs=1e-12)


def test_diversity_hand_computed() -> None:
    # Orthogonal pair: d = 1/2, D(S) = 1/2, removing either leaves one member (D = 0).
    assert leave_one_out_diversity(np.array([[1.0, 0.0], [0.0, 3.0]])).tolist() == [0.5, 0.5]
    # e1, e2, -e1: d = 1/2, 1, 1/2, D = 2/3; removing e2 leaves {e1, -e1} with D = 1, so its
    # marginal contribution is negative and clipped to 0; removing e1 or -e1 leaves D = 1/2.
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert set_diversity(emb) == pytest.approx(2 / 3)
    assert leave_one_out_diversity(emb) == pytest.approx([1 / 6, 0.0, 1 / 6])


def test_identical_candidates_get_zero_diversity() -> None:
    emb = np.tile(np.array([[0.3, -1.2, 4.0, 0.5]]), (5, 1))
    assert leave_one_out_diversity(emb).tolist() == [0.0] * 5
    assert div_rewards(emb, [True] * 5).tolist() == [0.0] * 5


def test_diversity_only_over_feasible_members() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Member 2 is gated out: the set is {e1, e2}, both contribute 1/2, member 2 gets 0.
    assert div_rewards(emb, [True, True, False]).tolist() == [0.5, 0.5, 0.0]
    # Fewer than two feasible: no diversity at all, embeddings not even needed.
    assert div_rewards(None, [False, True, False]).tolist() == [0.0, 0.0, 0.0]


def test_gated_total_defaults() -> None:
    # 1 + 0.35 * 0.5 + 0.5 * 0.25 = 1.3
    assert gated_total([1.0], [0.5], [0.25]) == pytest.approx([1.3])
    assert gated_total([0.0], [1.0], [1.0]).tolist() == [0.0]


def test_group_with_one_feasible_candidate() -> None:
    terms = group_rewards(
        answer_ok=[False, True, True],
        judge_ok=[False, True, False],  # the judge rejects candidate 2
        nll=[None, 1.234, None],
        embeddings=None,
    )
    assert [t.r_task for t in terms] == [0.0, 1.0, 0.0]
    assert terms[1].r_dist == 0.5 and terms[1].r_div == 0.0
    assert terms[1].total == pytest.approx(1.0 + 0.35 * 0.5)
    assert terms[2].total == 0.0 and terms[2].answer_ok and not terms[2].judge_ok


def test_wrong_answer_gets_zero_whatever_its_nll_and_diversity() -> None:
    # Candidate 0 has the best style (lowest NLL) and is far from the others, but it is wrong.
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    terms = group_rewards([False, True, True], None, [0.01, 2.0, 3.0], emb)
    assert terms[0].total == 0.0 and terms[0].r_dist == 0.0 and terms[0].r_div == 0.0
    assert terms[1].total > 1.0 and terms[2].total > 1.0


def test_term_means_for_logging() -> None:
    g = group_rewards([True, True, False], None, [1.0, 3.0, None], np.eye(3))
    means = term_means([g])
    assert means["r_task"] == pytest.approx(2 / 3)
    assert means["r_dist"] == pytest.approx(0.5)  # over the feasible pair only
    assert means["nll"] == pytest.approx(2.0)
    assert math.isnan(means["judge_p_yes"])


# --- the group scorer's gating, with stand-ins for the models ---------------------------------


class _FakeNLL:
    """NLL = 0.01 for rewrites mentioning 'polished', else 2 + length/100: style is measurable."""

    context = "chat"

    def score_groups(self, questions, groups):
        return [[0.01 if "polished" in c else 2.0 + len(c) / 100 for c in g] for g in groups]


class _FakeEmbedder:
    def encode(self, texts):
        # Identical texts map to identical vectors; different texts to different ones.
        return np.array([[1.0, float(len(t) % 7), float(sum(map(ord, t)) % 11)] for t in texts])


class _SpyJudge:
    """Accepts everything except rewrites containing 'nonsense'; records what it was shown."""

    def __init__(self):
        self.shown: list[str] = []

    def verdicts(self, questions, references, groups):
        from patchgap.reward.scoring import JudgeVerdict

        out = []
        for g in groups:
            self.shown.extend(g)
            out.append(
                [
                    JudgeVerdict(0.1, 0.1, 0.9) if "nonsense" in c else JudgeVerdict(0.9, 0.9, 0.1)
                    for c in g
                ]
            )
        return out


def _scorer(judge=None):
    from patchgap.reward.scoring import GroupRewardScorer, RewardConfig

    config = RewardConfig(k=3, judge=judge is not None)
    return GroupRewardScorer(
        config, "unused", judge=judge, nll=_FakeNLL(), embedder=_FakeEmbedder()
    )


def test_wrong_final_answer_gets_zero_whatever_its_style() -> None:
    group = [
        "A polished, perfectly phrased solution. The answer is \\boxed{13}.",  # best style, wrong
        "Half of 24 is 12. The answer is \\boxed{12}.",
        "We take 24 / 2 = 12, so \\boxed{12}.",
    ]
    terms = _scorer().score_groups(["Half of 24?"], ["12"], [group])[0]
    assert terms[0].total == 0.0 and terms[0].r_task == 0.0 and not terms[0].answer_ok
    assert terms[0].nll is None  # gated out before NLL is even measured
    assert terms[1].total > 1.0 and terms[2].total > 1.0


def test_nested_braces_in_boxed_answer_are_read_whole() -> None:
    # The reference code's regex stopped at the first '}' and read "\frac{1"; the gate must not.
    group = [
        "So p = \\boxed{\\frac{1}{2}}.",
        "p = 0.5, i.e. \\boxed{\\frac{1}{2}}",
        "\\boxed{\\frac{1}{3}}",
    ]
    terms = _scorer().score_groups(["Chance of heads?"], ["\\frac{1}{2}"], [group])[0]
    assert [t.r_task for t in terms] == [1.0, 1.0, 0.0]


def test_judge_sees_only_right_answers_and_gates_them() -> None:
    judge = _SpyJudge()
    group = ["nonsense but \\boxed{4}", "2 + 2 = 4, \\boxed{4}", "2 + 2 = 5, \\boxed{5}"]
    terms = _scorer(judge).score_groups(["2 + 2?"], ["4"], [group])[0]
    assert judge.shown == group[:2]
    assert [t.r_task for t in terms] == [0.0, 1.0, 0.0]
    assert terms[0].answer_ok and not terms[0].judge_ok and terms[0].judge_p_yes == 0.1
    # One feasible rewrite left: the paper's rule gives r_dist 0.5 and no diversity.
    assert terms[1].r_dist == 0.5 and terms[1].r_div == 0.0
    assert terms[1].total == pytest.approx(1.175)


def test_identical_rewrites_get_zero_diversity_through_the_scorer() -> None:
    same = "3 * 3 = 9. The answer is \\boxed{9}."
    terms = _scorer().score_groups(["3 squared?"], ["9"], [[same, same, same]])[0]
    assert [t.r_div for t in terms] == [0.0, 0.0, 0.0]
    assert [t.r_dist for t in terms] == [0.5, 0.5, 0.5]


def test_reward_config_is_strict() -> None:
    from patchgap.config import validate
    from patchgap.errors import ConfigError
    from patchgap.reward.scoring import RewardConfig

    cfg = validate(RewardConfig, {"k": 8, "nll_context": "plain"})
    assert (cfg.k, cfg.lambda_dist, cfg.lambda_div, cfg.nll_context) == (8, 0.35, 0.5, "plain")
    with pytest.raises(ConfigError, match="nll_context"):
        validate(RewardConfig, {"nll_context": "prompt"})
    with pytest.raises(ConfigError, match="lamda_div: unknown key"):
        validate(RewardConfig, {"lamda_div": 0.1})


def test_length_buckets_keep_padding_low() -> None:
    from patchgap.reward.scoring import plan_buckets

    lengths = [120, 40, 118, 45, 300, 41, 119]
    buckets = plan_buckets(lengths, max_batch_tokens=10_000, max_padding_fraction=0.1)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        longest = max(lengths[i] for i in b)
        assert sum(longest - lengths[i] for i in b) <= 0.1 * longest * len(b)
    assert [4] in buckets  # the outlier runs alone instead of padding everything to 300
