"""The train-rewriter config: paper defaults, the group-size and batch arithmetic, the run
fingerprint that guards resumption, and the prompt rows handed to TRL."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchgap.config import validate
from patchgap.data.fields import Record
from patchgap.errors import ConfigError
from patchgap.stages import train_rewriter as tr


def _config(**data: object) -> tr.Config:
    return validate(tr.Config, dict(data), "test")


def test_defaults_are_the_papers_rl_settings() -> None:
    c = _config()
    assert (c.lora.r, c.lora.alpha, c.lora.target_modules) == (64, 32, "all-linear")
    assert (c.learning_rate, c.lr_scheduler, c.beta, c.clip_epsilon) == (
        3e-6,
        "constant",
        0.001,
        0.2,
    )
    assert (c.num_generations, c.temperature, c.prompts_per_step) == (5, 1.0, 504)
    assert (c.max_prompt_length, c.max_completion_length, c.num_epochs) == (2048, 4096, 2.0)
    assert c.checkpoint_every == 10
    assert (c.rollout.backend, c.rollout.vllm_mode) == ("auto", "colocate")
    assert c.prompt_template == tr.REWRITE_TEMPLATE


def test_reward_group_size_follows_k() -> None:
    assert _config(num_generations=4, prompts_per_step=2, per_device_batch_size=4).reward.k == 4
    assert (
        _config(num_generations=3, per_device_batch_size=3, reward={"judge": False}).reward.k == 3
    )
    with pytest.raises(ConfigError, match="reward.k=6 differs from num_generations=5"):
        _config(reward={"k": 6})


def test_unknown_and_bad_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key"):
        _config(lora={"rank": 8})
    with pytest.raises(ConfigError, match="num_generations"):
        _config(num_generations=1)
    with pytest.raises(ConfigError, match="not a multiple of per_device_batch_size=4"):
        _config(num_generations=5, prompts_per_step=3, per_device_batch_size=4)


def test_gradient_accumulation_fills_a_paper_step() -> None:
    c = _config()  # 504 prompts x K=5 = 2520 completions, 5 per micro-batch
    assert tr.gradient_accumulation(c, 1) == 504
    assert tr.gradient_accumulation(c, 8) == 63
    with pytest.raises(ConfigError, match="not a multiple of per_device_batch_size"):
        tr.gradient_accumulation(c, 5)


def test_fingerprint_ignores_how_long_and_where_but_not_what() -> None:
    base = _config()
    same = _config(max_steps=7, checkpoint_uri="s3://b/x", checkpoint_every=3, progress=False)
    assert tr.fingerprint(base) == tr.fingerprint(same)
    assert tr.fingerprint(base) != tr.fingerprint(_config(learning_rate=1e-5))
    assert tr.fingerprint(base) != tr.fingerprint(_config(prompt_template="{question} {solution}"))
    assert tr.fingerprint(base, "a.jsonl") != tr.fingerprint(base, "b.jsonl")


def test_prompt_rows_carry_the_reward_columns_and_drop_long_prompts() -> None:
    from patchgap.lm.tiny import train_tokenizer

    tok = train_tokenizer()
    records = [
        Record("a", "What is 2 + 3?", "2 + 3 = 5. #### 5", "5"),
        Record("b", "What is 4 + 4?", "4 + 4 = 8, so \\boxed{8}.", ""),
        Record("c", "Long " * 400, "x = 1. #### 1", "1"),
    ]
    rows, too_long = tr.build_prompt_rows(records, tok, "Q: {question}\nS: {solution}", 256)
    assert too_long == ["c"]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["prompt"] == [
        {"role": "user", "content": "Q: What is 2 + 3?\nS: 2 + 3 = 5. #### 5"}
    ]
    assert rows[0]["question"] == "What is 2 + 3?"
    # A record without a stored answer gets a* from its solution.
    assert rows[1]["reference_answer"] == "8"
    # y* travels with the row for the reasoning-check judge.
    assert rows[0]["reference_solution"] == "2 + 3 = 5. #### 5"


def test_calibrated_judge_is_calibrated_on_the_training_references() -> None:
    class Scorer:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def calibrate(self, questions, answers, solutions) -> None:
            self.calls.append((list(questions), list(answers), list(solutions)))

    rows = [
        {
            "id": f"r{i}",
            "question": f"q{i}",
            "reference_answer": str(i),
            "reference_solution": f"s{i}",
        }
        for i in range(10)
    ]
    cfg = tr.Config(
        model="m",
        num_generations=2,
        per_device_batch_size=2,
        reward={"judge_kind": "pi0_calibrated", "judge_calibration": {"references": 4}},
    )
    scorer = Scorer()
    tr._calibrate_judge(scorer, cfg, rows)
    ((questions, answers, solutions),) = scorer.calls
    assert len(questions) == 4 and [f"s{q[1:]}" for q in questions] == solutions
    tr._calibrate_judge(
        scorer, tr.Config(model="m", num_generations=2, per_device_batch_size=2), rows
    )
    assert len(scorer.calls) == 1  # the paper's judge needs no calibration


def test_stage_declares_its_interface() -> None:
    assert tr.NAME == "train_rewriter"
    assert tr.OUTPUTS == ("adapter", "metrics")
    assert set(tr.OPTIONAL_INPUTS) == set(tr.INPUTS) == {"dataset", "model"}
    for name, field in tr.Config.model_fields.items():
        assert field.description, f"Config.{name} has no help text"


def test_several_gpus_relaunch_under_accelerate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import subprocess

    from patchgap.training import launch

    for var in ("WORLD_SIZE", "LOCAL_RANK", launch.CHILD_ENV):
        monkeypatch.delenv(var, raising=False)
    config = _config(distributed="auto")
    outputs = {"adapter": tmp_path / "a", "metrics": tmp_path / "m"}
    outputs["metrics"].mkdir()
    monkeypatch.setattr(launch, "visible_gpus", lambda: 1)
    assert launch.maybe_relaunch(config, {}, outputs, tr.NAME) is None  # one GPU: train in-process

    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], env: dict[str, str], check: bool) -> subprocess.CompletedProcess:
        seen["cmd"], seen["env"] = cmd, env
        (outputs["metrics"] / "summary.json").write_text(json.dumps({"global_step": 3}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    assert launch.maybe_relaunch(config, {}, outputs, tr.NAME) == {"global_step": 3.0}
    cmd = seen["cmd"]
    assert isinstance(cmd, list)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1].endswith("configs/accelerate/zero2.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("-m", 3) + 1] == "patchgap.stages.train_rewriter"
    assert f"metrics={outputs['metrics']}" in cmd
    assert seen["env"][launch.CHILD_ENV] == "1"  # type: ignore[index]

    # Inside a launched process the stage never launches again.
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.maybe_relaunch(config, {}, outputs, tr.NAME) is None


def test_processes_setting_forces_cpu_processes_and_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from patchgap.training import launch

    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    monkeypatch.delenv(launch.PROCESSES_ENV, raising=False)
    assert launch.process_count() == (0, False)
    monkeypatch.setenv(launch.PROCESSES_ENV, "2")
    assert launch.process_count() == (2, True)  # no GPU: on the CPU (configs/accelerate/cpu.yaml)
    assert launch.accelerate_config("cpu").name == "cpu.yaml"
    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert launch.process_count() == (2, False)
    for bad, why in (("8", "more processes than the 4 visible"), ("two", "whole number")):
        monkeypatch.setenv(launch.PROCESSES_ENV, bad)
        with pytest.raises(ConfigError, match=f"^sft: PATCHGAP_PROCESSES='{bad}': .*{why}"):
            launch.process_count("sft")


def test_missing_accelerate_config_is_named(tmp_path: Path) -> None:
    from patchgap.training.launch import accelerate_config

    with pytest.raises(ConfigError, match="nowhere.yaml not found"):
        accelerate_config("zero2", f"{tmp_path}/nowhere.yaml")


def test_a_wired_dataset_is_fingerprinted_by_content(tmp_path: Path) -> None:
    c = _config()
    a, b, a_again = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "x" / "a.jsonl"
    a_again.parent.mkdir()
    a.write_text('{"question": "q", "answer": "#### 1"}\n')
    a_again.write_text(a.read_text())
    b.write_text('{"question": "q", "answer": "#### 2"}\n')
    fp = [tr.fingerprint(c, tr._dataset_identity(c, p)) for p in (a, a_again, b)]
    assert fp[0] == fp[1]  # same records under another KFP artifact path: same run
    assert fp[0] != fp[2]  # other records: checkpoints of the first run are not reused
    assert tr._dataset_identity(c, None) == "gsm8k:train"


def test_a_wired_dataset_is_read_as_staged_records_not_through_the_source_spec(
    tmp_path: Path,
) -> None:
    """The staged D the pipeline wires in is already records: the configured source's split,
    hub config and field map (paper.yaml's NuminaMath-CoT spec) do not apply to it, its subset
    settings do."""
    from patchgap.data.writers import write_records_jsonl

    staged = tmp_path / "d.jsonl"
    write_records_jsonl(
        [
            Record(f"r{i}", f"What is {i}+1?", f"{i}+1 = {i + 1}. \\boxed{{{i + 1}}}", str(i + 1))
            for i in range(5)
        ],
        staged,
    )
    c = _config(
        dataset={
            "source": "hf://AI-MO/NuminaMath-CoT",
            "split": "train",
            "fields": {"question": "problem", "solution": "solution"},
            "limit": 3,
            "seed": 0,
        }
    )
    records, source = tr._load_dataset(c, staged, tmp_path)
    assert source == str(staged)
    assert len(records) == 3 and {r.id for r in records} <= {f"r{i}" for i in range(5)}
    assert all(r.answer == str(int(r.id[1:]) + 1) for r in records)


def test_report_to_is_checked_and_does_not_change_the_fingerprint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from patchgap.stages import sft
    from patchgap.training import tracking

    with pytest.raises(ConfigError, match="report_to"):
        _config(report_to="wandb")
    with pytest.raises(ConfigError, match="report_to"):
        validate(sft.Config, {"report_to": "wandb"}, "test")
    # Switching tracking on when resuming keeps the run's checkpoints its own.
    tracked = _config(report_to="tensorboard")
    assert tr.fingerprint(tracked, "data") == tr.fingerprint(_config(), "data")
    assert "report_to" in sft.NOT_IN_FINGERPRINT
    assert tracking.report_to("none") == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"report_to=mlflow: .* pip install 'patchgap\[mlflow\]'"):
        tracking.report_to("mlflow")
