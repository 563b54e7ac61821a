"""The paper's gated group reward as pure numpy math: r_dist, r_div, gated total, per-term results.

Everything here works on one group of K rewrites of the same question x and takes numbers the
scorer measured (answer check, judge decision, NLL under pi0, sentence embeddings). No model is
loaded and no torch is imported, so training, the gate and the metrics share exactly this code and
the unit tests cover it in milliseconds. The paper's reward (arXiv 2602.11220) is the specification:

- r_task in {0, 1}: final answer equals a* AND the judge accepts.
- r_dist over the feasible set S+ only: z_i = (ell_i - mean) / (std + 1e-6) with the population std,
  one feasible sample uses mean = ell and std = 1, and r_dist_i = sigmoid(-z_i).
- r_div only when |S+| >= 2: r_div_i = max(0, D(S+) - D(S+ without i)), D the mean pairwise
  distance (1 - cos) / 2, and D of a set with fewer than two members is 0.
- total_i = r_task_i * (1 + lambda_dist * r_dist_i + lambda_div * r_div_i).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LAMBDA_DIST = 0.35
LAMBDA_DIV = 0.5
STD_EPS = 1e-6


@dataclass(frozen=True)
class RewardTerms:
    """The reward of one rewrite and every term behind it.

    ``nll`` is the mean token NLL under pi0 (None when not measured: the rewrite was gated out);
    ``judge_p_yes`` is a model judge's P(YES) / (P(YES) + P(NO)) (None when no model judge ran:
    it is off or the reasoning check, or the final answer was already wrong); ``judge_score`` is
    what the judge thresholds (a model judge's P(YES) - P(NO), the reasoning check's graded
    score) and ``judge_failed`` the reasoning check's unmet criteria. ``answer_ok`` and
    ``judge_ok`` are the two halves of the gate, kept so the gate report can say why a rewrite
    failed.
    """

    r_task: float
    r_dist: float
    r_div: float
    total: float
    nll: float | None = None
    judge_p_yes: float | None = None
    answer_ok: bool = False
    judge_ok: bool = False
    judge_score: float | None = None
    judge_failed: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dist_rewards(nll: Sequence[float], feasible: Sequence[bool]) -> np.ndarray:
    """r_dist for one group: z-normalise the NLL over the feasible set, map through sigmoid(-z).

    Infeasible members get 0, and so does a feasible member whose NLL is not finite (an empty
    rewrite has no tokens to score); such a member is also left out of the mean and std.

    >>> dist_rewards([2.0, 1.0, 3.0], [True, True, True]).round(4).tolist()
    [0.5, 0.7729, 0.2271]
    >>> dist_rewards([1.7, 9.0], [True, False]).tolist()  # one feasible: mean = ell, std = 1
    [0.5, 0.0]
    >>> dist_rewards([1.0, 2.0], [False, False]).tolist()
    [0.0, 0.0]
    """
    ell = np.asarray(nll, dtype=np.float64)
    mask = np.asarray(feasible, dtype=bool) & np.isfinite(ell)
    out = np.zeros(ell.shape, dtype=np.float64)
    m = int(mask.sum())
    if m == 0:
        return out
    vals = ell[mask]
    if m == 1:
        mean, std = float(vals[0]), 1.0
    else:
        mean, std = float(vals.mean()), float(vals.std(ddof=0))
    z = (vals - mean) / (std + STD_EPS)
    out[mask] = 1.0 / (1.0 + np.exp(z))
    return out


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    # A zero vector has no direction; leaving it at zero makes cos = 0 (distance 1/2) to everything.
    return emb / np.where(norms > 0, norms, 1.0)


def pairwise_distances(embeddings: np.ndarray) -> np.ndarray:
    """The matrix of d(u, v) = (1 - cos(u, v)) / 2, zero on the diagonal.

    >>> pairwise_distances(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])).tolist()
    [[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]]
    """
    u = _unit_rows(np.asarray(embeddings, dtype=np.float64))
    d = (1.0 - u @ u.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return d


def set_diversity(embeddings: np.ndarray) -> float:
    """D(S): the mean pairwise distance of a set; 0 for fewer than two members.

    >>> set_diversity(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    0.6666666666666666
    """
    m = len(embeddings)
    if m < 2:
        return 0.0
    return float(pairwise_distances(embeddings).sum() / (m * (m - 1)))


def leave_one_out_diversity(embeddings: np.ndarray) -> np.ndarray:
    """Each member's marginal contribution max(0, D(S) - D(S without i)), for the whole set at once.

    Closed form in O(m d): with unit rows u_i and U = sum_j u_j, the distance row sum is
    s_i = ((m - 1) - (u_i . U - |u_i|^2)) / 2 and the pair total is T = sum_i s_i / 2, so
    D(S) = T / C(m, 2) and D(S without i) = (T - s_i) / C(m - 1, 2). The O(m^3) recomputation
    per member is what :func:`set_diversity` in a loop would do; the tests check both agree.

    >>> leave_one_out_diversity(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])).round(4).tolist()
    [0.1667, 0.0, 0.1667]
    >>> leave_one_out_diversity(np.ones((4, 3))).tolist()  # identical rewrites add nothing
    [0.0, 0.0, 0.0, 0.0]
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    m = len(emb)
    if m < 2:
        return np.zeros(m, dtype=np.float64)
    u = _unit_rows(emb)
    total_vec = u.sum(axis=0)
    self_sim = np.einsum("ij,ij->i", u, u)
    row_sum = ((m - 1) - (u @ total_vec - self_sim)) / 2.0
    pair_total = row_sum.sum() / 2.0
    d_full = pair_total / (m * (m - 1) / 2.0)
    if m == 2:
        d_without = np.zeros(m, dtype=np.float64)
    else:
        d_without = (pair_total - row_sum) / ((m - 1) * (m - 2) / 2.0)
    # Rounding can leave -1e-17 for identical rows; the reward is clipped at 0 anyway.
    return np.maximum(0.0, d_full - d_without)


def div_rewards(embeddings: np.ndarray | None, feasible: Sequence[bool]) -> np.ndarray:
    """r_div for one group: leave-one-out diversity over the feasible rows, 0 elsewhere.

    ``embeddings`` has one row per group member (rows of infeasible members are ignored, so the
    scorer may leave them zero); None is allowed when fewer than two members are feasible.

    >>> div_rewards(np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]), [True, True, False]).tolist()
    [0.5, 0.5, 0.0]
    """
    mask = np.asarray(feasible, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.float64)
    if mask.sum() < 2:
        return out
    if embeddings is None:
        raise ValueError(
            "div_rewards: embeddings are required when two or more rewrites are feasible"
        )
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.shape[0] != mask.shape[0]:
        raise ValueError(
            f"div_rewards: {emb.shape[0]} embedding rows for a group of {mask.shape[0]}"
        )
    out[mask] = leave_one_out_diversity(emb[mask])
    return out


def gated_total(
    r_task: Sequence[float],
    r_dist: Sequence[float],
    r_div: Sequence[float],
    lambda_dist: float = LAMBDA_DIST,
    lambda_div: float = LAMBDA_DIV,
) -> np.ndarray:
    """total_i = r_task_i * (1 + lambda_dist * r_dist_i + lambda_div * r_div_i).

    >>> gated_total([1, 0], [0.5, 0.9], [0.2, 0.9]).round(4).tolist()  # a gated-out rewrite gets 0
    [1.275, 0.0]
    """
    task = np.asarray(r_task, dtype=np.float64)
    dist = np.asarray(r_dist, dtype=np.float64)
    div = np.asarray(r_div, dtype=np.float64)
    return task * (1.0 + lambda_dist * dist + lambda_div * div)


def group_rewards(
    answer_ok: Sequence[bool],
    judge_ok: Sequence[bool] | None,
    nll: Sequence[float | None],
    embeddings: np.ndarray | None,
    lambda_dist: float = LAMBDA_DIST,
    lambda_div: float = LAMBDA_DIV,
    judge_p_yes: Sequence[float | None] | None = None,
    judge_score: Sequence[float | None] | None = None,
    judge_failed: Sequence[tuple[str, ...]] | None = None,
) -> list[RewardTerms]:
    """The full reward of one group from measured inputs; ``judge_ok=None`` means the judge is off.

    >>> terms = group_rewards([True, True, False], None, [1.0, 3.0, None],
    ...                       np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> [round(t.total, 4) for t in terms]
    [1.5059, 1.3441, 0.0]
    >>> [round(t.r_dist, 4) for t in terms], [t.r_div for t in terms]
    ([0.7311, 0.2689, 0.0], [0.5, 0.5, 0.0])
    """
    k = len(answer_ok)
    ans = [bool(a) for a in answer_ok]
    judged = ans if judge_ok is None else [bool(j) for j in judge_ok]
    if len(judged) != k or len(nll) != k:
        raise ValueError(f"group_rewards: inputs of different lengths for a group of {k}")
    task = [1.0 if a and j else 0.0 for a, j in zip(ans, judged, strict=True)]
    feasible = [t > 0 for t in task]
    ell = [math.nan if v is None else float(v) for v in nll]
    dist = dist_rewards(ell, feasible)
    div = div_rewards(embeddings, feasible)
    total = gated_total(task, dist, div, lambda_dist, lambda_div)
    p_yes = list(judge_p_yes) if judge_p_yes is not None else [None] * k
    scores = list(judge_score) if judge_score is not None else [None] * k
    fails = [tuple(f) for f in judge_failed] if judge_failed is not None else [()] * k
    return [
        RewardTerms(
            r_task=task[i],
            r_dist=float(dist[i]),
            r_div=float(div[i]),
            total=float(total[i]),
            nll=None if not math.isfinite(ell[i]) else ell[i],
            judge_p_yes=p_yes[i],
            answer_ok=ans[i],
            judge_ok=judged[i],
            judge_score=scores[i],
            judge_failed=fails[i],
        )
        for i in range(k)
    ]


def term_means(groups: Sequence[Sequence[RewardTerms]]) -> dict[str, float]:
    """Per-term means over a batch of groups, for logging (``reward/<term>``).

    r_dist, r_div and nll are averaged over the feasible rewrites only (they are 0 or unmeasured
    elsewhere, which would mix the gate pass rate into them); judge_p_yes over judged rewrites.

    >>> t = group_rewards([True, False], None, [1.0, None], None)
    >>> term_means([t])["r_task"], term_means([t])["r_dist"]
    (0.5, 0.5)
    """
    flat = [t for g in groups for t in g]
    out: dict[str, float] = {}
    if not flat:
        return out
    out["total"] = float(np.mean([t.total for t in flat]))
    out["r_task"] = float(np.mean([t.r_task for t in flat]))
    out["answer_ok"] = float(np.mean([t.answer_ok for t in flat]))
    feasible = [t for t in flat if t.r_task > 0]
    out["feasible"] = float(len(feasible))
    for name in ("r_dist", "r_div"):
        out[name] = float(np.mean([getattr(t, name) for t in feasible])) if feasible else math.nan
    nlls = [t.nll for t in feasible if t.nll is not None]
    out["nll"] = float(np.mean(nlls)) if nlls else math.nan
    judged = [t.judge_p_yes for t in flat if t.judge_p_yes is not None]
    out["judge_p_yes"] = float(np.mean(judged)) if judged else math.nan
    return out
