"""Trainer arguments that train-rewriter and sft build alike, whatever the installed
transformers calls them."""

from __future__ import annotations

import dataclasses
from typing import Any


def gradient_checkpointing_arg(config_cls: Any, on: bool) -> dict[str, bool]:
    """The gradient-checkpointing switch for ``config_cls`` (TRL's ``GRPOConfig``,
    ``SFTConfig``): newer transformers 5 releases (5.24) name it ``activation_checkpointing``
    and keep ``gradient_checkpointing`` as a deprecated alias; older ones (5.17) know only the
    latter."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    new = "activation_checkpointing" in names
    return {"activation_checkpointing" if new else "gradient_checkpointing": on}
