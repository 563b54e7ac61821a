"""The study report on a synthetic study whose answers are known: items written in the evaluate
stage's layout (one folder per label), arms.json, two gates' D_R rows and the rewriter's
metrics. Drift is planted as a line in gain per arm, so the frontier gaps, the equivalence of
gains, the per-record reduction and the acceptance test can be computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from patchgap.errors import ConfigError, DataError
from patchgap.reports import study as st

N_ITEMS = 40
STEPS = (10, 20, 30)  # gain at a step: step / 100 nats/token
SEEDS = (1, 2, 3)
REPS = 200

# arm -> (gain factor, drift offset at every positive step, noise key): drift = 0.2 * gain +
# offset. swap_rl shares ref_rl's noise key: the same numbers, so their gap is exactly 0.
ARMS = {
    "d": (1.0, 0.0, 1),
    "dr": (0.5, 0.0, 2),
    "ref_rl": (1.0, 0.0, 3),
    "rw_rl": (1.0, -0.01, 4),
    "swap_rl": (1.0, 0.0, 3),
    "ref_prompt": (1.0, 0.0, 5),
    "rw_prompt": (1.0, -0.005, 6),
}
K = {"rl": 8, "prompt": 2}


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _label(folder: Path, gain: float, drift: float) -> None:
    """One model's item files: every item moved by ``gain``/``drift`` from the base, plus a fixed
    per-item pattern (the same in every model, so items differ but pair)."""
    pattern = np.linspace(-0.02, 0.02, N_ITEMS)
    _write(
        folder,
        "heldout_nll_gsm8k",
        [
            {"id": f"test-{i}", "nll": 2.0 + 0.1 * (i % 7) - gain + pattern[i], "tokens": 50}
            for i in range(N_ITEMS)
        ],
    )
    _write(
        folder,
        "drift_nll",
        [
            {"id": f"arc_easy:q{i}", "nll": 0.5 + 0.01 * (i % 5) + drift + pattern[i], "tokens": 30}
            for i in range(N_ITEMS)
        ],
    )
    _write(
        folder,
        "arc_easy",
        [
            {
                "id": f"q{i}",
                "correct": True,
                "gold_logprob": -10.0 - i * 0.1 - drift,
                "gold_logprob_norm": -1.0,
                "gold_choice_logprob": math.log(0.6) - drift,
            }
            for i in range(N_ITEMS)
        ],
    )
    _write(folder, "gsm8k", [{"id": "test-0", "correct": False, "prediction": "1", "gold": "2"}])


def make_items(root: Path, arms: dict = ARMS) -> Path:
    items = root / "items"
    _label(items / "base", 0.0, 0.0)
    for arm, (factor, offset, key) in arms.items():
        for seed in SEEDS:
            rng = np.random.default_rng(100 * key + seed)
            for step in STEPS:
                gain = factor * step / 100 + rng.normal(0, 0.001)
                drift = 0.2 * factor * step / 100 + offset + rng.normal(0, 0.0005)
                _label(items / f"{arm}.s{seed}.step{step}", gain, drift)
    return items


def _gate_rows(accepted: int, n: int, ref: float, rewrite: float) -> list[dict]:
    rows = []
    for i in range(n):
        ok = i < accepted
        rows.append(
            {
                "id": f"r{i}",
                "question": "q",
                "solution": "s",
                "answer": "1",
                "provenance": {
                    "status": "accepted" if ok else "fallback",
                    "gate_reasons": ["chosen", "wrong_answer"]
                    if ok
                    else ["wrong_answer", "empty", "empty"],
                    "fallback_reason": None if ok else "none_feasible",
                    "nll_pi0": rewrite + 0.01 * i if ok else ref,
                    "nll_reference": ref,
                },
            }
        )
    return rows


def make_inputs(root: Path, arms: dict = ARMS) -> dict:
    items = make_items(root, arms)
    info = {
        a: {
            "records": K["rl"]
            if a.endswith("_rl")
            else K["prompt"]
            if a.endswith("_prompt")
            else 16,
            "ids": [],
            "kind": "full" if a in ("d", "dr") else "concentrated",
            "rewriter": "rl" if "rl" in a else "prompt" if "prompt" in a else None,
            "description": a,
        }
        for a in arms
    }
    arms_json = root / "arms.json"
    jobs = [{"arm": a, "seed": s} for a in arms for s in SEEDS]
    arms_json.write_text(json.dumps({"arms": info, "jobs": jobs}))
    gates = {}
    for rw, (ref, rewrite) in {"rl": (1.5, 1.2), "prompt": (1.5, 1.7)}.items():
        folder = root / f"gate_{rw}"
        _write(folder, "d_r", _gate_rows(K[rw], 16, ref, rewrite))
        gates[rw] = folder
    metrics = root / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": s, "reward": 0.1 * s, "r_task": 0.5}) + "\n" for s in (1, 2))
    )
    return {"items_dir": items, "arms_json": arms_json, "gates": gates, "rewriter_metrics": metrics}


CONFIG = {"equivalence_margin": 0.25, "bootstrap_reps": REPS, "seed": 0, "levels": 5}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, dict]:
    root = tmp_path_factory.mktemp("study")
    inputs = make_inputs(root)
    out = root / "out"
    figures = st.write_study(**inputs, out=out, config=CONFIG)
    return figures, out, inputs


def _h(figures: dict, hid: str, rewriter: str | None = None) -> dict:
    return next(
        h for h in figures["hypotheses"] if h["id"] == hid and h.get("rewriter") == rewriter
    )


def test_write_study_writes_the_four_files_and_a_verdict_table_first(written) -> None:
    figures, out, _ = written
    for name in ("study.json", "study.md", "frontiers.png", "reward_curve.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "study.json").read_text())["settings"]["bootstrap_reps"] == REPS
    md = (out / "study.md").read_text()
    assert md.index("## Verdicts") < md.index("## Hypotheses") < md.index("## Arms")
    assert "| H2 | +0.00" in md and "(primary)" in md and "(secondary)" in md
    assert [_h(figures, "H1", "rl")["verdict"], _h(figures, "H1", "prompt")["verdict"]] == [
        "supported",
        "refuted",
    ]


def test_h2_finds_the_planted_drift_gap_at_matched_gain(written) -> None:
    h2 = _h(written[0], "H2")
    assert h2["verdict"] == "supported"
    gap = h2["result"]["detail"]
    # levels span gains [0, 0.3]; rw_rl's line is 0.01 below from the first snapshot (gain 0.1)
    # on, and rises from the base (0, 0) to it: the gap at gain g < 0.1 is 0.1 * g
    for level, g in zip(gap["levels"], gap["gap"], strict=True):
        assert g == pytest.approx(0.01 if level >= 0.1 else 0.1 * level, abs=0.001)
    assert h2["result"]["figure"] == pytest.approx(0.0075, abs=0.001)
    assert 0 < h2["result"]["low"] < 0.0075 < h2["result"]["high"] < 0.012
    assert set(h2["result"]["seed_sd"]) == {"rw_rl", "ref_rl"}
    for m in ("p_gold", "logp_gold"):  # secondaries: numbers, no verdict
        assert h2["secondary"][m]["low"] > 0 and "verdict" not in h2["secondary"][m]


def test_identical_arms_show_no_gap(written) -> None:
    beside = _h(written[0], "H3")["beside"]["result"]
    assert beside["figure"] == pytest.approx(0.0, abs=1e-12)
    assert beside["low"] < 0 < beside["high"]
    h5 = _h(written[0], "H5")  # dr lies on d's line at half the gain
    assert h5["verdict"] == "not supported" and h5["result"]["low"] < 0 < h5["result"]["high"]


def test_equivalence_holds_for_equal_gains_and_fails_for_half_the_gain(written) -> None:
    h4 = _h(written[0], "H4")
    assert h4["verdict"] == "supported"
    assert h4["result"]["margin"] == pytest.approx(0.25 * 0.3, abs=0.002)
    half = h4["beside"]["result"]
    assert half["equivalent"] is False
    assert half["figure"] == pytest.approx(-0.15, abs=0.003)


def test_h6_matches_the_hand_computed_reduction_per_record(written) -> None:
    figures, _, inputs = written
    items = inputs["items_dir"]

    def final_drift(arm: str) -> float:
        means = []
        for seed in SEEDS:
            m = [
                json.loads(x)["nll"]
                for x in (items / f"{arm}.s{seed}.step30" / "drift_nll.jsonl")
                .read_text()
                .splitlines()
            ]
            b = [
                json.loads(x)["nll"]
                for x in (items / "base" / "drift_nll.jsonl").read_text().splitlines()
            ]
            means.append(np.mean(np.subtract(m, b)))
        return float(np.mean(means))

    rl = (final_drift("ref_rl") - final_drift("rw_rl")) / K["rl"]
    prompt = (final_drift("ref_prompt") - final_drift("rw_prompt")) / K["prompt"]
    h6 = _h(figures, "H6")
    assert h6["result"]["figure"] == pytest.approx(rl - prompt, abs=1e-9)
    assert h6["result"]["per_record"]["rl"] == pytest.approx(rl, abs=1e-9)
    # planted: 0.01 / 8 - 0.005 / 2 = -0.00125: the prompt-only rewriter removes more per record
    assert h6["verdict"] == "refuted" and h6["reading"] == "RL worse per accepted record"
    assert h6["acceptance"]["k_rl"] == 8 and h6["acceptance"]["k_prompt"] == 2
    flat = st.scalar_metrics(figures)
    assert flat["H6_figure"] == h6["result"]["figure"] and flat["H6_verdict"] == -1.0
    assert flat["H1_rl_verdict"] == 1.0 and flat["acceptance_prompt"] == 2 / 16


def test_acceptance_fisher_and_reasons_against_hand_values(written) -> None:
    gates = written[0]["gates"]
    rl = gates["acceptance"]["rl"]
    # accepted: [chosen, wrong_answer] x 8; fallbacks: [wrong_answer, empty, empty] x 8
    assert (rl["accepted"], rl["records"], rl["candidates"]) == (8, 16, 40)
    assert rl["reasons_candidates"] == {"chosen": 8, "empty": 16, "wrong_answer": 16}
    assert rl["reasons_records"] == {"chosen": 8, "empty": 8, "wrong_answer": 16}
    assert rl["fallback_reasons"] == {"none_feasible": 8}
    # two-sided Fisher: sum of the hypergeometric tables no more likely than 8/16 vs 2/16
    total = math.comb(32, 10)
    probs = [math.comb(16, x) * math.comb(16, 10 - x) / total for x in range(11)]
    expected = sum(p for p in probs if p <= probs[8] * (1 + 1e-7))
    assert gates["fisher"]["p"] == pytest.approx(expected, rel=1e-6)
    # records r0, r1 both accepted: prompt nll 1.7 + 0.01 i minus rl 1.2 + 0.01 i = 0.5
    assert gates["both_accepted"]["records"] == 2
    assert gates["both_accepted"]["diff"] == pytest.approx(0.5)
    assert "minus the RL one +0.5 [+0.5, +0.5]" in (written[1] / "study.md").read_text()


def test_h1_reads_the_gate_rows(written) -> None:
    h1 = _h(written[0], "H1", "rl")["result"]
    # nll_reference 1.5, rewrites 1.2 + 0.01 i for i < 8: mean gap 0.3 - 0.035
    assert h1["figure"] == pytest.approx(0.265)
    assert h1["low"] > 0


def test_frontier_points_and_final_figures(written) -> None:
    figures = written[0]
    pts = figures["frontiers"]["rw_rl"]
    assert [p["step"] for p in pts] == [0, *STEPS]
    assert pts[0]["drift"]["mean"] == 0.0 and pts[0]["gain"]["mean"] == 0.0
    last = pts[-1]
    assert last["gain"]["mean"] == pytest.approx(0.3, abs=0.002)
    assert last["drift"]["low"] <= last["drift"]["mean"] <= last["drift"]["high"]
    assert last["drift"]["mean"] == pytest.approx(0.05, abs=0.001)
    d = figures["arms"]["d"]
    assert d["final_steps"] == [30] and d["seeds"] == 3
    assert d["gain"]["mean"] == pytest.approx(0.3, abs=0.002) and d["gain"]["sd_seeds"] < 0.003
    # P(gold | choices) in points: 0.6 * (1 - exp(-0.06)) * 100 at d's final drift of 0.06
    assert d["p_gold"]["mean"] == pytest.approx(60 * (1 - math.exp(-0.06)), abs=0.01)
    reward = figures["reward"]
    assert [p["reward"] for p in reward["steps"]] == pytest.approx([0.1, 0.2])
    assert reward["terms"] == ["reward", "r_task"]


def test_missing_arms_are_not_tested(tmp_path: Path) -> None:
    arms = {a: v for a, v in ARMS.items() if a not in ("swap_rl", "d", "rw_prompt")}
    inputs = make_inputs(tmp_path, arms)
    info = json.loads(inputs["arms_json"].read_text())
    info["arms"]["rw_prompt"] = {"records": 0, "ids": [], "kind": "concentrated"}
    inputs["arms_json"].write_text(json.dumps(info))
    inputs["gates"].pop("prompt")
    figures = st.write_study(**inputs, out=tmp_path / "out", config=CONFIG)
    v = {st._hid(h): h["verdict"] for h in figures["hypotheses"]}
    assert v["H3"] == "not tested: arm swap_rl did not run (not among the study's arms)"
    assert v["H5"].startswith("not tested: arm d did not run")
    assert v["H6"] == "not tested: arm rw_prompt has no records"
    assert v["H1 (prompt)"] == "not tested: no gate output of the prompt rewriter"
    assert v["H2"] == "supported"
    assert _h(figures, "H4")["beside"]["result"]["not_tested"].startswith("arm d did not run")
    assert "fisher" not in figures["gates"]
    assert figures["caveats"] == []
    assert "not tested: arm swap_rl" in (tmp_path / "out" / "study.md").read_text()


def test_loader_names_the_missing_file_and_the_bad_label(tmp_path: Path) -> None:
    items = tmp_path / "items"
    _label(items / "base", 0.0, 0.0)
    _label(items / "rw_rl.s1.step10", 0.1, 0.01)
    (items / "rw_rl.s1.step10" / "gsm8k.jsonl").unlink()  # generative answers are not read
    study = st.load_items(items)
    assert study.runs["rw_rl"][1][10]["drift_nll"]["arc_easy:q0"] == pytest.approx(
        0.5 + 0.01 - 0.02
    )
    (items / "rw_rl.s1.step10" / "drift_nll.jsonl").unlink()
    with pytest.raises(DataError, match=r"rw_rl\.s1\.step10: missing item file drift_nll\.jsonl"):
        st.load_items(items)
    _label(items / "rw_rl.s1.step10", 0.1, 0.01)
    (items / "rw_rl.s1.step10" / "arc_easy.jsonl").unlink()
    with pytest.raises(DataError, match="missing item file arc_easy.jsonl"):
        st.load_items(items)
    _label(items / "rw_rl.s1.step10", 0.1, 0.01)
    _label(items / "rw_rl-seed1", 0.1, 0.01)
    with pytest.raises(DataError, match="'rw_rl-seed1' is neither 'base'"):
        st.load_items(items)
    with pytest.raises(DataError, match="no 'base' folder"):
        st.load_items(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="equivalence_margin"):
        st.Settings.from_config({"equivalence_margin": 0})


def test_one_seed_and_one_accepted_record_are_said_not_decided(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path, {"ref_rl": ARMS["ref_rl"]})
    for folder in inputs["items_dir"].glob("ref_rl.s[23].*"):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    _write(inputs["gates"]["rl"], "d_r", _gate_rows(1, 4, 1.5, 1.2))
    figures = st.write_study(**inputs, out=tmp_path / "out", config=CONFIG)
    assert _h(figures, "H1", "rl")["verdict"] == (
        "not tested: 1 accepted record(s) with both NLLs under pi0 (needs 2+)"
    )
    assert figures["caveats"] == ["ref_rl has 1 seed: its intervals hold no seed-to-seed variance."]
    assert "- ref_rl has 1 seed" in (tmp_path / "out" / "study.md").read_text()
