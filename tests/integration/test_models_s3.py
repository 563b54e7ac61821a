"""Models in pods: `patchgap models push` uploads a model folder with its manifest, and every
stage's model reference accepts the s3:// URI (downloaded and verified into the cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_pushed_model_resolves_from_s3(
    tiny_llama: Path, s3_server, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from patchgap.cli.main import cli
    from patchgap.errors import ConfigError
    from patchgap.lm.generation import resolve_model_path
    from patchgap.lm.models import load_tokenizer

    monkeypatch.setenv("PATCHGAP_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/models/tiny"
    res = CliRunner().invoke(cli, ["models", "push", str(tiny_llama), uri])
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"uploaded to {uri}" in res.output

    folder = resolve_model_path(uri)
    assert folder.is_relative_to(tmp_path / "cache")
    for name in ("config.json", "model.safetensors"):
        assert (folder / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert load_tokenizer(uri).padding_side == "left"

    with pytest.raises(ConfigError, match=r"no _manifest.json.*patchgap models push"):
        resolve_model_path(f"s3://{s3_bucket}/models/missing")
