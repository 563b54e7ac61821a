"""KFP components: one thin component per stage plus the ops steps (see each folder's README).
Installed as ``patchgap.components``.

May import: patchgap.kfp (image references) and everything below it; the stage modules only
inside component bodies, so compiling a pipeline never imports torch.
"""
