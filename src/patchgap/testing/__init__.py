"""Test helpers shipped with the package: tiny random models other projects' tests can build."""

from __future__ import annotations

from patchgap.testing.tiny_models import ARCHS, CHAT_TEMPLATE, build_tiny_model, train_tokenizer

__all__ = ["ARCHS", "CHAT_TEMPLATE", "build_tiny_model", "train_tokenizer"]
