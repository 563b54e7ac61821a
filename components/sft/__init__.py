"""KFP component of the sft stage."""
