"""Shared fixtures. Fixture modules under tests/fixtures/ register themselves as plugins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub: models come from packages, data from the data directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = sorted(
    f"fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real public data folder (../shared/data or PATCHGAP_DATA_DIR); skip when absent."""
    from patchgap.settings import data_dir as resolve

    d = resolve()
    if d is None or not d.is_dir():
        pytest.skip(
            "no data directory: set PATCHGAP_DATA_DIR to a folder laid out like shared/data"
        )
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip gpu-marked tests when CUDA is absent, with the reason shown."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tier
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
