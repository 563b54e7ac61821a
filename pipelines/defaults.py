"""Default pipeline parameters: each stage's config section from configs/paper.yaml (validated,
dumped as the one-line JSON a component receives) and the GPU pool placement. Compiled pipelines
carry these as parameter defaults; ``patchgap run`` and ``patchgap submit`` override them."""

from patchgap.config import read_yaml
from patchgap.settings import configs_dir
from patchgap.stages.base import section_json

PAPER_CONFIG = configs_dir() / "paper.yaml"

ACCELERATOR_TYPE = "nvidia.com/gpu"
NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def paper_section(section: str) -> str:
    """One stage's section of configs/paper.yaml as the one-line JSON its component receives."""
    return section_json(read_yaml(PAPER_CONFIG), section, f"{PAPER_CONFIG.name} [{section}]")


def study_section() -> str:
    """The study's default settings (every arm, three seeds) as one line of JSON."""
    from patchgap.stages.base import config_json
    from patchgap.study.config import StudySettings

    return config_json(StudySettings())


def study_sft_section() -> str:
    """paper.yaml's sft section with the study's default snapshots."""
    from patchgap.study.config import StudySettings

    snaps = StudySettings().snapshots
    return section_json(
        read_yaml(PAPER_CONFIG),
        "sft",
        f"{PAPER_CONFIG.name} [sft]",
        [f"snapshots={snaps}"],
    )
