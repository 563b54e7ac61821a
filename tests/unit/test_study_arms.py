"""The study's settings and arms on small hand-written records: which records each arm holds,
the seeded swap draw that avoids D, the jobs, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from patchgap.data.fields import Record
from patchgap.errors import ConfigError
from patchgap.study.arms import (
    ACCEPTED_FILE,
    ARMS_JSON,
    D_R_FILE,
    build_arms,
    draw_swap,
    normalise_question,
)
from patchgap.study.config import ARMS, StudySettings


def _rec(i: int, q: str | None = None, sol: str | None = None) -> dict:
    return {
        "id": f"d{i}",
        "question": q or f"What is {i} + {i}?",
        "solution": sol or f"{i} + {i} = {2 * i}. The answer is \\boxed{{{2 * i}}}.",
        "answer": str(2 * i),
    }


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gate(folder: Path, d: list[dict], accepted: set[int]) -> Path:
    """A gate's dataset_r folder: D_R with provenance and the accepted-only file."""
    rows = []
    for i, r in enumerate(d):
        ok = i in accepted
        sol = f"Rewritten: {r['solution']}" if ok else r["solution"]
        status = "accepted" if ok else "fallback"
        rows.append({**r, "solution": sol, "meta": {}, "provenance": {"status": status}})
    _jsonl(folder / D_R_FILE, rows)
    _jsonl(folder / ACCEPTED_FILE, [r for r in rows if r["provenance"]["status"] == "accepted"])
    return folder


@pytest.fixture
def world(tmp_path: Path) -> dict:
    d = [_rec(i) for i in range(6)]
    d_dir = tmp_path / "d"
    _jsonl(d_dir / "records.jsonl", d)
    pool = [Record(f"p{i}", f"Pool question {i}?", f"Pool solution {i}.", str(i)) for i in range(8)]
    # Already in D: by id, and by question up to case and whitespace.
    pool.append(Record("d1", "Something else?", "x", "1"))
    pool.append(Record("p-dup", "  what IS 2 +   2? ", "4", "4"))
    return {
        "d": d,
        "d_dir": d_dir,
        "rl": _gate(tmp_path / "gate-rl", d, {0, 2, 3}),
        "prompt": _gate(tmp_path / "gate-p", d, {4}),
        "pool": pool,
        "out": tmp_path / "arms",
    }


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_gate_file_names_match_the_gate_stage() -> None:
    from patchgap.stages import gate

    assert (D_R_FILE, ACCEPTED_FILE) == (gate.D_R_FILE, gate.ACCEPTED_FILE)


def test_all_arms_hold_the_right_records(world: dict) -> None:
    settings = StudySettings(seeds=[0, 1])
    out = build_arms(
        world["d_dir"], world["rl"], world["prompt"], world["pool"], settings, world["out"]
    )
    assert list(out) == ["arms", "jobs"] and list(out["arms"]) == list(ARMS)
    data = {a: _lines(world["out"] / a / "data.jsonl") for a in ARMS}
    assert [r["id"] for r in data["d"]] == [f"d{i}" for i in range(6)]
    assert data["d"][0] == world["d"][0]  # exactly the four training fields
    assert [r["id"] for r in data["ref_rl"]] == ["d0", "d2", "d3"]
    assert data["ref_rl"][1]["solution"] == world["d"][2]["solution"]
    assert [r["id"] for r in data["rw_rl"]] == ["d0", "d2", "d3"]
    assert all(r["solution"].startswith("Rewritten: ") for r in data["rw_rl"])
    assert data["rw_rl"][0]["question"] == world["d"][0]["question"]
    assert sum(r["solution"].startswith("Rewritten") for r in data["dr"]) == 3
    assert len(data["dr"]) == 6 and len(data["dr_prompt"]) == 6
    assert [r["id"] for r in data["rw_prompt"]] == ["d4"]
    assert len(data["swap_rl"]) == 3 and len(data["swap_prompt"]) == 1
    # The smaller draw is part of the larger; nothing of D is drawn.
    assert data["swap_prompt"][0] == data["swap_rl"][0]
    assert all(r["id"].startswith("p") and r["id"] != "p-dup" for r in data["swap_rl"])
    assert out["arms"]["rw_rl"] == {
        "records": 3,
        "ids": ["d0", "d2", "d3"],
        "description": ARMS["rw_rl"][2],
        "rewriter": "rl",
        "kind": "concentrated",
        "epochs": 3.0,
    }
    assert out["arms"]["d"]["kind"] == "full" and out["arms"]["d"]["rewriter"] is None
    assert len(out["jobs"]) == 9 * 2
    assert out["jobs"][:2] == [
        {"arm": "d", "seed": 0, "epochs": 1.0},
        {"arm": "d", "seed": 1, "epochs": 1.0},
    ]
    assert json.loads((world["out"] / ARMS_JSON).read_text()) == out


def test_swap_draw_is_seeded(world: dict) -> None:
    d = [Record(**r) for r in world["d"]]
    a = draw_swap(world["pool"], d, 4, seed=3, pool_name="pool")
    assert [r.id for r in a] == [r.id for r in draw_swap(world["pool"], d, 4, 3, "pool")]
    others = {tuple(r.id for r in draw_swap(world["pool"], d, 4, s, "pool")) for s in range(6)}
    assert len(others) > 1


def test_swap_pool_too_small_is_one_line(world: dict) -> None:
    d = [Record(**r) for r in world["d"]]
    with pytest.raises(ConfigError) as err:
        draw_swap(world["pool"], d, 9, seed=0, pool_name="gsm8k:train")
    msg = str(err.value)
    assert "\n" not in msg and "gsm8k:train" in msg and "8 records outside D" in msg


def test_prompt_arms_without_the_prompt_gate_are_refused(world: dict) -> None:
    settings = StudySettings(arms=["d", "rw_rl", "rw_prompt", "swap_prompt"])
    with pytest.raises(ConfigError, match="rw_prompt, swap_prompt need the prompt-only gate"):
        build_arms(world["d_dir"], world["rl"], None, world["pool"], settings, world["out"])
    ok = StudySettings(arms=["ref_rl", "rw_rl", "swap_rl"], seeds=[5])
    out = build_arms(world["d_dir"], world["rl"], None, world["pool"], ok, world["out"])
    assert [j["arm"] for j in out["jobs"]] == ["ref_rl", "rw_rl", "swap_rl"]
    assert not (world["out"] / "d").exists()


def test_an_arm_with_no_records_gets_no_job(world: dict, tmp_path: Path) -> None:
    none = _gate(tmp_path / "gate-none", world["d"], set())
    settings = StudySettings(arms=["d", "rw_rl", "swap_rl"], seeds=[0])
    out = build_arms(world["d_dir"], none, None, world["pool"], settings, world["out"])
    assert out["arms"]["rw_rl"]["records"] == 0 and "skipped" in out["arms"]["rw_rl"]
    assert [j["arm"] for j in out["jobs"]] == ["d"]


def test_accepted_record_not_in_d_is_named(world: dict, tmp_path: Path) -> None:
    from patchgap.errors import DataError

    bad = _gate(tmp_path / "gate-bad", [*world["d"], _rec(99)], {6})
    with pytest.raises(DataError, match="'d99' is not in D"):
        build_arms(
            world["d_dir"], bad, None, world["pool"], StudySettings(arms=["rw_rl"]), world["out"]
        )


def test_settings_validate() -> None:
    s = StudySettings()
    assert s.arms == list(ARMS) and s.seeds == [0, 1, 2] and s.snapshots == [0.25, 0.5, 1.0]
    assert s.swap_pool.source == "gsm8k:train"
    with pytest.raises(ValidationError, match="unknown arm 'rw_lr'"):
        StudySettings(arms=["d", "rw_lr"])
    with pytest.raises(ValidationError, match="at least one seed"):
        StudySettings(seeds=[])
    with pytest.raises(ValidationError, match="unique"):
        StudySettings(seeds=[1, 1])
    with pytest.raises(ValidationError, match=r"\(0, 1\]"):
        StudySettings(snapshots=[0.5, 2.0])
    with pytest.raises(ValidationError, match="epochs"):
        StudySettings(epochs={"full": 0})
    assert StudySettings(arms=["rw_rl", "d", "d"]).arms == ["d", "rw_rl"]
    assert normalise_question("  What IS\n2+2? ") == "what is 2+2?"


def test_a_bad_study_section_is_one_line_naming_file_and_arm(tmp_path: Path) -> None:
    import yaml

    from patchgap.run.prepare import load_run_settings

    data = tmp_path / "d.jsonl"
    _jsonl(data, [_rec(1)])
    cfg = {
        "run": {"pipeline": "study", "dataset": {"source": str(data)}},
        "study": {"arms": ["d", "rw_lr"]},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_run_settings(path)
    msg = str(err.value)
    assert "\n" not in msg and f"{path} [study]" in msg and "unknown arm 'rw_lr'" in msg
    cfg["study"] = {"arms": ["d"], "seeds": [0, 0]}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"\[study\].*unique"):
        load_run_settings(path)
    del cfg["study"]  # the defaults
    path.write_text(yaml.safe_dump(cfg))
    assert load_run_settings(path)[1].pipeline == "study"
