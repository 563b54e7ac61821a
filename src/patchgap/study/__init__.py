"""The study: does SFT on D_R forget less than SFT on D at matched gain? Its settings
(:mod:`.config`) and the training sets it compares (:mod:`.arms`), built from D and the gates'
outputs. It reads data and gate output folders only; the pipeline that runs it lives in
``patchgap.pipelines.study`` and its statistics in ``patchgap.reports.study``.

May import: patchgap.lm and everything below it (not patchgap.reward, patchgap.reports or
patchgap.training).
"""
