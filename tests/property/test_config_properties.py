"""The config loader with overrides: random YAML text (anchors and aliases included) and random
``--set`` strings either give a validated config or one :class:`ConfigError` line, quickly;
a document with an alias is always refused, before anything is expanded or copied."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from patchgap.config import apply_overrides, safe_load_yaml
from patchgap.errors import ConfigError
from patchgap.stages import sft
from patchgap.stages.base import load_stage_config

pytestmark = pytest.mark.property

# Pieces of a run YAML's sft: section, good and bad, with anchors, aliases and merge keys.
_LINES = st.sampled_from(
    [
        "sft:",
        "  num_epochs: 2",
        "  num_epochs: .inf",
        "  learning_rate: .nan",
        "  learning_rate: 1e-5",
        "  a: &a [x, x, x, x]",
        "  b: &b [*a, *a, *a, *a]",
        "  c: *b",
        "  <<: *a",
        "  lora: {r: 8}",
        "  lora: &l {r: 8}",
        "  other: *l",
        "  seed: 1",
        "  seed: [",
        "  unknown_key: 1",
        "model: tiny",
        "- item",
        "!!python/object:os.system ls",
        "  max_steps: 99999999999999999999999999",
        "\t tab",
        "'",
    ]
)
_YAML = st.one_of(
    st.lists(_LINES, max_size=12).map("\n".join),
    st.text(max_size=200),
    st.lists(st.sampled_from(["[", "{", "&a ", "*a ", "x: ", "- ", "]", "}", ",", "\n  "])).map(
        "".join
    ),
)
_OVERRIDE = st.one_of(
    st.text(max_size=40),
    st.tuples(
        st.sampled_from(["num_epochs", "learning_rate", "lora.r", "seed", ".", "", "a..b", "x"]),
        st.sampled_from(
            [".inf", "-.nan", "2", "[&a [1], *a]", "{", "1e400", "9" * 30, "", "=", "null"]
        ),
    ).map("=".join),
)


def _has_alias(text: str) -> bool | None:
    """Whether ``text`` holds an alias as far as the parser reads (``None``: it never parses)."""
    try:
        return any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text))
    except yaml.YAMLError:
        return None


@settings(max_examples=250)
@given(_YAML)
def test_yaml_text_loads_or_is_one_line_and_aliases_never_load(text: str) -> None:
    try:
        safe_load_yaml(text, "run.yaml")
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("run.yaml")
        return
    assert _has_alias(text) is False


@settings(max_examples=120)
@given(_YAML, st.lists(_OVERRIDE, max_size=3))
def test_a_stage_config_with_overrides_validates_or_is_one_line(
    text: str, overrides: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        started = time.monotonic()
        try:
            config = load_stage_config(sft.Config, path, "sft", overrides)
        except ConfigError as err:
            assert "\n" not in str(err)
        else:
            assert isinstance(config, sft.Config)
            for name, value in config.model_dump().items():
                if isinstance(value, float):
                    assert value == value and abs(value) != float("inf"), name
        assert time.monotonic() - started < 2.0


@settings(max_examples=200)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=20,
    ).filter(lambda d: isinstance(d, dict)),
    st.lists(_OVERRIDE, max_size=4),
)
def test_overrides_never_touch_the_input_and_fail_in_one_line(
    data: dict, overrides: list[str]
) -> None:
    before = repr(data)
    try:
        out = apply_overrides(data, overrides)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(out, dict)
    assert repr(data) == before
