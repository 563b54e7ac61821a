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

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

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
