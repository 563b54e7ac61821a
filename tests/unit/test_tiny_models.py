"""Tiny random models and the loading helpers in patchgap.lm.models (no hub, seconds)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.errors import ConfigError
from patchgap.lm import models
from patchgap.lm.tiny import build_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fixture,cls", [("tiny_llama", "Llama"), ("tiny_qwen2", "Qwen2")])
def test_tiny_model_loads_in_eval_mode_from_safetensors(
    request: pytest.FixtureRequest, fixture: str, cls: str
) -> None:
    path = request.getfixturevalue(fixture)
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    model = models.load_causal_lm(path, device="cpu")
    assert type(model).__name__ == f"{cls}ForCausalLM"
    assert not model.training
    assert str(model.device) == "cpu"
    assert model.config.vocab_size == len(models.load_tokenizer(path))


def test_tiny_model_generates_batched_with_left_padding(tiny_qwen2: Path) -> None:
    model = models.load_causal_lm(tiny_qwen2)
    tok = models.load_tokenizer(tiny_qwen2)
    assert tok.padding_side == "left"
    outs = models.generate_text(model, tok, ["What is 2+3?", "Hi"], max_new_tokens=4)
    assert len(outs) == 2
    assert all(isinstance(o, str) for o in outs)
    # Random weights, but greedy decoding is still deterministic.
    assert models.generate_text(model, tok, ["What is 2+3?"], max_new_tokens=4) == outs[:1]


def test_tokenizer_round_trips_and_has_single_judge_tokens(tiny_llama: Path) -> None:
    tok = models.load_tokenizer(tiny_llama)
    for word in ("YES", "NO", " YES", " NO"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    for text in (
        "The answer is \\boxed{1234}.",
        "#### 72",
        "-3.75 + 1,000 = 996.25",
        "\\frac{1}{2} ∈ [0, 1]; héllo 日本 ✓",
    ):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Digits are split one by one, so numbers of any size share the same ten tokens.
    assert len(tok.encode("1234", add_special_tokens=False)) == 4
    assert tok.pad_token and tok.eos_token and tok.bos_token
    assert len({tok.pad_token_id, tok.eos_token_id}) == 2


def test_chat_template_renders_chatml(tiny_llama: Path) -> None:
    tok = models.load_tokenizer(tiny_llama)
    assert models.has_chat_template(tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
    ]
    prompt = models.apply_chat(tok, messages, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    full = models.apply_chat(
        tok, [*messages, {"role": "assistant", "content": "5"}], add_generation_prompt=False
    )
    assert full.endswith("<|im_start|>assistant\n5<|im_end|>\n")


def test_apply_chat_without_template_names_the_tokenizer(tiny_llama: Path) -> None:
    tok = models.load_tokenizer(tiny_llama)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        models.apply_chat(tok, [{"role": "user", "content": "x"}])


def test_build_is_deterministic_for_a_seed(tmp_path: Path, tiny_llama: Path) -> None:
    same = build_tiny_model(tmp_path / "a", "llama", seed=0)
    other = build_tiny_model(tmp_path / "b", "llama", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(same / name) == _digest(tiny_llama / name), name
    assert _digest(other / "model.safetensors") != _digest(same / "model.safetensors")
    # The tokenizer does not depend on the model seed.
    assert _digest(other / "tokenizer.json") == _digest(same / "tokenizer.json")


def test_build_rejects_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gpt9"):
        build_tiny_model(tmp_path / "x", "gpt9")


def test_trust_remote_code_is_off_by_default(tmp_path: Path, tiny_llama: Path) -> None:
    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama, folder)
    sentinel = tmp_path / "remote-code-ran"
    (folder / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n"
        "    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = models.load_causal_lm(folder)
    except ValueError as err:  # refusing is as good as ignoring: the code must not run
        assert "trust_remote_code" in str(err)
    else:
        assert type(model).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()


def test_dtype_option(tiny_qwen2: Path) -> None:
    import torch

    assert models.load_causal_lm(tiny_qwen2, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="float64"):
        models.load_causal_lm(tiny_qwen2, dtype="float64")


def test_missing_pad_token_falls_back_to_eos(tmp_path: Path, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    shutil.copy(tiny_llama / "config.json", tmp_path / "tok" / "config.json")
    loaded = models.load_tokenizer(tmp_path / "tok")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_resolve_model(tiny_llama: Path, tmp_path: Path) -> None:
    assert models.resolve_model(str(tiny_llama)) == tiny_llama
    with pytest.raises(ConfigError, match="does-not-exist"):
        models.resolve_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(ConfigError, match="does-not-exist"):
        models.resolve_model("./does-not-exist")
    spec = models.known_model("SmolLM2-135M-Instruct")
    assert spec is not None and spec.alias == "smollm2"


def test_hub_id_offline_is_one_clear_error() -> None:
    # The tests run with HF_HUB_OFFLINE=1: a hub id missing from the cache names cause and fix.
    with pytest.raises(ConfigError, match="someorg/not-a-local-model") as err:
        models.load_causal_lm("someorg/not-a-local-model")
    assert "hub cannot be reached" in str(err.value) and "s3://" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ref", ["not a model!", "a//b", "owner/name/extra"])
def test_reference_that_is_no_folder_s3_or_hub_id(ref: str) -> None:
    with pytest.raises(ConfigError, match="nor a hub id"):
        models.resolve_model(ref)


def test_shared_model_loads_once_per_process(tiny_llama: Path) -> None:
    models.clear_shared_models()
    first = models.shared_model(str(tiny_llama), "auto", "cpu")
    second = models.shared_model(tiny_llama, "auto", None)
    assert first.model is second.model and first.tokenizer is second.tokenizer
    model, tok = first  # unpacks like a tuple
    assert not model.training and tok.padding_side == "left"
    assert models.clear_shared_models() == 1
    assert models.shared_model(tiny_llama).model is not model
    models.clear_shared_models()


def test_device_for_defaults_to_what_exists() -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.device_for(None) == expected
    assert models.device_for("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            models.device_for("cuda")


def test_model_info_and_cli_info(tiny_qwen2: Path) -> None:
    from patchgap.cli.models import app

    meta = models.model_info(tiny_qwen2)
    model = models.load_causal_lm(tiny_qwen2)
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["architecture"] == "Qwen2ForCausalLM"
    assert meta["chat_template"] is True
    result = CliRunner().invoke(app, ["info", str(tiny_qwen2)])
    assert result.exit_code == 0, result.output
    assert "Qwen2ForCausalLM" in result.output
    assert f"{meta['parameters']:,}" in result.output
    assert "chat template  yes" in result.output


def test_cli_info_on_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    from patchgap.cli.models import app

    result = CliRunner().invoke(app, ["info", str(tmp_path / "nope")])
    assert isinstance(result.exception, ConfigError)
    assert "nope" in str(result.exception)
