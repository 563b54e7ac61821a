"""SmolLM2-135M-Instruct: GGUF conversion (cached), idempotency, real text, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.lm import models

pytestmark = pytest.mark.integration


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_prepare_is_idempotent(smollm2: Path) -> None:
    before = _listing(smollm2)
    started = time.perf_counter()
    again = models.prepare_smollm2()
    assert time.perf_counter() - started < 1.0
    assert again == smollm2
    assert _listing(again) == before
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(before)
    assert not list(smollm2.glob("*.gguf"))
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config  # loads as plain safetensors


def test_chat_template_comes_from_the_gguf(smollm2: Path) -> None:
    tok = models.load_tokenizer(smollm2)
    prompt = models.apply_chat(tok, [{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's default system turn
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    assert tok.model_max_length == 8192


def _gguf_field(name: str):  # noqa: ANN202 - a GGUF scalar or string
    from gguf import GGUFReader

    return GGUFReader(models.smollm2_gguf_path()).fields[name].contents()


def test_special_token_ids_are_the_ggufs(smollm2: Path) -> None:
    """bos, eos and pad of the converted tokenizer, config and generation config are the ids
    the GGUF metadata states (read here with the gguf library, not through the converter)."""
    expected = {
        "bos": int(_gguf_field("tokenizer.ggml.bos_token_id")),
        "eos": int(_gguf_field("tokenizer.ggml.eos_token_id")),
        "pad": int(_gguf_field("tokenizer.ggml.padding_token_id")),
    }
    assert expected == {"bos": 1, "eos": 2, "pad": 2}  # SmolLM2: <|im_start|>, <|im_end|>
    tok = models.load_tokenizer(smollm2)
    assert {k: getattr(tok, f"{k}_token_id") for k in expected} == expected
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    config = json.loads((smollm2 / "config.json").read_text())
    for key, token_id in expected.items():
        assert generation[f"{key}_token_id"] == token_id
        assert config[f"{key}_token_id"] == token_id
    assert tok.chat_template == _gguf_field("tokenizer.chat_template")
    assert models.prepared_info(smollm2)["special_tokens"]["eos"] == expected["eos"]


def test_generation_stops_at_im_end(smollm2: Path) -> None:
    """A chat answer ends its turn with <|im_end|> well before the token limit."""
    import torch

    lm = models.shared_model(smollm2, "auto", "cpu")
    try:
        tok = lm.tokenizer
        prompt = models.apply_chat(tok, [{"role": "user", "content": "What is 2+3?"}])
        batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = lm.model.generate(**batch, max_new_tokens=64, do_sample=False)
    finally:
        models.clear_shared_models()
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    assert len(new) < 64
    assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert "<|im_start|>" not in tok.decode(new)


def test_conversion_check_refuses_a_wrong_eos(smollm2: Path, tmp_path: Path) -> None:
    """A folder whose tokenizer names another eos than the GGUF is an error naming both."""
    import shutil

    from patchgap.errors import ConfigError

    folder = tmp_path / "wrong"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2 / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_start|>"  # what transformers 5.17's GGUF loader picks
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"eos 1 \('<\|im_start\|>'\), GGUF 2"):
        models.check_conversion(folder, models.smollm2_gguf_path())


def test_conversion_by_other_versions_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished folder whose marker names another converter or library version is stale:
    converted again, not reused."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> dict[str, int]:
        calls.append(out)
        out.mkdir(parents=True)
        return {"eos": 2}

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "_sanity_generate", lambda folder: "5")
    path = models.prepare_smollm2(tmp_path)
    assert models.is_prepared(path) and len(calls) == 1
    marker = path / models.COMPLETE_MARKER
    info = json.loads(marker.read_text())
    info["versions"]["transformers"] = "4.57.0"
    marker.write_text(json.dumps(info))
    assert (
        models.stale_reason(path)
        == "made by other versions: transformers 4.57.0 -> "
        + (models.converter_versions()["transformers"])
    )
    models.prepare_smollm2(tmp_path)
    assert len(calls) == 2 and models.is_prepared(path)
    del info["versions"]  # a folder from before versions were recorded
    marker.write_text(json.dumps(info))
    assert not models.is_prepared(path)
    models.prepare_smollm2(tmp_path)
    assert len(calls) == 3


def test_q4_1_dequantisation_matches_gguf(smollm2: Path) -> None:
    """An unpermuted weight equals the gguf library's own dequantisation of the file."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(models.smollm2_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    expected = dequantize(tensor.data, tensor.tensor_type)
    with safe_open(smollm2 / "model.safetensors", "np") as st:
        got = st.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_greedy_generation_gives_english_text(smollm2: Path) -> None:
    lm = models.shared_model(smollm2, "auto", "cpu")
    try:
        (answer,) = models.generate_text(
            lm.model, lm.tokenizer, ["What is 2+3?"], max_new_tokens=16
        )
    finally:
        models.clear_shared_models()
    assert "5" in answer
    assert any(ch.isalpha() for ch in answer) or "=" in answer


def test_half_written_folder_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder without the completion marker is converted again; a finished one is kept."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> dict[str, int]:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "_sanity_generate", lambda folder: "5")
    stale = tmp_path / models.SMOLLM2_FOLDER
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"truncated")
    path = models.prepare_smollm2(tmp_path)
    assert path == stale and len(calls) == 1
    assert not (path / "model.safetensors").exists()
    assert models.prepared_info(path)["sanity_output"] == "5"
    models.prepare_smollm2(tmp_path)
    assert len(calls) == 1
    models.prepare_smollm2(tmp_path, force=True)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        models.SMOLLM2_FOLDER
    ]


def test_cli_prepare_ls_and_info(smollm2: Path) -> None:
    from patchgap.cli.models import app

    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "smollm2", "--cache-dir", str(smollm2.parent)])
    assert result.exit_code == 0, result.output
    assert "already prepared" in result.output
    result = runner.invoke(app, ["ls", "--cache-dir", str(smollm2.parent)])
    assert result.exit_code == 0, result.output
    assert "smollm2" in result.output and "yes" in result.output
    result = runner.invoke(app, ["info", str(smollm2)])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "134,515,008" in result.output
    result = runner.invoke(app, ["prepare", "gpt9"])
    assert result.exit_code != 0 and "gpt9" in str(result.exception)
