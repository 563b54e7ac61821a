"""KFP component of the train-rewriter stage (GRPO + LoRA training of the rewriter)."""
