"""The evaluate stage's contract and settings: its name, inputs and outputs, and the config
models (which models, which math, multiple-choice, drift and held-out sets, how to generate)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from patchgap.config import StrictModel
from patchgap.data.fields import FieldMap
from patchgap.data.registry import named_sets
from patchgap.lm.generation import GenerationConfig

NAME = "evaluate"
INPUTS = ("models",)
OPTIONAL_INPUTS = ("models",)
OUTPUTS = ("report",)


class ModelEntry(StrictModel):
    """One model to evaluate."""

    label: str = Field(description="name in the table: base, sft_d, sft_dr, ...")
    path: str = Field(
        description="model folder, s3:// URI, known name (smollm2), or a subfolder of the "
        "`models` input"
    )


class MathSet(StrictModel):
    """A downstream math set: a known name, or a file read with a field map (custom sets)."""

    name: str = Field(description="gsm8k, math500, amc23, aime24, minerva_math, sat_math, ...")
    path: str | None = Field(
        None, description="custom set: .jsonl/.json/.parquet file or folder, or s3:// URI"
    )
    fields: str | FieldMap = Field(
        "auto",
        description="custom set: field preset or field map, as for training data (context, "
        "answer_pattern, choices, lists)",
    )

    @model_validator(mode="after")
    def _fields_need_a_path(self) -> MathSet:
        if self.path is None and self.fields != "auto":
            raise ValueError(f"math set {self.name!r}: fields apply to a custom set; set path")
        return self


class DriftSettings(StrictModel):
    """Drift from pi0 on general prompts: the NLL under each model of pi0's own greedy answers to
    a fixed seeded sample of general questions. The mean per-item difference against the base
    estimates KL(pi0 || model) per token on pi0's outputs (on its greedy answers, its mode, rather
    than on samples)."""

    enabled: bool = Field(True, description="score the drift from pi0 (needs the base model)")
    questions: int = Field(
        40, ge=1, description="general questions, a seeded sample spread evenly over benchmarks"
    )
    benchmarks: list[str] | None = Field(
        None,
        description="project multiple-choice sets the questions come from (arc_easy, piqa, "
        "hellaswag, mmlu, ...); None = those among `general`",
    )
    max_new_tokens: int = Field(128, ge=1, description="longest greedy answer of pi0 (tokens)")
    exclude: list[str] = Field(
        default_factory=list,
        description="leave out questions whose `<benchmark>:<item id>` starts with one of these, "
        "before the seeded draw (e.g. mmlu:high_school_mathematics keeps the questions off math)",
    )

    @field_validator("benchmarks")
    @classmethod
    def _known_sets(cls, value: list[str] | None) -> list[str] | None:
        known = named_sets("choice")
        unknown = [b for b in value or [] if b not in known]
        if unknown:
            raise ValueError(f"drift.benchmarks: unknown {unknown}; known: {sorted(known)}")
        return value


class HeldoutSettings(StrictModel):
    """Downstream NLL: held-out reference solutions given their question, in SFT's chat format."""

    enabled: bool = Field(True, description="score the NLL of held-out reference solutions")
    sets: list[str] = Field(
        default_factory=lambda: ["gsm8k"],
        description="held-out sets with reference solutions (gsm8k, math500, minerva_math: "
        "their test splits)",
    )
    limit: int | None = Field(
        100, ge=1, description="problems per set (fixed seeded subset); None = all"
    )
    max_tokens: int = Field(
        512, ge=1, description="solution tokens scored per problem (longer ones are cut)"
    )
    prompt_template: str = Field(
        "{question}", description="user turn built from the question, as sft.prompt_template"
    )
    form: Literal["neutral", "as_written"] = Field(
        "neutral",
        description="how reference solutions are scored: neutral = GSM8K's calculator marks "
        "and '#### N' line removed (the same for every model, so the NLL does not favour D's "
        "format); as_written = verbatim",
    )

    @field_validator("sets")
    @classmethod
    def _known_sets(cls, value: list[str]) -> list[str]:
        known = named_sets("heldout")
        unknown = [b for b in value if b not in known]
        if unknown:
            raise ValueError(f"heldout.sets: unknown {unknown}; known: {sorted(known)}")
        return value


class Config(StrictModel):
    """Settings of the evaluate stage (defaults: the CPU demo, small seeded subsets)."""

    # These generation settings were top-level keys of this section before it had its own.
    moved_keys: ClassVar[Mapping[str, str]] = {
        k: f"generation.{k}"
        for k in (
            "backend",
            "max_new_tokens",
            "batch_size",
            "device",
            "dtype",
            "trust_remote_code",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "max_model_len",
        )
    }

    model: str | None = Field(
        None, description="pi0; added as `base` when no model is labelled base"
    )
    models: list[ModelEntry] = Field(
        default_factory=list,
        description="models to evaluate; empty = every subfolder of the `models` input",
    )
    base: str = Field("base", description="label of pi0, the reference for gain and forgetting")
    baseline: str | None = Field("sft_d", description="label of SFT on the original D")
    rewritten: list[str] | None = Field(
        None, description="labels compared with the baseline (default: all other models)"
    )
    math: list[MathSet] = Field(
        default_factory=lambda: [MathSet(name="gsm8k"), MathSet(name="math500")],
        description="downstream sets (generative, boxed answer, greedy)",
    )
    general: list[str] = Field(
        default_factory=lambda: ["arc_easy", "piqa", "hellaswag"],
        description="general (forgetting) benchmarks through lm-eval: project tasks "
        "(arc_easy, arc_challenge, piqa, hellaswag, mmlu, agieval) or any lm-eval task name",
    )
    choice: list[str] = Field(
        default_factory=list,
        description="general benchmarks in the paper's generative boxed-letter form "
        "(mmlu, agieval, arc_easy, ...), through patchgap's generation path",
    )
    limit: int | None = Field(
        50, ge=1, description="items per benchmark (fixed seeded subset); None = all"
    )
    limits: dict[str, int] = Field(
        default_factory=dict, description="per-benchmark item limits overriding `limit`"
    )
    seed: int = Field(0, description="seed of the subsets and bootstraps")
    mc_metric: Literal["acc", "acc_norm"] = Field(
        "acc_norm", description="lm-eval metric used for the forgetting table"
    )
    gold_logprob: bool = Field(
        True,
        description="report the paired change of the gold choice's log-probability on every "
        "general item (lm-eval's per-item log-likelihoods: no extra model work)",
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings, description="drift from pi0 on general prompts"
    )
    heldout: HeldoutSettings = Field(
        default_factory=HeldoutSettings, description="NLL of held-out reference solutions"
    )
    nll_batch_tokens: int = Field(
        4096, ge=64, description="padded tokens per forward pass when scoring NLLs"
    )
    data_dir: str | None = Field(
        None, description="folder laid out like shared/data (default: PATCHGAP_DATA_DIR)"
    )
    benchmark_paths: dict[str, str] = Field(
        default_factory=dict,
        description="override a named benchmark's location (path or s3://), math or general",
    )
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(max_new_tokens=512),
        description="greedy generation for the math and boxed-letter sets (patchgap.lm."
        "generation); its batch_size, device, dtype and trust_remote_code also serve lm-eval",
    )
    bootstrap_reps: int = Field(2000, ge=100, description="bootstrap resamples")
    near_zero: float = Field(
        0.005, ge=0.0, description="|F_D| below this: no forgetting reduction (caveat)"
    )
    state_uri: str | None = Field(
        None,
        description="s3:// prefix or folder where each finished (model, benchmark) result goes; "
        "a restart reuses them (default: a _state folder inside the report output)",
    )

    @model_validator(mode="after")
    def _greedy(self) -> Config:
        if self.generation.temperature != 0.0 or self.generation.n != 1:
            raise ValueError(
                "generation: benchmarks score one greedy answer per item (temperature 0, n 1)"
            )
        return self

    @field_validator("math", mode="before")
    @classmethod
    def _names_as_sets(cls, value: Any) -> Any:
        # `math: [gsm8k, math500]` is the common case; a mapping describes a custom file.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    def limit_for(self, bench: str) -> int | None:
        """The item limit of ``bench`` (``mmlu_gen`` falls back to ``mmlu``, then ``limit``)."""
        return self.limits.get(bench, self.limits.get(bench.removesuffix("_gen"), self.limit))
