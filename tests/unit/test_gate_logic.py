"""Gate decisions, sharding and report statistics: pure logic, no model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from patchgap.data.records import Record
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
