"""Stage gate: a wrong final answer never enters D_R, every id once, the report, SmolLM2 on real
GSM8K, and both components under kfp.local."""

import json
from pathlib import Path

import pytest

from patchgap.answers import equivalent
from patchgap.stages import gate, rewrite

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gsm8k_records(data_dir: Path) -> list[dict]:
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:5]
    return [json.loads(x) | {"idx": f"g{i}"} for i, x in enumerate(lines)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wrong(solution: str) -> str:
    head, _, answer = solution.rpartition("####")
    return f"{head}#### {int(answer.strip().replace(',', '')) + 1}"


def test_wrong_answers_never_enter_d_r_and_every_id_appears_once(
    tiny_llama: Path, gsm8k_records: list[dict], tmp_path: Path
) -> None:
    import datasets

    data = _write(tmp_path / "d.jsonl", gsm8k_records)
    cand_rows = []
    for i, r in enumerate(gsm8k_records[:4]):  # g4 has no candidates at all
        sol = r["answer"]
        texts = [_wrong(sol), "", "no final answer here"]
        if i % 2 == 0:  # even records also get one correct rewrite
            texts.append(sol.replace("####", "The answer is"))
        cands = [
            {"index": k, "trial": k // 2, "text": t, "num_tokens": 5, "finish_reason": "stop"}
            for k, t in enumerate(texts)
        ]
        cand_rows.append({"id": r["idx"], "question": r["question"], "candidates": cands})
    cdir = tmp_path / "cands"
    cdir.mkdir()
    _write(cdir / "candidates-00000-of-00001.jsonl", cand_rows)

    cfg = gate.Config(
        model=str(tiny_llama), fields="gsm8k", reward={"judge": False}, batch_records=2
    )
    out, rep = tmp_path / "dr", tmp_path / "report"
    metrics = gate.run(
        cfg, {"dataset": data, "candidates": cdir}, {"dataset_r": out, "report": rep}
    )

    rows = [json.loads(x) for x in (out / gate.D_R_FILE).read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"g{i}" for i in range(5)]
    for r in rows:
        assert equivalent(r["solution"], r["answer"]), r["id"]
        prov = r["provenance"]
        if r["id"] in ("g0", "g2"):
            assert prov["status"] == "accepted" and prov["candidate_index"] == 3
            assert prov["gate_reasons"] == ["wrong_answer", "empty", "no_final_answer", "chosen"]
            assert prov["trial"] == 1 and prov["trials"] == 2
            assert prov["nll_pi0"] is not None
        else:
            assert prov["status"] == "fallback" and prov["candidate_index"] is None
            assert r["solution"] == gsm8k_records[int(r["id"][1])]["answer"]
    assert rows[4]["provenance"]["fallback_reason"] == "no_candidates"
    assert metrics["acceptance_rate"] == pytest.approx(0.4)
    assert metrics["fallback_count"] == 3
    assert "nll_gap" in metrics

    accepted = [json.loads(x) for x in (out / gate.ACCEPTED_FILE).read_text().splitlines()]
    assert [r["id"] for r in accepted] == ["g0", "g2"]
    js = datasets.load_dataset("json", data_files=str(out / gate.D_R_FILE), split="train")
    pq = datasets.load_dataset("parquet", data_files=str(out / gate.PARQUET_FILE), split="train")
    assert js["id"] == pq["id"] == [f"g{i}" for i in range(5)]
    assert pq[0]["provenance"]["status"] == "accepted"

    report = json.loads((rep / "gate_metrics.json").read_text())
    assert report["reasons"] == {"wrong_answer": 4, "empty": 4, "no_final_answer": 4}
    assert (rep / "gate_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (rep / "gate_report.html").read_text()
    assert "acceptance rate | 40.0%" in (rep / "gate_report.md").read_text()


def test_smollm2_prompt_only_rewrite_then_gate_on_real_gsm8k(
    smollm2: Path, gsm8k_records: list[dict], tmp_path: Path
) -> None:
    """pi0 alone (the paper's prompt-only baseline) rewrites 2 GSM8K problems; the judge runs."""
    data = _write(tmp_path / "d.jsonl", gsm8k_records[:2])
    rcfg = rewrite.Config(
        model=str(smollm2),
        fields="gsm8k",
        generation={"max_new_tokens": 24, "batch_size": 2},
        progress=False,
    )
    m1 = rewrite.run(rcfg, {"dataset": data}, {"candidates": tmp_path / "c"})
    assert m1["records"] == 2 and m1["generated_tokens"] > 3
    rows = [
        json.loads(x) for x in next((tmp_path / "c").glob("cand*.jsonl")).read_text().splitlines()
    ]
    assert all(len(r["candidates"][0]["text"].split()) > 3 for r in rows)  # real words

    gcfg = gate.Config(model=str(smollm2), fields="gsm8k", diversity_sample=8)
    out = tmp_path / "dr"
    m2 = gate.run(
        gcfg,
        {"dataset": data, "candidates": tmp_path / "c"},
        {"dataset_r": out, "report": tmp_path / "rep"},
    )
    d_r = [json.loads(x) for x in (out / gate.D_R_FILE).read_text().splitlines()]
    assert sorted(r["id"] for r in d_r) == ["g0", "g1"]
    assert all(equivalent(r["solution"], r["answer"]) for r in d_r)
    assert m2["mean_nll_d"] > 0 and m2["records"] == 2
    assert 0.0 <= m2["diversity_d_r_embedding_distance"] <= 1.0


def test_rewrite_and_gate_components_run_under_kfp_local(
    tiny_llama: Path, gsm8k_records: list[dict], tmp_path: Path
) -> None:
    import yaml
    from kfp import dsl, local
    from kfp.dsl import Dataset

    from patchgap.components.gate.component import gate as gate_component
    from patchgap.components.rewrite.component import rewrite as rewrite_component

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write(data_dir / "d.jsonl", gsm8k_records[:3])
    common = {"model": str(tiny_llama), "fields": "gsm8k"}
    rewrite_yaml = yaml.safe_dump(
        {
            **common,
            "template": "{question}\n{solution}",
            "generation": {"max_new_tokens": 4},
            "progress": False,
        }
    )
    gate_yaml = yaml.safe_dump({**common, "reward": {"judge": False}, "write_parquet": False})

    @dsl.pipeline
    def rewrite_and_gate(rewrite_config: str, gate_config: str) -> Dataset:
        data = dsl.importer(
            artifact_uri=str(data_dir), artifact_class=Dataset, reimport=False
        ).output
        cands = rewrite_component(config=rewrite_config, dataset=data)
        gated = gate_component(
            config=gate_config, dataset=data, candidates=cands.outputs["candidates"]
        )
        return gated.outputs["dataset_r"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    result = rewrite_and_gate(rewrite_config=rewrite_yaml, gate_config=gate_yaml)
    d_r = Path(result.output.path) / gate.D_R_FILE
    ids = [json.loads(x)["id"] for x in d_r.read_text().splitlines()]
    assert ids == ["g0", "g1", "g2"]


def _strip(solution: str) -> str:
    import re

    body, _, answer = solution.rpartition("####")
    return re.sub(r"<<[^>]*>>", "", body).strip() + f"\nThe answer is \\boxed{{{answer.strip()}}}."


def _candidates_dir(tmp_path: Path, records: list[dict], texts_of) -> Path:
    rows = []
    for r in records:
        texts = texts_of(r)
        cands = [
            {"index": k, "trial": 0, "sampling": "greedy" if k == 0 else "sample", "text": t}
            for k, t in enumerate(texts)
        ]
        rows.append({"id": r["idx"], "question": r["question"], "candidates": cands})
    cdir = tmp_path / "cands"
    cdir.mkdir()
    _write(cdir / "candidates-00000-of-00001.jsonl", rows)
    return cdir


def test_best_of_n_keeps_the_lowest_nll_feasible_candidate_and_reports_the_paired_gap(
    tiny_llama: Path, gsm8k_records: list[dict], tmp_path: Path
) -> None:
    """Three right candidates and a wrong one per record: the gate scores all of them and keeps
    the one pi0 finds most likely, greedy or sampled; the paired gap is over the accepted."""
    from patchgap.reward.scoring import GroupRewardScorer

    data = _write(tmp_path / "d.jsonl", gsm8k_records)

    def texts_of(r: dict) -> list[str]:
        clean = _strip(r["answer"])
        return [clean, "Step by step.\n" + clean, clean.lower(), _wrong(r["answer"])]

    cdir = _candidates_dir(tmp_path, gsm8k_records, texts_of)
    cfg = gate.Config(model=str(tiny_llama), fields="gsm8k", reward={"judge": False})
    out, rep = tmp_path / "dr", tmp_path / "rep"
    metrics = gate.run(
        cfg, {"dataset": data, "candidates": cdir}, {"dataset_r": out, "report": rep}
    )

    nll = GroupRewardScorer(cfg.reward, str(tiny_llama)).nll
    rows = [json.loads(x) for x in (out / gate.D_R_FILE).read_text().splitlines()]
    gaps = []
    for r, rec in zip(rows, gsm8k_records, strict=True):
        scores = nll.score(rec["question"], texts_of(rec)[:3])
        best = min(range(3), key=lambda i: (scores[i], i))
        prov = r["provenance"]
        assert prov["status"] == "accepted" and prov["candidate_index"] == best
        assert prov["sampling"] == ("greedy" if best == 0 else "sample")
        assert prov["nll_pi0"] == pytest.approx(scores[best], rel=1e-4)
        assert prov["gate_reasons"][3] == "wrong_answer"
        gaps.append(prov["nll_reference"] - prov["nll_pi0"])
    assert metrics["nll_gap_accepted_n"] == 5
    assert metrics["nll_gap_accepted"] == pytest.approx(sum(gaps) / 5, rel=1e-6)
    assert metrics["nll_gap_accepted_low"] <= metrics["nll_gap_accepted"]
    assert metrics["nll_gap_accepted"] <= metrics["nll_gap_accepted_high"]
    saved = json.loads((rep / "gate_metrics.json").read_text())
    assert saved["accepted_greedy"] + saved.get("accepted_sample", 0) == 5
    assert "paired (y* - rewrite) [95% CI]" in (rep / "gate_report.md").read_text()


def test_reasoning_check_gate_keeps_faithful_rewrites_and_falls_back_on_answer_only(
    tiny_llama: Path, gsm8k_records: list[dict], tmp_path: Path
) -> None:
    data = _write(tmp_path / "d.jsonl", gsm8k_records)

    def texts_of(r: dict) -> list[str]:
        answer = r["answer"].rpartition("####")[2].strip()
        # Even records: only degenerate candidates; odd ones also a faithful rewrite.
        texts = [f"The answer is {answer}.", r["question"] + f"\nThe answer is {answer}."]
        return texts + ([_strip(r["answer"])] if int(r["idx"][1:]) % 2 else [])

    cdir = _candidates_dir(tmp_path, gsm8k_records, texts_of)
    cfg = gate.Config(
        model=str(tiny_llama),
        fields="gsm8k",
        reward={"judge": True, "judge_kind": "reasoning_check"},
    )
    out, rep = tmp_path / "dr", tmp_path / "rep"
    metrics = gate.run(
        cfg, {"dataset": data, "candidates": cdir}, {"dataset_r": out, "report": rep}
    )
    rows = [json.loads(x) for x in (out / gate.D_R_FILE).read_text().splitlines()]
    for r in rows:
        prov = r["provenance"]
        assert prov["gate_reasons"][:2] == ["judge_rejected", "judge_rejected"]
        if int(r["id"][1:]) % 2:
            assert prov["status"] == "accepted" and prov["candidate_index"] == 2
            assert prov["judge_score"] == pytest.approx(1.0) and prov["judge_p_yes"] is None
        else:
            assert prov["status"] == "fallback"
    assert metrics["accepted_count"] == 2
    saved = json.loads((rep / "gate_metrics.json").read_text())
    assert saved["judge_kind"] == "reasoning_check"
    assert saved["judge_failed_quotes_question"] == 5 and saved["judge_failed_too_short"] >= 5
    assert "| judge | reasoning_check: restates >= 0.75" in (rep / "gate_report.md").read_text()


def test_calibrated_judge_sets_its_threshold_on_the_references_before_gating(
    tiny_llama: Path, gsm8k_records: list[dict], tmp_path: Path
) -> None:
    from patchgap.reward.scoring import calibrated_threshold

    data = _write(tmp_path / "d.jsonl", gsm8k_records)
    cdir = _candidates_dir(tmp_path, gsm8k_records, lambda r: [_strip(r["answer"])])
    reward = {"judge": True, "judge_kind": "pi0_calibrated", "judge_calibration": {"quantile": 0.5}}
    cfg = gate.Config(model=str(tiny_llama), fields="gsm8k", reward=reward)
    out, rep = tmp_path / "dr", tmp_path / "rep"
    gate.run(cfg, {"dataset": data, "candidates": cdir}, {"dataset_r": out, "report": rep})

    scorer = gate._scorer(cfg).load()
    refs = [r["answer"] for r in gsm8k_records]
    answers = [r["answer"].rpartition("####")[2].strip() for r in gsm8k_records]
    margins = [
        v[0].log_odds  # the default calibration score
        for v in scorer.judge.verdicts(
            [r["question"] for r in gsm8k_records], answers, [[s] for s in refs]
        )
    ]
    saved = json.loads((rep / "gate_metrics.json").read_text())
    assert saved["judge_kind"] == "pi0_calibrated" and saved["judge_calibration_references"] == 5
    threshold = calibrated_threshold(margins, 0.5)
    assert saved["judge_calibration_threshold"] == pytest.approx(threshold, rel=1e-4, abs=1e-6)
    rows = [json.loads(x) for x in (out / gate.D_R_FILE).read_text().splitlines()]
    for r in rows:
        score = r["provenance"]["judge_score"]
        if r["provenance"]["status"] == "accepted":
            assert score >= saved["judge_calibration_threshold"]
        else:
            assert r["provenance"]["gate_reasons"] == ["judge_rejected"]
