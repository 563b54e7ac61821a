"""Stage evaluate: deterministic numbers, forgetting of a damaged model detected with paired
tests, the report and its JSON, and the KFP component."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchgap.stages import evaluate as ev

pytestmark = pytest.mark.integration


def _run(cfg: ev.Config, models: Path | None, out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    return ev.run(cfg, {"models": models} if models else {}, {"report": out})


@pytest.fixture(scope="module")
def twice(tiny_llama: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny model evaluated twice (two labels, two loads) on a small slice of each kind."""
    out = tmp_path_factory.mktemp("eval")
    cfg = ev.Config(
        models=[
            {"label": "base", "path": str(tiny_llama)},
            {"label": "again", "path": str(tiny_llama)},
        ],
        baseline=None,
        math=["gsm8k", "sat_math"],
        general=["arc_easy"],
        choice=["agieval"],
        limit=3,
        generation={"max_new_tokens": 8, "device": "cpu"},
        bootstrap_reps=200,
        data_dir=str(data_dir),
    )
    metrics = _run(cfg, None, out)
    return {"out": out, "metrics": metrics}


def test_same_model_twice_gives_identical_numbers(twice: dict) -> None:
    m, out = twice["metrics"], twice["out"]
    benches = ["gsm8k", "sat_math", "agieval_gen", "arc_easy"]
    for b in benches:
        assert m[f"base/{b}/acc"] == m[f"again/{b}/acc"], b
        a = (out / "items" / "base" / f"{b}.jsonl").read_text()
        assert a == (out / "items" / "again" / f"{b}.jsonl").read_text(), b
        assert len(a.splitlines()) == 3  # the seeded subset of 3 items
    table = json.loads((out / "results.json").read_text())["forgetting_table"]
    again = table["models"]["again"]
    assert again["forgetting"]["arc_easy"] == 0.0
    assert again["vs_base"]["arc_easy"]["p_mcnemar"] == 1.0


def test_report_and_lm_eval_samples(twice: dict) -> None:
    out = twice["out"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Forgetting" in html
    md = (out / "report.md").read_text()
    assert "| base |" in md and "arc_easy" in md
    samples = [json.loads(x) for x in (out / "lm_eval_samples" / "base" / "arc_easy.jsonl").open()]
    assert len(samples) == 3 and all(s["acc"] in (0.0, 1.0) for s in samples)
    assert {s["id"] for s in samples} == {
        json.loads(x)["id"] for x in (out / "items" / "base" / "arc_easy.jsonl").open()
    }
    results = json.loads((out / "results.json").read_text())
    assert "acc,none" in results["lm_eval"]["base"]["arc_easy"]


@pytest.fixture(scope="module")
def damaged_smollm2(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with Gaussian noise added to every weight matrix (the 'forgetful' model)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("damaged") / "damaged"
    shutil.copytree(smollm2, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        gen = torch.Generator().manual_seed(0)
        for k, t in tensors.items():
            if t.dim() == 2 and t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                tensors[k] = (t.float() + 0.6 * t.float().std() * noise).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    return out


@pytest.mark.slow  # SmolLM2 through lm-eval twice: minutes on a shared 2-core CPU
def test_damaged_copy_shows_forgetting_with_significance(
    smollm2: Path, damaged_smollm2: Path, data_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "base").symlink_to(smollm2)
    (models / "sft_d").symlink_to(damaged_smollm2)
    cfg = ev.Config(
        math=[], general=["arc_easy"], limit=40, generation={"device": "cpu"}, bootstrap_reps=500
    )
    metrics = _run(cfg, models, tmp_path / "report")
    table = json.loads((tmp_path / "report" / "results.json").read_text())["forgetting_table"]
    row = table["models"]["sft_d"]
    assert metrics["sft_d/forgetting_mean"] > 0
    assert row["forgetting"]["arc_easy"] > 0
    test = row["vs_base"]["arc_easy"]
    assert test["n"] == 40 and 0.0 <= test["p_mcnemar"] <= 1.0
    assert test["a_only"] > test["b_only"]  # base right where the damaged copy is wrong
    assert "forgetting_significant" in row


def test_component_writes_report_artifacts(
    tiny_llama: Path, data_dir: Path, tmp_path: Path
) -> None:
    import yaml

    from patchgap.components.evaluate.component import evaluate as component

    class Art:
        def __init__(self, path: Path) -> None:
            self.path = str(path)
            self.metadata: dict = {}

    class Metrics:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, k: str, v: float) -> None:
            self.logged[k] = v

    cfg = {
        "math": ["amc23"],
        "general": [],
        "limit": 2,
        "generation": {"max_new_tokens": 4, "device": "cpu"},
    }
    metrics = Metrics()
    component.python_func(
        config=yaml.safe_dump(cfg),
        report=Art(tmp_path / "report"),
        metrics=metrics,
        report_html=Art(tmp_path / "r.html"),
        report_md=Art(tmp_path / "r.md"),
        base_model=Art(tiny_llama),
        sft_d=Art(tiny_llama),
    )
    assert "sft_d/amc23/acc" in metrics.logged
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_a_killed_evaluation_reuses_its_finished_results(
    tiny_llama: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ev.Config(
        models=[{"label": "base", "path": str(tiny_llama)}],
        baseline=None,
        math=["gsm8k", "sat_math"],
        general=["arc_easy"],
        limit=2,
        generation={"max_new_tokens": 4, "device": "cpu"},
        bootstrap_reps=100,
        data_dir=str(data_dir),
    )
    clean = _run(cfg, None, tmp_path / "clean")
    assert not (tmp_path / "clean" / "_state").exists()  # dropped once the report is written

    state = tmp_path / "state"
    resumable = cfg.model_copy(update={"state_uri": str(state)})
    real_save = ev.EvalState.save

    def killed_after_last_save(self: ev.EvalState, model: str, bench: str, *a, **kw) -> None:
        real_save(self, model, bench, *a, **kw)
        if bench == "arc_easy":
            raise RuntimeError("simulated kill before the report")

    monkeypatch.setattr(ev.EvalState, "save", killed_after_last_save)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(resumable, None, tmp_path / "resumed")
    monkeypatch.undo()

    ran: list[str] = []
    real_gen, real_lm = ev.generative_eval, ev.lm_eval_general
    monkeypatch.setattr(
        ev,
        "generative_eval",
        lambda c, p, m, ch, **kw: ran.extend(m) or real_gen(c, p, m, ch, **kw),
    )
    monkeypatch.setattr(
        ev, "lm_eval_general", lambda c, *a: ran.extend(c.general) or real_lm(c, *a)
    )
    resumed = _run(resumable, None, tmp_path / "resumed")
    assert ran == []  # every (model, benchmark) result came from the store
    assert resumed == clean
    for sub in ("items/base", "lm_eval_samples/base"):
        for f in sorted((tmp_path / "clean" / sub).glob("*.jsonl")):
            assert (tmp_path / "resumed" / sub / f.name).read_text() == f.read_text(), f
    assert not list(state.rglob("*.json"))  # pruned after success
