"""``python -m patchgap.stages.evaluate``: the stage's container entrypoint."""

from patchgap.stages import evaluate
from patchgap.stages.base import main

raise SystemExit(main(evaluate))
