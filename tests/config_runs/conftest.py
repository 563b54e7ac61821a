"""The tier's pi0: the tests' tiny random Llama with room for the configs' own lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Positions of the tier's tiny model: the longest context a shipped config asks for (paper.yaml:
#: vLLM's max_model_len 8192, prompts of 2048 tokens), so prompt and length limits keep their
#: values. Rotary positions have no weights: the model is as small as the suite's tiny_llama.
POSITIONS = 8192


@pytest.fixture(scope="session")
def tiny_llama_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` (tests/fixtures/models.py) with :data:`POSITIONS` positions."""
    from patchgap.lm.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    return build_tiny_model(out, "llama", seed=0, max_position_embeddings=POSITIONS)
