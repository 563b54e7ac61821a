"""The five stages. Each module has ``NAME``, ``Config``, ``INPUTS``, ``OUTPUTS`` and
``run(config, inputs, outputs) -> metrics``, and runs as ``python -m patchgap.stages.<name>``."""

STAGES = ("train_rewriter", "rewrite", "gate", "sft", "evaluate")
