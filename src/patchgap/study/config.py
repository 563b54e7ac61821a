"""The ``study:`` section of a run YAML: which arms train, with which seeds and snapshots, for how
many epochs per kind of arm, and where the swap control draws its references from."""

from __future__ import annotations

from pydantic import Field, field_validator

from patchgap.config import StrictModel
from patchgap.data.sources import DatasetSpec

#: Every arm, in the order reports list them: {name: (kind, rewriter, description)}.
ARMS: dict[str, tuple[str, str | None, str]] = {
    "d": ("full", None, "D: every reference solution"),
    "dr": ("full", "rl", "D_R of the RL rewriter (accepted rewrites, references elsewhere)"),
    "dr_prompt": ("full", "prompt", "D_R of the prompt-only rewriter"),
    "ref_rl": ("concentrated", "rl", "the references of the records the RL gate accepted"),
    "rw_rl": ("concentrated", "rl", "the RL rewriter's accepted rewrites of those records"),
    "swap_rl": (
        "concentrated",
        "rl",
        "as many other references of the task, drawn from the swap pool (none of D)",
    ),
    "ref_prompt": (
        "concentrated",
        "prompt",
        "the references of the records the prompt-only gate accepted",
    ),
    "rw_prompt": ("concentrated", "prompt", "the prompt-only rewriter's accepted rewrites"),
    "swap_prompt": (
        "concentrated",
        "prompt",
        "as many other references of the task, drawn from the swap pool (none of D)",
    ),
}


class Epochs(StrictModel):
    """Passes over the data per kind of arm: a concentrated arm holds only the accepted records,
    so it needs more passes to reach a comparable number of optimizer steps."""

    full: float = Field(1.0, gt=0.0, description="epochs of d, dr and dr_prompt")
    concentrated: float = Field(
        3.0, gt=0.0, description="epochs of the ref_*, rw_* and swap_* arms"
    )


class StudySettings(StrictModel):
    """Settings of the study pipeline (``study:`` in a run YAML)."""

    arms: list[str] = Field(
        default_factory=lambda: list(ARMS),
        description=f"arms that train, of: {', '.join(ARMS)}",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="SFT seeds, one job per arm and seed"
    )
    snapshots: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0],
        description="fractions (0, 1] of each job's optimizer steps at which it is evaluated",
    )
    epochs: Epochs = Field(default_factory=Epochs, description="epochs per kind of arm")
    swap_pool: DatasetSpec = Field(
        default_factory=lambda: DatasetSpec(source="gsm8k:train"),
        description="where the swap arms draw other references of the task from (records of D, "
        "by id or question, are never drawn)",
    )
    swap_seed: int = Field(0, description="seed of the swap draw")
    # The report's decision rules (patchgap.reports.study; docs/results.md registers them).
    equivalence_margin: float = Field(
        0.25, gt=0.0, description="H4's margin, a share of the reference arm's mean final gain"
    )
    bootstrap_reps: int = Field(2000, ge=10, description="bootstrap replicates of every interval")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="the tests' level")
    levels: int = Field(5, ge=2, description="gain levels a frontier comparison averages over")

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ARMS:
                raise ValueError(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
        if not value:
            raise ValueError("at least one arm")
        return [a for a in ARMS if a in value]  # one order everywhere, duplicates gone

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one seed")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be unique, got {value}")
        return value

    @field_validator("snapshots")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"snapshot fractions must lie in (0, 1], got {bad[0]}")
        if not value:
            raise ValueError("at least one snapshot fraction")
        return sorted(set(value))

    def needs_prompt_gate(self) -> list[str]:
        """The arms that read the prompt-only rewriter's gate."""
        return [a for a in self.arms if ARMS[a][1] == "prompt"]

    def epochs_of(self, arm: str) -> float:
        return self.epochs.full if ARMS[arm][0] == "full" else self.epochs.concentrated
