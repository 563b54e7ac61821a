"""Container image references, in one place and tied to the package version.

``PATCHGAP_IMAGE_REGISTRY`` and ``PATCHGAP_IMAGE_TAG`` override the defaults for a private
registry or a development tag; pipelines are compiled with whatever this module returns.
"""

from __future__ import annotations

import os

from patchgap import __version__

DEFAULT_REGISTRY = "ghcr.io/patchgap"

#: Stage name (as in patchgap.stages.STAGES) -> image name; ``base`` (core + kfp) and ``torch``
#: (base + the model stack) are the layers the others build on (images/build.sh).
IMAGES = {
    "base": "patchgap-base",
    "torch": "patchgap-torch",
    "train_rewriter": "patchgap-train-rewriter",
    "rewrite": "patchgap-rewrite",
    "gate": "patchgap-gate",
    "sft": "patchgap-sft",
    "evaluate": "patchgap-evaluate",
    "ops": "patchgap-ops",
}


def image_tag() -> str:
    return os.environ.get("PATCHGAP_IMAGE_TAG", __version__)


def image_for(stage: str) -> str:
    """The full image reference for a stage, e.g. ``ghcr.io/patchgap/patchgap-gate:0.1.0``."""
    try:
        name = IMAGES[stage]
    except KeyError:
        raise KeyError(f"no image for stage {stage!r}; known: {sorted(IMAGES)}") from None
    registry = os.environ.get("PATCHGAP_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    return f"{registry}/{name}:{image_tag()}"
