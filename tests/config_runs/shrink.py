"""The shrink table: how each setting of a shipped run YAML is changed so that the config runs end
to end on a 2-core CPU in a test, and which settings keep their values.

Every leaf key a config may set is listed (a dotted path; a mapping-valued key such as
``evaluate.limits`` or ``run.dataset.fields`` is one entry). :func:`shrink` refuses a key the
table does not know, so a setting added to a config is never silently left at a value the test
cannot run, nor silently changed. What changes falls in three kinds only: sizes (records, steps,
tokens), CPU replacements for settings that need a GPU (vLLM, bf16, several GPUs), and things out
of reach offline (hub models and datasets, the config's bucket). Everything else keeps its value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Sizes: a few records per dataset and benchmark, two optimizer steps, a few tokens.
RECORDS = 4
STEPS = 2
NEW_TOKENS = 8
SHARDS = 2

#: The packaged embedder, the one that loads offline.
OFFLINE_EMBEDDER = "all-MiniLM-L6-v2"

#: Hub datasets and the local set of the data directory that stands in for each; the config
#: names the same stand-in in its comments (checked by the test), so a user without hub access
#: makes the same swap.
HUB_STAND_INS = {"hf://AI-MO/NuminaMath-CoT": "math_train"}

NO_GPU = "vLLM needs a GPU; its CPU build has a tier of its own, make test-vllm"


@dataclass(frozen=True)
class Context:
    """What a shrunk config points at instead: the tiny pi0 and the test's bucket."""

    model: str
    model_name: str
    bucket: str


@dataclass(frozen=True)
class Change:
    """One substitution, as the test prints it."""

    path: str
    old: Any
    new: Any
    why: str

    def __str__(self) -> str:
        return f"{self.path} {_show(self.old)} -> {_show(self.new)} ({self.why})"


# A rule maps (value, context) to (new value, reason); KEEP leaves the value as it is.
Rule = Callable[[Any, Context], tuple[Any, str]]
KEEP: Rule | None = None


def _cap(limit: int, why: str) -> Rule:
    """At most ``limit``; an unset (None: all) value becomes ``limit``."""
    return lambda v, _: (limit if v is None else min(v, limit), why)


def _model(value: Any, ctx: Context) -> tuple[Any, str]:
    where = "no GPU/hub" if "/" in str(value) else "CI time"
    return ctx.model, where


def _device(value: Any, _: Context) -> tuple[Any, str]:
    return ("cpu" if str(value).startswith("cuda") else value), "no GPU"


def _dtype(value: Any, _: Context) -> tuple[Any, str]:
    return ("float32" if value in ("bfloat16", "float16") else value), "half precision is for GPUs"


def _backend(value: Any, _: Context) -> tuple[Any, str]:
    return ("transformers" if value == "vllm" else value), NO_GPU


def _distributed(value: Any, _: Context) -> tuple[Any, str]:
    # auto stays: without several GPUs it runs in one process, the path being tested.
    return (value if value in ("auto", "none") else "none"), "one process: several GPUs needed"


def _runner(value: Any, _: Context) -> tuple[Any, str]:
    return "subprocess", "the container tier runs the images (make test-containers)"


def _report_to(value: Any, _: Context) -> tuple[Any, str]:
    return ("none" if value == "mlflow" else value), "no MLflow server in the test"


def _bucket(value: Any, ctx: Context) -> tuple[Any, str]:
    return ctx.bucket, "the test's fresh bucket"


def _s3_uri(value: Any, ctx: Context) -> tuple[Any, str]:
    if value is None or not str(value).startswith("s3://"):
        return value, ""
    rest = str(value).removeprefix("s3://").split("/", 1)
    return f"s3://{ctx.bucket}/" + (rest[1] if len(rest) > 1 else ""), "the test's fresh bucket"


def _dataset_source(value: Any, _: Context) -> tuple[Any, str]:
    text = str(value)
    if not text.startswith("hf://"):
        return value, ""
    if text not in HUB_STAND_INS:
        raise KeyError(f"hub dataset {text}: add its local stand-in to HUB_STAND_INS")
    return HUB_STAND_INS[text], "no hub: the documented local stand-in"


def _embedder(value: Any, _: Context) -> tuple[Any, str]:
    if value == OFFLINE_EMBEDDER:
        return value, ""
    return OFFLINE_EMBEDDER, "hub-only model, no hub in tests: the packaged MiniLM embedder"


def _judge_model(value: Any, ctx: Context) -> tuple[Any, str]:
    if value is None:
        return value, ""
    return ctx.model, "no GPU/hub"


def _limits(value: Any, _: Context) -> tuple[Any, str]:
    return {k: min(v, RECORDS) for k, v in value.items()}, "a few items per benchmark"


FEW_RECORDS = _cap(RECORDS, "a few records")
FEW_STEPS = _cap(STEPS, "tiny step count")
FEW_TOKENS = _cap(NEW_TOKENS, "tiny length")

#: Keys every stage section may set or inherit from the top level.
SHARED: dict[str, Rule | None] = {
    "model": _model,
    "seed": KEEP,
    "trust_remote_code": KEEP,
    "device": _device,
    "dtype": _dtype,
}

DATASET: dict[str, Rule | None] = {
    "source": _dataset_source,
    "fields": KEEP,
    "split": KEEP,
    "hub_config": KEEP,
    "limit": FEW_RECORDS,
    "shuffle": KEEP,
    "seed": KEEP,
    "id_prefix": KEEP,
}

GENERATION: dict[str, Rule | None] = {
    "backend": _backend,
    "max_new_tokens": FEW_TOKENS,
    "temperature": KEEP,
    "top_p": KEEP,
    "n": KEEP,
    "batch_size": KEEP,
    "seed": KEEP,
    "tensor_parallel_size": _cap(1, "one device"),
    "device": _device,
    "dtype": _dtype,
    "trust_remote_code": KEEP,
    "merge_adapter": KEEP,
    # vLLM's own settings: kept; the transformers backend does not read them.
    "gpu_memory_utilization": KEEP,
    "max_model_len": KEEP,
    "enforce_eager": KEEP,
}

REWARD: dict[str, Rule | None] = {
    "k": KEEP,
    "lambda_dist": KEEP,
    "lambda_div": KEEP,
    "judge": KEEP,
    "judge_kind": KEEP,
    "judge_calibration.score": KEEP,
    "judge_calibration.quantile": KEEP,
    "judge_calibration.references": KEEP,
    "reasoning_check.min_restated": KEEP,
    "reasoning_check.min_length_ratio": KEEP,
    "reasoning_check.max_question_overlap": KEEP,
    "reasoning_check.ngram": KEEP,
    "reasoning_check.check_arithmetic": KEEP,
    "reasoning_check.banned_phrases": KEEP,
    "judge_model": _judge_model,
    "judge_chat_template": KEEP,
    "nll_context": KEEP,
    "embedder": _embedder,
    "share_prefix": KEEP,
    "max_batch_tokens": KEEP,
    "max_padding_fraction": KEEP,
    "max_length": KEEP,
    "embed_batch_size": KEEP,
    "dtype": _dtype,
    "device": _device,
}

LORA: dict[str, Rule | None] = {"r": KEEP, "alpha": KEEP, "dropout": KEEP, "target_modules": KEEP}

RUN: dict[str, Rule | None] = {
    "pipeline": KEEP,
    "publish_weights": KEEP,
    "bucket": _bucket,
    **{f"dataset.{k}": r for k, r in DATASET.items()},
    "dataset_key": KEEP,
    "num_shards": _cap(SHARDS, "each shard is a process: CI time"),
    "min_acceptance_rate": KEEP,
    "prompt_only_baseline": KEEP,
    "adapter_uri": _s3_uri,
    "runner": _runner,
    # The watch pipeline: its prefix and ledger move into the test's bucket; the rest keeps.
    "prefix": _s3_uri,
    "ledger_uri": _s3_uri,
    "max_datasets": KEEP,
    "claim_hours": KEEP,
    "dataset_fields": KEEP,
}

TRAIN_REWRITER: dict[str, Rule | None] = {
    **SHARED,
    **{f"dataset.{k}": r for k, r in DATASET.items()},
    "prompt_template": KEEP,
    # Prompt and sequence limits keep their values: the tier's tiny model has the positions.
    "max_prompt_length": KEEP,
    "max_completion_length": FEW_TOKENS,
    "num_generations": KEEP,
    "prompts_per_step": _cap(1, "tiny step size"),
    "per_device_batch_size": KEEP,
    "learning_rate": KEEP,
    "lr_scheduler": KEEP,
    "weight_decay": KEEP,
    "max_grad_norm": KEEP,
    "beta": KEEP,
    "clip_epsilon": KEEP,
    "loss_type": KEEP,
    "scale_rewards": KEEP,
    "temperature": KEEP,
    "top_p": KEEP,
    "num_epochs": KEEP,
    "max_steps": FEW_STEPS,
    "gradient_checkpointing": KEEP,
    **{f"lora.{k}": r for k, r in LORA.items()},
    "rollout.backend": _backend,
    "rollout.vllm_mode": KEEP,
    "rollout.vllm_gpu_memory_utilization": KEEP,
    "rollout.vllm_tensor_parallel_size": KEEP,
    "rollout.vllm_enable_sleep_mode": KEEP,
    "rollout.vllm_server_base_url": KEEP,
    **{f"reward.{k}": r for k, r in REWARD.items()},
    "checkpoint_uri": _s3_uri,
    "checkpoint_every": _cap(STEPS, "a checkpoint within the tiny step count"),
    "keep_checkpoints": KEEP,
    "merge_adapter": KEEP,
    "work_dir": KEEP,
    "distributed": _distributed,
    "accelerate_config": KEEP,
    "progress": KEEP,
    "report_to": _report_to,
}

REWRITE: dict[str, Rule | None] = {
    "model": _model,
    "fields": KEEP,
    "limit": FEW_RECORDS,
    "template": KEEP,
    **{f"generation.{k}": r for k, r in GENERATION.items()},
    "include_greedy": KEEP,
    "max_retries": KEEP,
    "retry_temperature": KEEP,
    "batch_records": KEEP,
    "shard_index": KEEP,
    "num_shards": KEEP,
    "shard_by": KEEP,
    "state_uri": _s3_uri,
    "progress": KEEP,
}

GATE: dict[str, Rule | None] = {
    "model": _model,
    "seed": KEEP,
    "fields": KEEP,
    "limit": FEW_RECORDS,
    **{f"reward.{k}": r for k, r in REWARD.items()},
    "batch_records": KEEP,
    "diversity_sample": KEEP,
    "distinct_n": KEEP,
    "write_parquet": KEEP,
}

SFT: dict[str, Rule | None] = {
    **SHARED,
    "fields": KEEP,
    "limit": FEW_RECORDS,
    "prompt_template": KEEP,
    "finetuning": KEEP,
    **{f"lora.{k}": r for k, r in LORA.items()},
    "learning_rate": KEEP,
    "lr_scheduler": KEEP,
    "warmup_ratio": KEEP,
    "weight_decay": KEEP,
    # A few records make an epoch one or two optimizer steps: the epochs stay.
    "num_epochs": KEEP,
    "max_steps": FEW_STEPS,
    "per_device_batch_size": KEEP,
    "gradient_accumulation_steps": KEEP,
    "max_length": KEEP,
    "gradient_checkpointing": KEEP,
    "logging_steps": KEEP,
    "report_to": _report_to,
    "checkpoint_uri": _s3_uri,
    "checkpoint_every": KEEP,
    "keep_checkpoints": KEEP,
    "work_dir": KEEP,
    "distributed": _distributed,
    "accelerate_config": KEEP,
    "snapshots": KEEP,
}

EVALUATE: dict[str, Rule | None] = {
    "model": _model,
    "seed": KEEP,
    # Model entries name folders or the hub; none of the configs sets them (a hub name here
    # would need a rule, like `model`).
    "models": KEEP,
    "base": KEEP,
    "baseline": KEEP,
    "rewritten": KEEP,
    "math": KEEP,
    "general": KEEP,
    "choice": KEEP,
    "limit": _cap(RECORDS, "a few items per benchmark"),
    "limits": _limits,
    "mc_metric": KEEP,
    "gold_logprob": KEEP,
    "drift.enabled": KEEP,
    "drift.questions": _cap(2, "a few drift questions"),
    "drift.benchmarks": KEEP,
    "drift.exclude": KEEP,
    "drift.max_new_tokens": FEW_TOKENS,
    "heldout.enabled": KEEP,
    "heldout.sets": KEEP,
    "heldout.limit": _cap(RECORDS, "a few held-out solutions"),
    "heldout.max_tokens": KEEP,
    "heldout.prompt_template": KEEP,
    "heldout.form": KEEP,
    "nll_batch_tokens": KEEP,
    "data_dir": KEEP,
    "benchmark_paths": KEEP,
    **{f"generation.{k}": r for k, r in GENERATION.items()},
    "bootstrap_reps": KEEP,
    "near_zero": KEEP,
    "state_uri": _s3_uri,
}


def _seeds(value: Any, _: Context) -> tuple[Any, str]:
    return list(value)[:2], "two seeds: CI time"


STUDY: dict[str, Rule | None] = {
    "arms": KEEP,
    "seeds": _seeds,
    "snapshots": KEEP,
    "epochs.full": KEEP,
    "epochs.concentrated": KEEP,
    **{f"swap_pool.{k}": r for k, r in DATASET.items()},
    # Larger than D's few records, so the swap arms find as many outside D.
    "swap_pool.limit": _cap(64, "a small swap pool"),
    "swap_seed": KEEP,
    "equivalence_margin": KEEP,
    "bootstrap_reps": _cap(200, "fewer bootstrap replicates"),
    "alpha": KEEP,
    "levels": KEEP,
}

#: The whole table: dotted path -> rule (KEEP: the value stays).
TABLE: dict[str, Rule | None] = {
    **SHARED,
    **{f"run.{k}": r for k, r in RUN.items()},
    **{f"train_rewriter.{k}": r for k, r in TRAIN_REWRITER.items()},
    **{f"rewrite.{k}": r for k, r in REWRITE.items()},
    **{f"gate.{k}": r for k, r in GATE.items()},
    **{f"sft.{k}": r for k, r in SFT.items()},
    **{f"evaluate.{k}": r for k, r in EVALUATE.items()},
    **{f"study.{k}": r for k, r in STUDY.items()},
}


def leaf_paths(node: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every leaf key of a config as a dotted path; a mapping the table names as one entry
    (``evaluate.limits``) is a leaf."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path not in TABLE and isinstance(value, dict):
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def unknown_keys(config: Mapping[str, Any]) -> list[str]:
    """The leaf keys of ``config`` the table does not know."""
    return [p for p in leaf_paths(config) if p not in TABLE]


def shrink(config: Mapping[str, Any], ctx: Context) -> tuple[dict[str, Any], list[Change]]:
    """The same config, shrunk; and the list of what changed. Raises KeyError on a key the
    table does not know. Builds new mappings throughout: a YAML alias (one mapping under two
    keys) becomes two independent copies, each shrunk under its own path."""
    unknown = unknown_keys(config)
    if unknown:
        raise KeyError(f"keys the shrink table does not know: {', '.join(unknown)}")
    changes: list[Change] = []

    def walk(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in TABLE:
                rule = TABLE[path]
                new, why = (value, "") if rule is None else rule(value, ctx)
                if new != value:
                    # The tiny model is named, not its temporary folder.
                    shown = ctx.model_name if new == ctx.model else new
                    changes.append(Change(path, value, shown, why))
                out[key] = new
            else:
                out[key] = walk(value, path + ".")
        return out

    return walk(config, ""), changes


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def stand_in_is_documented(config_text: str, hub_source: str) -> bool:
    """Whether a config's comments name the stand-in of ``hub_source`` as `source: <name>`."""
    stand_in = HUB_STAND_INS[hub_source]
    return re.search(rf"^\s*#.*\bsource:\s*{re.escape(stand_in)}\b", config_text, re.M) is not None
