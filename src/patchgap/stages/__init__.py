"""The five stages. Each module has ``NAME``, ``Config``, ``INPUTS``, ``OUTPUTS`` and
``run(config, inputs, outputs) -> metrics``, and runs as ``python -m patchgap.stages.<name>``;
:mod:`patchgap.stages.base` is the one way in (inputs, outputs, manifests, skip-if-done).

May import: patchgap.training, patchgap.reward, patchgap.reports and everything below them.
"""

#: The five stages, in pipeline order; also the stage sections of a run YAML.
STAGES = ("train_rewriter", "rewrite", "gate", "sft", "evaluate")
