"""Gate decisions, sharding and report statistics: pure logic, no model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from patchgap.data.fields import Record
from patchgap.reports.gate import GateStats, distinct_n, mean_pairwise_distance, write_report
from patchgap.reward.rewards import RewardTerms
from patchgap.stages import gate, rewrite


def _terms(answer_ok: bool, judge_ok: bool = True, nll: float | None = None) -> RewardTerms:
    ok = answer_ok and judge_ok
    return RewardTerms(
        r_task=float(ok),
        r_dist=0.0,
        r_div=0.0,
        total=float(ok),
        nll=nll if ok else None,
        answer_ok=answer_ok,
        judge_ok=judge_ok,
    )


def _cands(*texts: str) -> list[dict]:
    return [{"index": i, "trial": i // 2, "text": t} for i, t in enumerate(texts)]


def test_the_feasible_candidate_with_the_lowest_nll_wins() -> None:
    cands = _cands("a \\boxed{3}", "b \\boxed{3}", "c \\boxed{4}", "d \\boxed{3}")
    terms = [_terms(True, nll=2.0), _terms(True, nll=1.5), _terms(False), _terms(True, False)]
    d = gate.decide("ref #### 3", cands, terms)
    assert (d.status, d.candidate_index, d.trial, d.solution) == ("accepted", 1, 0, "b \\boxed{3}")
    assert d.reasons == ["feasible", "chosen", "wrong_answer", "judge_rejected"]
    assert d.nll == 1.5


def test_a_wrong_answer_is_never_chosen_even_with_the_lowest_nll() -> None:
    # Terms claiming r_task = 1 for a wrong answer cannot sneak it in: the answer flag decides.
    bad = RewardTerms(1.0, 0.0, 0.0, 1.0, nll=0.1, answer_ok=False, judge_ok=True)
    d = gate.decide("ref #### 3", _cands("x \\boxed{4}"), [bad])
    assert d.status == "fallback" and d.solution == "ref #### 3"
    assert d.fallback_reason == gate.NONE_FEASIBLE and d.reasons == ["wrong_answer"]


def test_fallback_without_candidates_and_reason_kinds() -> None:
    d = gate.decide("ref #### 3", [], [])
    assert (d.status, d.fallback_reason, d.candidate_index) == ("fallback", "no_candidates", None)
    assert gate.candidate_reason("  ", False, False) == gate.EMPTY
    assert gate.candidate_reason("no number at all", False, False) == gate.NO_FINAL_ANSWER
    assert gate.candidate_reason("so \\boxed{5}", False, False) == gate.WRONG_ANSWER
    assert gate.candidate_reason("so \\boxed{5}", True, False) == gate.JUDGE_REJECTED


def test_unscored_feasible_candidate_ranks_after_scored_ones() -> None:
    terms = [_terms(True, nll=float("nan")), _terms(True, nll=9.0)]
    assert gate.decide("r", _cands("a 1", "b 1"), terms).candidate_index == 1


@pytest.mark.parametrize("by", ["order", "hash"])
def test_shards_partition_records_deterministically(by: str) -> None:
    ids = [f"r{i}" for i in range(50)]
    shards = [
        [i for n, i in enumerate(ids) if rewrite.shard_of(n, i, 3, by) == s] for s in range(3)
    ]
    assert sorted(itertools.chain(*shards)) == sorted(ids)
    assert all(shards)  # no empty shard for 50 records
    again = [[i for n, i in enumerate(ids) if rewrite.shard_of(n, i, 3, by) == s] for s in range(3)]
    assert again == shards


def test_batches_keep_record_order_and_size() -> None:
    recs = iter([Record(f"r{i}", "q", "s", "1") for i in range(7)])
    batches = list(rewrite.iter_batches(recs, 3, 1, 2, "order"))
    assert [[r.id for r in b] for b in batches] == [["r1", "r3", "r5"]]


def test_rewrite_config_rejects_a_shard_outside_the_range() -> None:
    from patchgap.config import validate
    from patchgap.errors import ConfigError

    with pytest.raises(ConfigError, match="shard_index 2 must be < num_shards 2"):
        validate(rewrite.Config, {"shard_index": 2, "num_shards": 2}, "rewrite")


def test_distinct_n_and_pairwise_distance() -> None:
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 4))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    brute = np.mean([(1 - unit[i] @ unit[j]) / 2 for i, j in itertools.combinations(range(6), 2)])
    assert mean_pairwise_distance(emb) == pytest.approx(brute)
    assert mean_pairwise_distance(np.ones((4, 3))) == pytest.approx(0.0)


class _Embedder:
    def encode(self, texts: list[str]) -> np.ndarray:
        return np.array([[len(t), 1.0] for t in texts])


def test_report_files_and_metrics(tmp_path: Path) -> None:
    stats = GateStats(sample_size=3, seed=0)
    for i in range(10):
        rec = Record(f"r{i}", "q", f"reference solution {i}", "1")
        cands = _cands("good 1", "bad 2")
        terms = [_terms(i % 2 == 0, nll=1.0), _terms(False)]
        d = gate.decide(rec.solution, cands, terms)
        stats.add(rec, d, nll_ref=3.0, n_tokens=5, ref_tokens=8)
    assert len(stats.sample_dr) == 3  # the diversity sample stays bounded
    stats.embed_diversity(_Embedder())
    m = write_report(stats, tmp_path, {"model": "tiny"})
    assert m["acceptance_rate"] == 0.5 and m["fallback_count"] == 5
    # Accepted rewrites at NLL 1.0, fallbacks keep the reference's 3.0: D_R mean 2.0, gap 1.0.
    assert m["mean_nll_d"] == 3.0 and m["nll_gap"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "gate_metrics.json").read_text())
    assert saved["reasons"] == {"wrong_answer": 15}  # 10 "bad 2" + 5 odd-record "good 1"
    assert "| acceptance rate | 50.0% |" in (tmp_path / "gate_report.md").read_text()
    assert (tmp_path / "gate_plot.png").stat().st_size > 1000


def test_paired_gap_over_the_accepted_records_is_reported_apart_from_the_fallbacks(
    tmp_path: Path,
) -> None:
    from patchgap.reports.stats import bootstrap_ci

    stats = GateStats(sample_size=4, seed=0, judge="reasoning_check: ...")
    gaps = []
    for i in range(12):
        rec = Record(f"r{i}", "q", f"reference {i}", "1")
        greedy = {"index": 0, "trial": 0, "sampling": "greedy", "text": "greedy 1"}
        sampled = {"index": 1, "trial": 0, "sampling": "sample", "text": "sampled 1"}
        # Records 0-7 accepted (the sampled candidate wins on odd ones), 8-11 fall back.
        accepted = i < 8
        nll_greedy, nll_sampled = 1.0 + i / 10, (0.5 if i % 2 else 2.0) + i / 10
        terms = [
            _terms(accepted, nll=nll_greedy),
            _terms(accepted, judge_ok=i % 2 == 1, nll=nll_sampled),
        ]
        d = gate.decide(rec.solution, [greedy, sampled], terms)
        assert d.sampling == ("sample" if accepted and i % 2 else "greedy" if accepted else None)
        if accepted:
            gaps.append(2.0 - d.nll)
        stats.add(rec, d, nll_ref=2.0, n_tokens=5, ref_tokens=8)
    m = write_report(stats, tmp_path)
    assert m["nll_gap_accepted_n"] == 8
    assert m["nll_gap_accepted"] == pytest.approx(sum(gaps) / 8)
    assert (m["nll_gap_accepted_low"], m["nll_gap_accepted_high"]) == bootstrap_ci(gaps, seed=0)
    assert m["nll_gap_accepted_low"] <= m["nll_gap_accepted"] <= m["nll_gap_accepted_high"]
    # Over all records the fallbacks dilute it: they keep y*, a gap of 0.
    assert m["nll_gap"] == pytest.approx(sum(gaps) / 12)
    assert (m["accepted_greedy"], m["accepted_sample"]) == (4, 4)
    md = (tmp_path / "gate_report.md").read_text()
    assert "gap on the accepted records, paired (y* - rewrite) [95% CI] | +" in md
    assert "n=8 |" in md and "| judge | reasoning_check: ... |" in md
    assert "| accepted sample candidate | 4 |" in md


def test_judge_failures_are_counted_by_criterion(tmp_path: Path) -> None:
    stats = GateStats(sample_size=2, seed=0)
    rec = Record("r0", "q", "reference", "1")
    failed = RewardTerms(
        r_task=0.0,
        r_dist=0.0,
        r_div=0.0,
        total=0.0,
        answer_ok=True,
        judge_ok=False,
        judge_failed=("few_results", "too_short"),
    )
    d = gate.decide(rec.solution, _cands("The answer is 1.", "2"), [failed, _terms(False)])
    assert d.status == "fallback" and d.reasons == ["judge_rejected", "wrong_answer"]
    stats.add(rec, d, nll_ref=2.0, n_tokens=3, ref_tokens=3)
    m = write_report(stats, tmp_path)
    assert m["judge_failed_few_results"] == 1 and m["judge_failed_too_short"] == 1
    assert m["nll_gap_accepted_n"] == 0 and math.isnan(m["nll_gap_accepted"])
    assert "| judge: few_results | 1 |" in (tmp_path / "gate_report.md").read_text()


def test_the_run_report_shows_the_accepted_gap_and_the_judge() -> None:
    from patchgap.reports.results import PROMPT_ONLY, RL, RunResults, construction_rows

    new = {
        "records": 10.0,
        "nll_gap": 0.05,
        "nll_gap_accepted": 0.1,
        "nll_gap_accepted_low": -0.02,
        "nll_gap_accepted_high": 0.21,
        "nll_gap_accepted_n": 5.0,
        "accepted_greedy": 3.0,
        "accepted_sample": 2.0,
        "judge_description": "reasoning_check: restates >= 0.75 of the intermediate results",
    }
    old = {"records": 10.0, "nll_gap": -0.1, "judge": False}  # a gate from before the figure
    results = RunResults(
        "r", {}, gates={RL: new, PROMPT_ONLY: old}, rewrites={RL: [], PROMPT_ONLY: []}
    )
    rows = {r[0]: r[1:] for r in construction_rows(results)}
    assert rows["NLL gap, accepted records only, paired [95% CI]"] == [
        "n/a",
        "+0.100 [-0.020, +0.210] n=5",
    ]
    assert rows["accepted greedy / sampled candidates"][1] == "3 / 2"
    assert rows["judge"] == ["off", "reasoning_check"]
