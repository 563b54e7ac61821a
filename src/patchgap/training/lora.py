"""The LoRA patch the trainers put on pi0: its settings and the peft config built from them.

Merging a patch into the weights is :func:`patchgap.lm.models.merge_lora`: generation merges
too, and ``lm`` sits below ``training``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from patchgap.config import StrictModel


class LoraSettings(StrictModel):
    """The trainable patch on frozen pi0 (PAPER.md: rank 64, alpha 32, all linear layers).

    Dropout defaults to 0.0, the rewriter's (PAPER.md); sft declares its own default of 0.05
    with its ``lora`` field.
    """

    r: int = Field(64, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="modules that get a LoRA: 'all-linear' (every linear layer but the output "
        "head) or a list of module names",
    )

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of a causal LM with these settings (no bias training)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
