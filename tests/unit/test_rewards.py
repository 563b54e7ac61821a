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


# --- judge kinds: pi0, pi0_calibrated, reasoning_check ----------------------------------------


class _MarginJudge:
    """P(YES) - P(NO) = the number after 'margin=' in a candidate (0 without one)."""

    def __init__(self):
        self.calls = 0

    def verdicts(self, questions, references, groups):
        import re

        from patchgap.reward.scoring import JudgeVerdict

        self.calls += 1
        out = []
        for g in groups:
            row = []
            for c in g:
                m = re.search(r"margin=(-?[\d.]+)", c)
                margin = float(m.group(1)) if m else 0.0
                yes, no = 0.3 + margin / 2, 0.3 - margin / 2
                row.append(JudgeVerdict(yes / (yes + no), yes, no))
            out.append(row)
        return out


def _kind_scorer(kind: str, **reward):
    from patchgap.reward.scoring import GroupRewardScorer, RewardConfig

    config = RewardConfig(k=3, judge=True, judge_kind=kind, **reward)
    judge = _MarginJudge() if kind != "reasoning_check" else None
    return GroupRewardScorer(
        config, "unused", judge=judge, nll=_FakeNLL(), embedder=_FakeEmbedder()
    )


def test_pi0_judge_accepts_at_a_margin_of_zero() -> None:
    group = ["margin=-0.1 \\boxed{4}", "margin=0.0 \\boxed{4}", "margin=0.2 \\boxed{4}"]
    terms = _kind_scorer("pi0").score_groups(["2 + 2?"], ["4"], [group])[0]
    assert [t.judge_ok for t in terms] == [False, True, True]
    assert [t.judge_score for t in terms] == pytest.approx([-0.1, 0.0, 0.2])


def test_calibrated_judge_thresholds_at_a_quantile_of_the_references_margins() -> None:
    from patchgap.errors import ConfigError
    from patchgap.reward.scoring import calibrated_threshold

    scorer = _kind_scorer(
        "pi0_calibrated", judge_calibration={"quantile": 0.25, "score": "difference"}
    )
    with pytest.raises(ConfigError, match="not calibrated"):
        scorer.score_groups(["q"], ["4"], [["\\boxed{4}"]])
    refs = [f"margin={m} \\boxed{{4}}" for m in (-0.4, -0.2, -0.1, 0.0, 0.3)]
    threshold = scorer.calibrate(["q"] * 5, ["4"] * 5, refs)
    assert threshold == pytest.approx(calibrated_threshold([-0.4, -0.2, -0.1, 0.0, 0.3], 0.25))
    assert threshold == pytest.approx(-0.2)
    # A 135M pi0 never reaches P(YES) >= P(NO); calibrated, it still tells better from worse.
    group = ["margin=-0.3 \\boxed{4}", "margin=-0.2 \\boxed{4}", "margin=-0.05 \\boxed{4}"]
    terms = scorer.score_groups(["2 + 2?"], ["4"], [group])[0]
    assert [t.judge_ok for t in terms] == [False, True, True]
    m = scorer.metrics()
    assert m["reward/judge_kind"] == "pi0_calibrated"
    assert m["reward/judge_threshold"] == pytest.approx(-0.2)
    assert m["reward/calibration_references"] == 5
    assert m["reward/calibration_reference_acceptance"] == pytest.approx(0.8)
    assert "pi0_calibrated: P(YES) - P(NO) >= -0.2" in scorer.describe_judge()


def test_calibrated_judge_on_log_odds_by_default() -> None:
    import math

    scorer = _kind_scorer("pi0_calibrated", judge_calibration={"quantile": 0.5})
    refs = [f"margin={m} \\boxed{{4}}" for m in (-0.2, -0.1, 0.0)]
    threshold = scorer.calibrate(["q"] * 3, ["4"] * 3, refs)
    assert threshold == pytest.approx(math.log(0.25 / 0.35))  # the median: P(YES) .25, P(NO) .35
    terms = scorer.score_groups(["q"], ["4"], [["margin=-0.15 \\boxed{4}", refs[1], refs[2]]])[0]
    assert [t.judge_ok for t in terms] == [False, True, True]
    assert terms[2].judge_score == pytest.approx(0.0)
    assert "log P(YES)/P(NO) >= -0.3365" in scorer.describe_judge()


def test_calibration_sample_depends_on_the_ids_only() -> None:
    from patchgap.reward.scoring import calibration_sample

    ids = [f"gsm8k-{i}" for i in range(50)]
    a = calibration_sample(ids, 8, key=str)
    assert a == calibration_sample(list(reversed(ids)), 8, key=str) and len(a) == 8
    assert calibration_sample(ids[:3], 8, key=str) == calibration_sample(ids[:3], 3, key=str)


def test_reasoning_check_judge_needs_no_model_and_gates_degenerate_rewrites() -> None:
    from patchgap.errors import ConfigError

    question = "Natalia sold 48 clips in April and half as many in May. How many in all?"
    reference = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    group = [
        "In May she sold 48 / 2 = 24 clips, so in April and May she sold 48 + 24 = 72 clips "
        "altogether. \\boxed{72}",
        "The answer is \\boxed{72}.",
        "In May she sold 48 / 2 = 25 clips, so in April and May she sold 48 + 25 = 72 clips "
        "altogether. \\boxed{72}",
    ]
    scorer = _kind_scorer("reasoning_check")
    assert scorer.judge is None  # no model is loaded for it
    with pytest.raises(ConfigError, match="reference solutions"):
        scorer.score_groups([question], ["72"], [group])
    terms = scorer.score_groups([question], ["72"], [group], reference_solutions=[reference])[0]
    assert [t.r_task for t in terms] == [1.0, 0.0, 0.0]
    assert terms[1].answer_ok and set(terms[1].judge_failed) == {"few_results", "too_short"}
    assert "bad_arithmetic" in terms[2].judge_failed
    assert terms[0].judge_p_yes is None and terms[0].judge_score == pytest.approx(1.0)
    assert scorer.metrics()["reward/count_judge_accepted"] == 1


def test_judge_off_is_the_answer_check_whatever_the_kind() -> None:
    from patchgap.reward.scoring import GroupRewardScorer, RewardConfig

    config = RewardConfig(k=3, judge=False, judge_kind="reasoning_check")
    assert config.active_judge is None and not config.model_judge
    scorer = GroupRewardScorer(config, None, nll=_FakeNLL(), embedder=_FakeEmbedder())
    terms = scorer.score_groups(["2 + 2?"], ["4"], [["The answer is \\boxed{4}.", "\\boxed{5}"]])
    assert [t.r_task for t in terms[0]] == [1.0, 0.0]
    assert scorer.describe_judge() == "off (r_task = answer check)"
