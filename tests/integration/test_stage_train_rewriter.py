"""The train-rewriter stage end to end on CPU: GRPO steps on a tiny random model and on
SmolLM2-135M, checkpoints in the embedded S3, kill -9 and resume, and the KFP component under
kfp.local.

No ``from __future__ import annotations``: KFP reads the pipeline's annotations at runtime."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from patchgap.reward.rewards import RewardTerms, group_rewards
from patchgap.stages import train_rewriter as tr
from patchgap.stages.base import execute

pytestmark = pytest.mark.integration

QUESTIONS = [(2, 3), (4, 4), (7, 5), (9, 1), (6, 6), (8, 3)]
ANSWER_FIRST = (
    "{question}\nA correct solution: {solution}\n"
    "Give the final answer as \\boxed{{answer}} first, then explain."
)


def write_dataset(path: Path) -> Path:
    """Easy GSM8K-style records: the answer is reachable in a handful of tokens."""
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
        for a, b in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class FakeScorer:
    """The paper's reward math on made-up measurements, so a random model gets reward variance
    (every other member of a group feasible) and the test sees exactly what the reward got."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, list[str]]]] = []
        self.solutions: list[list[str] | None] = []

    def score_groups(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        groups: Sequence[Sequence[str]],
        reference_solutions: Sequence[str] | None = None,
    ) -> list[list[RewardTerms]]:
        self.calls.append([(q, list(g)) for q, g in zip(questions, groups, strict=True)])
        self.solutions.append(None if reference_solutions is None else list(reference_solutions))
        out = []
        for g in groups:
            seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in g]
            emb = np.array([np.random.default_rng(s).normal(size=8) for s in seeds])
            nll = [1.0 + (s % 97) / 10 for s in seeds]
            out.append(group_rewards([i % 2 == 0 for i in range(len(g))], None, nll, emb))
        return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Two busy cores: one intra-op thread avoids OpenMP spin contention (50x slower linears)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(model: Path, data: Path, **extra: Any) -> tr.Config:
    base: dict[str, Any] = {
        "model": str(model),
        "dataset": {"source": str(data), "fields": "gsm8k"},
        "num_generations": 3,
        "prompts_per_step": 2,
        "per_device_batch_size": 3,
        "max_completion_length": 16,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16},
        "progress": False,
    }
    base.update(extra)
    return tr.Config.model_validate(base)


def _capture_params(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Snapshot the policy's parameters when training begins and ends."""
    from patchgap.training.callbacks import StepMetricsCallback

    snaps: dict[str, dict[str, Any]] = {}

    def snap(name: str, orig: Any) -> Any:
        def wrapped(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            snaps[name] = {k: v.detach().clone() for k, v in kw["model"].named_parameters()}
            return orig(self, args, state, control, **kw)

        return wrapped

    monkeypatch.setattr(
        StepMetricsCallback, "on_train_begin", snap("begin", StepMetricsCallback.on_train_begin)
    )
    monkeypatch.setattr(
        StepMetricsCallback, "on_train_end", snap("end", StepMetricsCallback.on_train_end)
    )
    return snaps


def _assert_only_lora_moved(snaps: dict[str, dict[str, Any]]) -> None:
    import torch

    begin, end = snaps["begin"], snaps["end"]
    lora = [k for k in begin if "lora_" in k]
    base = [k for k in begin if "lora_" not in k]
    assert lora and base
    assert any(not torch.equal(begin[k], end[k]) for k in lora), "no LoRA parameter changed"
    moved = [k for k in base if not torch.equal(begin[k], end[k])]
    assert not moved, f"frozen pi0 parameters changed: {moved[:3]}"


def test_tiny_model_grpo_steps_train_only_the_lora_on_whole_groups(
    tiny_llama: Path,
    tmp_path: Path,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    from patchgap.storage.store import Store

    scorer = FakeScorer()
    monkeypatch.setattr(tr, "_build_scorer", lambda config, model_src, device: scorer)
    snaps = _capture_params(monkeypatch)
    data = write_dataset(tmp_path / "data.jsonl")
    uri = f"s3://{s3_bucket}/ckpt"
    config = _config(
        tiny_llama, data, checkpoint_uri=uri, checkpoint_every=1, report_to="tensorboard"
    )
    out = tmp_path / "out"
    result = execute(tr, config, {}, {"adapter": str(out / "a"), "metrics": str(out / "m")})

    # The reward saw each step's 2 prompts as whole groups of K = 3 rewrites of one prompt.
    assert len(scorer.calls) == 2
    for call in scorer.calls:
        assert len(call) == 2 and all(len(group) == 3 for _, group in call)
        assert len({q for q, _ in call}) == 2
    # And each group's reference solution y*, for the reasoning-check judge, through TRL.
    solutions = {json.loads(x)["answer"] for x in data.read_text().splitlines()}
    for call, sols in zip(scorer.calls, scorer.solutions, strict=True):
        assert sols is not None and len(sols) == len(call) and set(sols) <= solutions
    _assert_only_lora_moved(snaps)

    # Checkpoints of steps 1 and 2 in the embedded S3, each complete (manifest present).
    store = Store.from_env()
    keys = [o.key for o in store.list(uri)]
    assert any(k.endswith("checkpoint-1/_manifest.json") for k in keys)
    (ckpt2,) = [k for k in keys if k.endswith("checkpoint-2/_manifest.json")]
    # Objects lie under the publish attempt the manifest names: ask the manifest, not the keys.
    manifest = store.read_manifest(f"{uri}/{ckpt2.removesuffix('/_manifest.json')}")
    assert manifest is not None and "adapter_model.safetensors" in manifest.files
    # report_to=tensorboard: event files beside the checkpoints and in the metrics output.
    assert any("/tensorboard/" in k and "events.out.tfevents" in k for k in keys)
    assert list((out / "m" / "tensorboard").glob("*/events.out.tfevents.*"))

    adapter = out / "a"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert not list(adapter.glob("*.bin")), "outputs are safetensors/JSON only"
    rows = [json.loads(x) for x in (out / "m" / tr.METRICS_JSONL).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["r_task"] == pytest.approx(2 / 3)  # the fake gate passes members 0 and 2 of 3
        assert r["reward"] > 0 and r["kl"] is not None and r["loss"] is not None
        assert 0 < r["reward_share"] <= 1 and r["seconds_per_step"] > 0
    assert (out / "m" / tr.PLOT_PNG).read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["global_step"] == 2
    assert result.metrics["r_task_last"] == pytest.approx(2 / 3)


_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {test_dir!r})
    import torch
    torch.set_num_threads(1)
    from test_stage_train_rewriter import FakeScorer
    from patchgap.training.callbacks import CheckpointSyncCallback
    from patchgap.stages import train_rewriter as tr
    from patchgap.stages.base import main

    class Counting(FakeScorer):
        def score_groups(self, q, a, g, reference_solutions=None):
            with open({calls!r}, "a") as fh:
                fh.write(json.dumps(len(g)) + "\\n")
            return super().score_groups(q, a, g, reference_solutions)

    tr._build_scorer = lambda config, model_src, device: Counting()
    kill_at = int(os.environ.get("KILL_AFTER_CHECKPOINT", "0"))
    orig = CheckpointSyncCallback.on_save

    def on_save(self, args, state, control, **kw):
        out = orig(self, args, state, control, **kw)
        if kill_at and state.global_step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a preempted pod: no clean-up at all
        return out

    CheckpointSyncCallback.on_save = on_save
    raise SystemExit(main(tr, sys.argv[1:]))
    """
)


def test_killed_run_resumes_from_its_last_complete_checkpoint(
    tiny_llama: Path, tmp_path: Path, s3_bucket: str, s3_server: Any
) -> None:
    from patchgap.storage.store import Store

    data = write_dataset(tmp_path / "data.jsonl")
    uri = f"s3://{s3_bucket}/ckpt"
    section = _config(
        tiny_llama, data, max_steps=4, checkpoint_uri=uri, checkpoint_every=2
    ).model_dump(mode="json")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(json.dumps({"train_rewriter": section}))
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(test_dir=str(Path(__file__).parent), calls=str(calls)))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(script),
        "--config",
        str(run_yaml),
        "--output",
        f"adapter={out / 'a'}",
        "--output",
        f"metrics={out / 'm'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AFTER_CHECKPOINT": "2"}

    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert len(calls.read_text().splitlines()) == 2  # steps 1 and 2 scored, then killed
    store = Store.from_env()
    keys = [o.key for o in store.list(uri)]
    assert any(k.endswith("checkpoint-2/_manifest.json") for k in keys)
    assert not any("checkpoint-4" in k for k in keys)
    # What a pod killed mid-upload of step 3 would leave: files without a manifest.
    run_prefix = keys[0].split("/")[0]
    store.put_bytes(b'{"global_step": 3}', f"{uri}/{run_prefix}/checkpoint-3/trainer_state.json")

    env["KILL_AFTER_CHECKPOINT"] = "0"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads(second.stdout[second.stdout.index("{") :])
    assert metrics["resumed_from_step"] == 2.0  # not the incomplete step 3, not zero
    assert metrics["global_step"] == 4.0
    # Only steps 3 and 4 were generated and scored again.
    assert len(calls.read_text().splitlines()) == 4
    rows = [json.loads(x) for x in (out / "m" / tr.METRICS_JSONL).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    # A pod that dies after the last checkpoint but before its outputs are kept: the rerun takes
    # checkpoint-4's adapter as it is, with no step past max_steps.
    adapter = (out / "a" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(out)
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    metrics = json.loads(third.stdout[third.stdout.index("{") :])
    assert metrics["resumed_from_step"] == 4.0 and metrics["global_step"] == 4.0
    assert len(calls.read_text().splitlines()) == 4  # nothing generated or scored again
    from safetensors.torch import load

    first_w, again_w = load(adapter), load((out / "a" / "adapter_model.safetensors").read_bytes())
    assert first_w.keys() == again_w.keys()
    assert all(first_w[k].equal(again_w[k]) for k in first_w)


def test_one_grpo_step_on_smollm2_with_the_real_reward(
    smollm2: Path,
    tmp_path: Path,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    from patchgap.storage.store import Store

    groups: list[list[str]] = []
    real = tr._build_scorer

    def recording(config: tr.Config, model_src: str, device: str) -> Any:
        scorer = real(config, model_src, device)
        inner = scorer.score_groups

        def score_groups(
            q: Sequence[str],
            a: Sequence[str],
            g: Sequence[Sequence[str]],
            reference_solutions: Sequence[str] | None = None,
        ) -> Any:
            groups.extend(list(x) for x in g)
            return inner(q, a, g, reference_solutions)

        scorer.score_groups = score_groups
        return scorer

    monkeypatch.setattr(tr, "_build_scorer", recording)
    snaps = _capture_params(monkeypatch)
    data = write_dataset(tmp_path / "data.jsonl")
    uri = f"s3://{s3_bucket}/ckpt"
    config = _config(
        smollm2,
        data,
        num_generations=4,
        per_device_batch_size=4,
        max_completion_length=32,
        max_steps=1,
        learning_rate=1e-4,
        checkpoint_uri=uri,
        checkpoint_every=1,
        # Answer first: 32 tokens of SmolLM2-135M then reach the right number often enough
        # that a group of 4 gets different rewards (and so an advantage to learn from).
        prompt_template=ANSWER_FIRST,
        # pi0's judge rejects 32-token fragments from a 135M model outright; the answer check,
        # NLL and diversity terms are real.
        reward={"judge": False},
    )
    out = tmp_path / "out"
    result = execute(tr, config, {}, {"adapter": str(out / "a"), "metrics": str(out / "m")})

    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    row = json.loads((out / "m" / tr.METRICS_JSONL).read_text().splitlines()[0])
    for key in ("reward", "r_task", "kl", "loss", "reward_share", "seconds_per_step"):
        assert row[key] is not None, key
    assert any(
        k.endswith("checkpoint-1/_manifest.json")
        for k in (o.key for o in Store.from_env().list(uri))
    )
    if row["reward_std"]:
        _assert_only_lora_moved(snaps)
    else:  # every rewrite got the same reward: no advantage, nothing may move at all
        pytest.fail(f"no reward variance in the SmolLM2 step: {groups}")
    assert result.metrics["global_step"] == 1
    # The reward's settings and timings go with the metrics (the NLL context mode included).
    scorer = json.loads((out / "m" / tr.REWARD_JSON).read_text())
    assert scorer["reward/nll_context"] == "chat" and scorer["reward/count_candidates"] == 8


def test_component_runs_under_kfp_local(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from kfp import dsl, local
    from kfp.dsl import Model

    from patchgap.components.train_rewriter.component import train_rewriter

    data = write_dataset(tmp_path / "data.jsonl")
    section = _config(tiny_llama, data, max_steps=1, reward={"judge": False}, merge_adapter=True)
    config = yaml.safe_dump(section.model_dump(mode="json"))

    @dsl.pipeline(name="train-rewriter-local")
    def pipe(config: str) -> Model:
        return train_rewriter(config=config).outputs["adapter"]

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    result = pipe(config=config)
    adapter = Path(result.output.path)
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / tr.ADAPTER_INFO).read_text())["steps"] == 1
    # merge_adapter: pi0 with the patch merged, loadable as a plain model folder.
    assert (adapter / "merged" / "model.safetensors").is_file()
    assert (adapter / "merged" / "tokenizer.json").is_file()
    html = list((tmp_path / "root").rglob("curves"))
    assert html and "data:image/png;base64," in html[0].read_text()
