"""Sources: where a dataset comes from. A :class:`DatasetSpec` names a local file or folder, an
``s3://`` URI, a named set of the registry (resolved through the data directory, then the hub) or
a hub dataset (``hf://owner/name``); :func:`resolve` turns it into a :class:`Source` whose rows
the readers produce.

Everything fetched from S3, training data and evaluation sets alike, lands in one cache root:
``<cache dir>/datasets/`` (see :func:`patchgap.settings.cache_dir`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from patchgap.config import StrictModel
from patchgap.data.fields import PRESETS, FieldMap
from patchgap.data.readers import SUFFIXES, Row, rows_dir, rows_file, rows_hub
from patchgap.data.registry import SOURCE_ROLES, NamedSet, named_set_path, named_sets
from patchgap.errors import ConfigError, DataError
from patchgap.settings import DATA_DIR_ENV, cache_dir, data_dir, hub_dir
from patchgap.settings import data_dir as default_data_dir
from patchgap.storage import store


class DatasetSpec(StrictModel):
    """Where a dataset comes from and which part of it to use."""

    source: str = Field(
        description="Local .jsonl/.json/.parquet file or folder, s3:// URI, named set "
        "(gsm8k:train, math500, ...; see `patchgap data ls`) or hf://owner/name."
    )
    fields: str | FieldMap = Field(
        "auto", description="Preset name, a FieldMap, or 'auto' (named set's preset / guessed)."
    )
    split: str | None = Field(None, description="Split of a named set or hub dataset.")
    hub_config: str | None = Field(None, description="Config name of an hf:// dataset.")
    limit: int | None = Field(None, ge=1, description="Use at most this many valid records.")
    shuffle: bool | None = Field(
        None,
        description="Seeded shuffle by id. Unset: shuffle exactly when limit is set, which makes "
        "the limit a fixed seeded subset; false with a limit takes the first valid records.",
    )
    seed: int = Field(0, description="Seed of the shuffle / subset.")
    id_prefix: str | None = Field(
        None, description="Prefix of positional ids (default: set name or file stem)."
    )

    @field_validator("fields")
    @classmethod
    def _known_preset(cls, value: str | FieldMap) -> str | FieldMap:
        if isinstance(value, str) and value != "auto" and value not in PRESETS:
            raise ValueError(f"unknown field preset {value!r}; known: auto, {', '.join(PRESETS)}")
        return value


def as_spec(spec: DatasetSpec | str | Path) -> DatasetSpec:
    """Accept a plain source string or path wherever a spec is expected."""
    if isinstance(spec, DatasetSpec):
        return spec
    return DatasetSpec(source=str(spec))


def cached_path(uri: str, *, external: bool = False) -> Path:
    """A local copy of an ``s3://`` URI under the one cache root of datasets (a file or a
    folder, as the URI names). ``external``: the object need not carry a manifest."""
    dest = cache_dir() / "datasets" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(store.fetch_to_local(uri, dest, external=external))


def resolve_path(path: str | Path, data_dir: Path | None = None) -> Path:
    """A local path for an evaluation set's ``path``: ``s3://`` URIs are fetched into the cache;
    relative paths are looked up beside the working directory first, then in the data
    directory."""
    text = str(path)
    if text.startswith("s3://"):
        return cached_path(text, external=True)
    p = Path(text.removeprefix("file://")).expanduser()
    if p.is_absolute() or p.exists():
        return p
    if data_dir is None:
        data_dir = default_data_dir()
    if data_dir is None:
        raise ConfigError(
            f"benchmark path {text!r} is relative and no data directory is set "
            "(set PATCHGAP_DATA_DIR to a folder laid out like shared/data)"
        )
    return Path(data_dir) / p


@dataclass
class Source:
    """A resolved source: what to call it, the prefix of positional ids, the preset of a named
    set, and the local path or the loaded hub split its rows come from."""

    display: str
    prefix: str
    preset: str | None = None
    path: Path | None = None
    hub_rows: Iterable[dict[str, Any]] | None = None  # a loaded hub split

    def rows(self) -> Iterator[Row]:
        """The rows of the source, through the reader of its format."""
        if self.hub_rows is not None:
            return rows_hub(self.hub_rows, self.display, self.prefix)
        assert self.path is not None
        if self.path.is_dir():
            return rows_dir(self.path, self.display, self.prefix)
        if not self.path.exists():
            raise DataError(f"{self.display}: no such file or folder")
        return rows_file(self.path, self.display, self.prefix)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve(spec: DatasetSpec, external: bool = False) -> Source:
    """The :class:`Source` a spec names; unknown or missing sources are one-line DataErrors."""
    source = spec.source.strip()
    if source.startswith("s3://"):
        return _resolve_s3(spec, source, external)
    if source.startswith("hf://"):
        return _hub_source(spec, source.removeprefix("hf://"), None, None)
    if source.startswith("file://"):
        source = source.removeprefix("file://")
    path = Path(source).expanduser()
    if path.exists():
        _no_split(spec, source)
        return Source(str(path), spec.id_prefix or _stem(path), path=path)
    name, _, split = source.partition(":")
    sources = named_sets(*SOURCE_ROLES)
    if name in sources:
        return _resolve_named(spec, sources[name], split or spec.split)
    if path.suffix.lower() in SUFFIXES or source.startswith(("/", ".", "~")):
        raise DataError(f"{source}: no such file or folder")
    if _HUB_NAME.fullmatch(source):
        return _hub_source(spec, source, None, None)
    raise DataError(
        f"{source}: not a file or folder, not a named set (see `patchgap data ls`), "
        "and not an s3:// or hf:// address"
    )


def _no_split(spec: DatasetSpec, source: str) -> None:
    if spec.split is not None:
        raise DataError(
            f"{source}: split={spec.split!r} applies only to named sets and hub datasets"
        )


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _resolve_named(spec: DatasetSpec, entry: NamedSet, split: str | None) -> Source:
    split = split or entry.default_split
    if split not in entry.paths:
        raise DataError(f"{entry.name}: no split {split!r}; known: {', '.join(entry.paths)}")
    label = entry.name if len(entry.paths) == 1 else f"{entry.name}:{split}"
    prefix = spec.id_prefix or label.replace(":", "-")
    local = named_set_path(entry.name, split)
    if local is not None:
        return Source(str(local), prefix, preset=entry.preset, path=local)
    root = data_dir()
    where = (
        f"{root / entry.paths[split]} does not exist"
        if root is not None
        else f"no data directory ({DATA_DIR_ENV} is unset and ../shared/data is absent)"
    )
    if entry.hub is None:
        raise DataError(
            f"{label}: {where} and the set has no hub source; set {DATA_DIR_ENV} to a folder "
            "laid out like shared/data"
        )
    hub_split = (entry.hub_splits or {}).get(split, split)
    try:
        src = _hub_source(spec, entry.hub, entry.hub_config, hub_split, prefix=prefix)
    except DataError as err:
        raise DataError(
            f"{label}: {where}, and {err}; set {DATA_DIR_ENV} to a folder laid out like shared/data"
        ) from None
    src.preset = entry.preset
    return src


def _hub_source(
    spec: DatasetSpec, repo: str, config: str | None, split: str | None, prefix: str | None = None
) -> Source:
    split = split or spec.split or "train"
    config = config or spec.hub_config
    display = f"hf://{repo}" + (f" ({config})" if config else "") + f" [{split}]"
    prefix = prefix or spec.id_prefix or f"{repo.rsplit('/', 1)[-1]}-{split}"
    return Source(display, prefix, hub_rows=_load_hub(repo, config, split, display))


def _resolve_s3(spec: DatasetSpec, uri: str, external: bool) -> Source:
    _no_split(spec, uri)
    local = cached_path(uri, external=external)
    stem = uri.rstrip("/").rsplit("/", 1)[-1]
    prefix = spec.id_prefix or (Path(stem).stem if local.is_file() else stem)
    return Source(uri, prefix, path=local)


def _load_hub(hub: str, config: str | None, split: str, display: str) -> Iterable[dict[str, Any]]:
    """A hub dataset split through ``datasets.load_dataset``: from its local copy under
    :func:`~patchgap.settings.hub_dir` when there is one, else from the hub (internet or the HF
    cache). ``config`` names one of the configs of the dataset card."""
    root = hub_dir()
    local = root / hub if root is not None and (root / hub).is_dir() else None
    try:
        import datasets  # heavy third-party import, needed only for hub sources

        return datasets.load_dataset(str(local) if local else hub, config, split=split)
    except Exception as err:  # offline, unknown repo, bad config or split: one message
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = local or "the hub"
        fix = (
            ""
            if local
            else f"; without hub access, put a copy of the dataset repository at "
            f"$PATCHGAP_HUB_DIR/{hub}/ or use a local source"
        )
        raise DataError(f"{display}: cannot load from {where}: {msg}{fix}") from None
