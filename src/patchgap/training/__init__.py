"""What train-rewriter and sft share: LoRA settings and merge, one device/dtype resolution, the
accelerate relaunch for several GPUs, checkpoint sync with the store, training metrics.

May import: patchgap.reward, patchgap.lm and everything below them.
"""
