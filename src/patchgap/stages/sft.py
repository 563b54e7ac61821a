"""Stage sft: supervised fine-tuning of pi0 on D_R (or on D for the baseline) with TRL's
SFTTrainer, pi0's chat template and the loss on the answer only; full or LoRA, resumable."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from patchgap.config import StrictModel
from patchgap.data.fields import FieldMap
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.errors import ConfigError, PatchgapError
from patchgap.fsutil import write_text_atomic
from patchgap.lm.generation import resolve_model_path
from patchgap.lm.models import (
    device_for,
    dtype_for,
    has_chat_template,
    load_tokenizer,
    merge_lora,
    save_merged,
)
from patchgap.prompts import render
from patchgap.stages import resume
from patchgap.stages.base import main, path_hash
from patchgap.stages.resume import LeftOut
from patchgap.storage.store import join_uri
from patchgap.training.checkpoints import CheckpointStore, checkpoint_step
from patchgap.training.launch import maybe_relaunch
from patchgap.training.lora import LoraSettings
from patchgap.training.snapshots import SNAPSHOTS_DIR, snapshot_folder, snapshot_steps
from patchgap.training.tracking import (
    REPORT_TO_HELP,
    TENSORBOARD_DIR,
    ReportTo,
    report_to,
    tensorboard_sync,
)
from patchgap.training.trainer_args import gradient_checkpointing_arg

log = logging.getLogger("patchgap.stages.sft")

NAME = "sft"
INPUTS = ("dataset",)
OPTIONAL_INPUTS: tuple[str, ...] = ()
OUTPUTS = ("model", "metrics")

LOSS_JSON = "loss_curve.json"
LOSS_PNG = "loss_curve.png"
SUMMARY_JSON = "summary.json"


#: sft's LoRA dropout (the shared LoraSettings default, the rewriter's, is 0.0).
LORA_DROPOUT = 0.05


class Config(StrictModel):
    """Settings of the sft stage (defaults: the CPU demo)."""

    model: str = Field("smollm2", description="pi0: a model folder or a known name (smollm2)")
    fields: str | FieldMap = Field(
        "auto", description="field preset or mapping of the dataset (D_R: question/solution)"
    )
    limit: int | None = Field(None, ge=1, description="train on at most this many records")
    seed: int = Field(0, description="seed of data order, subset and initialisation")
    prompt_template: str = Field(
        "{question}", description="user turn built from the question ({question})"
    )
    finetuning: Literal["full", "lora"] = Field(
        "full", description="full fine-tuning (the paper) or LoRA (merged on save)"
    )
    lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings(dropout=LORA_DROPOUT),
        description=f"LoRA for finetuning: lora, merged into the weights when saved (dropout "
        f"{LORA_DROPOUT} unless set)",
    )
    learning_rate: float = Field(1e-5, gt=0.0, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="warm-up share of the steps")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    num_epochs: float = Field(1.0, gt=0.0, description="passes over the data")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: epochs)")
    per_device_batch_size: int = Field(4, ge=1, description="sequences per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per step")
    max_length: int = Field(1024, ge=16, description="longest training sequence in tokens")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    logging_steps: int = Field(1, ge=1, description="log the loss every N steps")
    report_to: ReportTo = Field("none", description=REPORT_TO_HELP)
    device: str = Field("auto", description="auto, cpu, cuda")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="training precision; auto = bf16 on GPU, float32 on CPU"
    )
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")
    checkpoint_uri: str | None = Field(
        None,
        description="s3:// prefix or folder for resumable checkpoints, one subfolder per run "
        "fingerprint (config + data), so the pipeline's SFT runs can share it; None = none",
    )
    checkpoint_every: int = Field(50, ge=1, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, ge=0, description="complete checkpoints kept (0 = all)")
    work_dir: str | None = Field(None, description="local trainer folder (default: temporary)")
    distributed: Literal["auto", "zero2", "zero3", "fsdp", "none"] = Field(
        "auto",
        description="with more than one visible GPU, re-launch under `accelerate launch` with "
        "configs/accelerate/<name>.yaml; auto = zero2 (zero3 for full fine-tuning), none = one",
    )
    accelerate_config: str | None = Field(
        None, description="explicit accelerate config file (replaces the named choice)"
    )
    nodes: int = Field(
        1,
        ge=1,
        description="nodes to train on; above 1 the pipeline step runs the stage as a Kubeflow "
        "Trainer TrainJob on that many nodes of the GPU pool (docs/cluster.md)",
    )
    snapshots: list[float] = Field(
        default_factory=list,
        description="also save the model at these fractions (0, 1] of the run's optimizer steps, "
        "under <model>/snapshots/step-<N>/ (rounded up; the final model stays at the root)",
    )

    @field_validator("snapshots")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"snapshot fractions must lie in (0, 1], got {bad[0]}")
        return sorted(set(value))


#: Fields that may change between a run and its resumption without making checkpoints foreign.
NOT_IN_FINGERPRINT = LeftOut.of(
    "checkpoint_uri",
    "checkpoint_every",
    "keep_checkpoints",
    "work_dir",
    "distributed",
    "accelerate_config",
    "nodes",
    "device",
    "max_steps",
    "num_epochs",
    "logging_steps",
    "report_to",
    # What is saved, not trained; left out while empty so runs from before snapshots existed
    # keep their fingerprint (and checkpoints). A run with snapshots keeps them in its
    # checkpoint folder, so they belong to its identity.
    while_off=("snapshots",),
)


def fingerprint(config: Config, dataset: Path) -> str:
    """Identity of a training run: the config (minus resumable knobs) and the data's bytes."""
    return resume.fingerprint(config, NOT_IN_FINGERPRINT, {"data": path_hash(dataset)})


def build_rows(config: Config, dataset: Path, rejects: Path) -> tuple[list[dict[str, Any]], int]:
    """Conversational prompt-completion rows (TRL masks the prompt out of the loss)."""
    spec = DatasetSpec(
        source=str(dataset), fields=config.fields, limit=config.limit, seed=config.seed
    )
    loaded = load_records(spec, rejects)
    rows = []
    for rec in loaded.records:
        if not rec.solution.strip():
            continue
        rows.append(
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": render(config.prompt_template, question=rec.question),
                    }
                ],
                "completion": [{"role": "assistant", "content": rec.solution}],
            }
        )
    if not rows:
        raise PatchgapError(f"sft: {dataset}: no records with a solution to train on")
    return rows, loaded.counts.rejected_total


# ----------------------------------------------------------------------------- training


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    # Full fine-tuning shards the weights too (ZeRO-3); a LoRA run needs ZeRO-2 only.
    auto = "zero3" if config.finetuning == "full" else "zero2"
    relaunched = maybe_relaunch(config, inputs, outputs, NAME, auto=auto, summary_name=SUMMARY_JSON)
    if relaunched is not None:
        return relaunched
    with tempfile.TemporaryDirectory(prefix="patchgap-sft-") as tmp:
        work = Path(config.work_dir) if config.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _train(config, inputs, outputs, work)


def _train(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path], work: Path
) -> dict[str, float]:
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    # Deferred: it loads transformers.
    from patchgap.training.callbacks import SnapshotCallback

    t0 = time.time()
    model_dir = resolve_model_path(config.model)
    metrics_dir, model_out = Path(outputs["metrics"]), Path(outputs["model"])
    rows, rejected = build_rows(config, Path(inputs["dataset"]), metrics_dir / "rejects.jsonl")
    tokenizer = load_tokenizer(
        model_dir, padding_side="right", trust_remote_code=config.trust_remote_code
    )
    if not has_chat_template(tokenizer):
        raise ConfigError(f"sft: {model_dir}: the tokenizer has no chat template (pi0 must chat)")
    device = device_for(config.device)
    dtype = dtype_for(config.dtype, device)
    model = _load_model(config, model_dir, dtype)
    peft_config = config.lora.peft_config() if config.finetuning == "lora" else None
    args = _sft_args(SFTConfig, config, work, device, dtype)
    callbacks, resume_dir, checkpoints = _callbacks_and_restore(config, inputs, work, metrics_dir)
    resumed_step = checkpoint_step(resume_dir)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    # disable_tqdm makes the Trainer print every log dict; ProgressCallback shows them instead.
    trainer.remove_callback(PrinterCallback)
    merge = config.finetuning == "lora"
    if config.snapshots:
        trainer.add_callback(
            SnapshotCallback(
                config.snapshots,
                lambda step: _save_snapshot(
                    trainer, tokenizer, model_out, step, merge, model_dir, dtype, checkpoints
                ),
            )
        )
    result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    # Under ZeRO-3 or FSDP every process takes part in gathering the full weights (a collective:
    # rank 0 alone would wait forever); then rank 0 alone writes them.
    state = None if merge else trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return {}
    curve = _loss_points(trainer.state.log_history)
    _save_model(trainer, tokenizer, model_out, merge, state)
    final = trainer.state.global_step
    # The final step is listed too (its model is the one at the root) when snapshots are on.
    steps = sorted({*snapshot_steps(config.snapshots, final), final}) if config.snapshots else []
    _complete_snapshots(model_out, steps[:-1], checkpoints)
    write_loss_curve(curve, metrics_dir, title=f"SFT of {model_dir.name} ({config.finetuning})")
    summary = {
        "records": float(len(rows)),
        "rejected": float(rejected),
        "steps": float(trainer.state.global_step),
        "resumed_from_step": float(resumed_step),
        "loss_first": curve[0]["loss"] if curve else float("nan"),
        "loss_last": curve[-1]["loss"] if curve else float("nan"),
        "train_loss": float(result.training_loss),
        "train_seconds": round(time.time() - t0, 2),
        "snapshot_steps": steps,
    }
    write_text_atomic(metrics_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def _load_model(config: Config, model_dir: Path, dtype: str) -> Any:
    """pi0's weights (safetensors only) in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=getattr(torch, dtype),
        use_safetensors=True,
        trust_remote_code=config.trust_remote_code,
    )


def _loss_points(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-loss entries of the Trainer's log history, one per logged step."""
    return [
        {"step": h["step"], "loss": float(h["loss"]), "epoch": h.get("epoch")}
        for h in log_history
        if "loss" in h
    ]


def _sft_args(sft_config_class: Any, config: Config, work: Path, device: str, dtype: str) -> Any:
    """The SFTTrainer's arguments (``sft_config_class`` is trl's SFTConfig, imported late)."""
    return sft_config_class(
        output_dir=str(work / "trainer"),
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.checkpoint_uri else "no",
        save_steps=config.checkpoint_every,
        save_total_limit=2,
        report_to=report_to(config.report_to),
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        completion_only_loss=True,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        **gradient_checkpointing_arg(sft_config_class, config.gradient_checkpointing),
        disable_tqdm=True,
    )


def _callbacks_and_restore(
    config: Config, inputs: Mapping[str, Path], work: Path, metrics_dir: Path
) -> tuple[list[Any], Path | None, CheckpointStore | None]:
    """The trainer's callbacks (progress, checkpoint sync, TensorBoard), the checkpoint folder
    restored from ``checkpoint_uri`` to resume from (None: start fresh) and the run's
    checkpoint store (None without ``checkpoint_uri``)."""
    # Deferred: it loads transformers.
    from patchgap.training.callbacks import ProgressCallback

    callbacks: list[Any] = [ProgressCallback("sft")]
    resume_dir: Path | None = None
    checkpoints: CheckpointStore | None = None
    tb_uri = None
    if config.checkpoint_uri:
        from accelerate import PartialState

        # Deferred: it loads transformers.
        from patchgap.training.callbacks import CheckpointSyncCallback

        # One folder per fingerprint: SFT on D and on each D_R share the pipeline's sft config
        # (and so its checkpoint_uri), and must neither resume from nor refuse each other.
        fp = fingerprint(config, inputs["dataset"])
        checkpoints = CheckpointStore(resume.run_folder(config.checkpoint_uri, fp), fp)
        with PartialState().local_main_process_first():
            resume_dir = checkpoints.restore_latest(work / "restored")
        callbacks.append(CheckpointSyncCallback(checkpoints, config.keep_checkpoints or None))
        tb_uri = join_uri(checkpoints.uri, TENSORBOARD_DIR)
    if config.report_to == "tensorboard":
        callbacks.append(tensorboard_sync(tb_uri, metrics_dir / TENSORBOARD_DIR))
    return callbacks, resume_dir, checkpoints


def _save_model(
    trainer: Any, tokenizer: Any, out: Path, merge: bool, state: dict[str, Any] | None
) -> None:
    """safetensors weights + tokenizer (with pi0's chat template); LoRA merged into the weights.
    ``state`` is the full state dict every process gathered (None with ``merge``)."""
    out.mkdir(parents=True, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if merge:
        model = merge_lora(model)
    model.save_pretrained(out, safe_serialization=True, state_dict=state)
    _save_tokenizer(tokenizer, out)


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """The tokenizer padding on the left, what generation (evaluate) wants from a saved pi0;
    the training tokenizer keeps its side (a snapshot is saved mid-training)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.padding_side = side


def _save_snapshot(
    trainer: Any,
    tokenizer: Any,
    model_out: Path,
    step: int,
    merge: bool,
    model_dir: Path,
    dtype: str,
    checkpoints: CheckpointStore | None,
) -> None:
    """The model after ``step`` as a loadable folder under ``<model>/snapshots/step-<N>/``
    (called on every process), also kept beside the run's checkpoints so that a resumed run
    which has passed ``step`` still has it."""
    out = model_out / SNAPSHOTS_DIR / snapshot_folder(step)
    if merge:
        # The adapter alone, merged into pi0 on the CPU: merging the training model in place
        # would end its LoRA. LoRA runs under ZeRO-2 at most, so rank 0 holds the adapter.
        if not trainer.is_world_process_zero():
            return
        with tempfile.TemporaryDirectory(prefix="patchgap-snapshot-") as adapter:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(adapter)
            save_merged(model_dir, adapter, out, dtype=dtype)
        _save_tokenizer(tokenizer, out)
    else:
        state = trainer.accelerator.get_state_dict(trainer.model)
        if not trainer.is_world_process_zero():
            return
        out.mkdir(parents=True, exist_ok=True)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            out, safe_serialization=True, state_dict=state
        )
        _save_tokenizer(tokenizer, out)
    if checkpoints is not None:
        checkpoints.store.upload_dir(out, _snapshot_uri(checkpoints, step))
    log.info("snapshot of step %d saved to %s", step, out)


def _snapshot_uri(checkpoints: CheckpointStore, step: int) -> str:
    return join_uri(checkpoints.uri, SNAPSHOTS_DIR, snapshot_folder(step))


def _complete_snapshots(
    model_out: Path, steps: list[int], checkpoints: CheckpointStore | None
) -> None:
    """Every snapshot in ``steps`` present in the model folder: one a resumed run passed before
    its restart comes back from the checkpoint folder."""
    for step in steps:
        out = model_out / SNAPSHOTS_DIR / snapshot_folder(step)
        if out.is_dir():
            continue
        if (
            checkpoints is None
            or checkpoints.store.read_manifest(_snapshot_uri(checkpoints, step)) is None
        ):
            raise PatchgapError(
                f"sft: snapshot of step {step} is missing (the run resumed past it without "
                "one kept beside its checkpoints)"
            )
        checkpoints.store.download_dir(_snapshot_uri(checkpoints, step), out)


def write_loss_curve(curve: list[dict[str, Any]], folder: Path, title: str = "SFT") -> None:
    """The loss per logged step as JSON and as a PNG plot."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / LOSS_JSON, json.dumps(curve, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(folder / LOSS_PNG, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
