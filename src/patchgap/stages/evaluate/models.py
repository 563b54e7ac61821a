"""The models an evaluation scores: label -> local folder (config entries, the ``models`` input,
s3:// URIs, known names), the key their kept results go under, and :func:`released`, the one way
a loaded model leaves memory before the next one loads."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from patchgap.errors import ConfigError
from patchgap.lm.generation import resolve_model_path
from patchgap.stages.base import path_hash
from patchgap.stages.evaluate.config import Config
from patchgap.storage.store import fetch_to_local

Model = TypeVar("Model")


def resolve_models(config: Config, models_input: Path | None, workdir: Path) -> dict[str, Path]:
    """Label -> local model folder, from config entries and/or the `models` input folder."""
    folders: dict[str, Path] = {}
    if config.models:
        for entry in config.models:
            folders[entry.label] = _model_folder(entry.path, models_input, workdir / entry.label)
    elif models_input is not None:
        folders = _input_model_folders(models_input)
    if config.model is not None and config.base not in folders:
        base = _model_folder(config.model, None, workdir / config.base)
        folders = {config.base: base, **folders}
    if not folders:
        raise ConfigError("evaluate: no models; set `models:` or pass the `models` input")
    return folders


def _input_model_folders(models_input: Path) -> dict[str, Path]:
    """The model folders of the `models` input: itself, or each subfolder holding a model."""
    if (models_input / "config.json").is_file():
        return {models_input.name: models_input}
    folders: dict[str, Path] = {}
    for sub in sorted(p for p in models_input.iterdir() if p.is_dir()):
        # a stage output folder may hold the model under model/ (sft writes one)
        folder = sub if (sub / "config.json").is_file() else sub / "model"
        if (folder / "config.json").is_file():
            folders[sub.name] = folder
    if not folders:
        raise ConfigError(f"models input {models_input}: no model folders (config.json) in it")
    return folders


def _model_folder(path: str, models_input: Path | None, dest: Path) -> Path:
    if path.startswith("s3://"):
        return Path(fetch_to_local(path, dest))
    if models_input is not None and (models_input / path).is_dir():
        return models_input / path

    return resolve_model_path(path)


def model_key(path: Path) -> str:
    """What identifies a model's results: its files' content, not its folder name."""
    return path_hash(path)[:16]


@contextmanager
def released(model: Model, drop_weights: Callable[[Model], Any] | None = None) -> Iterator[Model]:
    """Yield ``model``; on leaving, drop its weights (``drop_weights``, else its ``close()``) and
    collect garbage, so that its memory is free before the next model loads. The wrapper object
    may outlive the block in the caller's frame: what it held is gone."""
    try:
        yield model
    finally:
        if drop_weights is not None:
            drop_weights(model)
        else:
            model.close()  # type: ignore[attr-defined]
        del model
        gc.collect()
