"""What train-rewriter and sft share: the LoRA settings (``lora``), the accelerate relaunch for
several GPUs (``launch``), checkpoint sync with the store (``checkpoints``, ``callbacks``), the
trainer arguments both build alike (``trainer_args``) and training metrics (``metrics``). The
LoRA merge and the one device/dtype resolution live in :mod:`patchgap.lm.models`, since
generation needs them too.

May import: patchgap.reward, patchgap.lm and everything below them.
"""
