"""patchgap: rewrite an SFT dataset with an RL-trained rewriter so fine-tuning forgets less.

Importing the package is cheap: torch, transformers, trl, peft and vllm are imported inside the
functions that need them.
"""

__version__ = "0.1.0"
