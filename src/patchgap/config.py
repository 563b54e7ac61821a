"""Config models: strict (unknown keys are errors), frozen after load, loadable from YAML.

Every stage has one ``Config`` subclass of :class:`StrictModel`; the same schema serves YAML files,
CLI flags (``key=value`` overrides) and KFP component parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from patchgap.args import split_key_value
from patchgap.errors import ConfigError

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for every config: no unknown keys, no mutation after validation."""

    # allow_inf_nan: `.inf` epochs or a `.nan` learning rate is a typo, never a setting.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    #: Keys this model once had at its top level and where they live now
    #: (``max_new_tokens`` -> ``generation.max_new_tokens``); :func:`validate` names the new place.
    moved_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _sections_start_from_their_defaults(cls, data: Any) -> Any:
        # A nested section built by a default_factory carries the model's own defaults for it
        # (evaluate: generation.max_new_tokens 512); a section given in part is laid over them,
        # not over the section type's defaults.
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if field.default_factory is not None and isinstance(given, dict):
                default = field.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    out[name] = {**default.model_dump(exclude_unset=True), **given}
        return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key and what is wrong with it."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "finite_number":
            msg = "must be a finite number (not inf or nan)"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def validate(model: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` naming every bad key."""
    moved = [f"{source}: {k}: moved to {to}" for k, to in model.moved_keys.items() if k in data]
    if moved:
        raise ConfigError("; ".join(moved))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a parse error names the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_YAML_BYTES} bytes; not a config file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {err.start})") from None
    data = safe_load_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


#: The most YAML text read from one user source: a run config is a few kB.
MAX_YAML_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` is refused as the parser meets it, before
    any node is shared or expanded, so a few hundred bytes of nested aliases (a "billion laughs")
    cannot become gigabytes in the loader, in a deep copy or in validation. Anchors alone are
    harmless and allowed; no config of this project needs an alias."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{event.anchor} is not allowed (write the value out in full)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def safe_load_yaml(text: str, source: str) -> Any:
    """The one YAML loader for text a user gives (run configs, ``--set``/``-p`` values, component
    configs): safe types only, no aliases, at most :data:`MAX_YAML_BYTES`; every failure is one
    :class:`ConfigError` naming ``source`` (and line:column where the parser knows it),
    including Python's own limits."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: YAML larger than {MAX_YAML_BYTES} bytes; refusing to parse")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # the int conversion limit: a number with thousands of digits
        raise ConfigError(f"{source}: invalid YAML: {str(err).splitlines()[0][:200]}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict copy."""
    out: dict[str, Any] = _deepcopy(data)
    for item in overrides or []:
        key, raw = split_key_value(item, "override", example="sft.epochs=2")
        value = safe_load_yaml(raw, f"override {key!r}") if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
