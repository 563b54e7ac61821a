"""Stage evaluate: score base pi0, SFT on D and SFT on D_R (and any other model) on downstream math
and general benchmarks, and write the forgetting table and report."""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from patchgap.answers import equivalent, extract_answer, extract_choice
from patchgap.config import StrictModel
from patchgap.data import evalsets as bm
from patchgap.data.evalsets import HELDOUT_SETS, MC_SETS, render_lm_eval_tasks
from patchgap.data.records import FieldMap
from patchgap.errors import ConfigError, DataError
from patchgap.lm.generation import GenerationConfig, make_generator, resolve_model_path
from patchgap.lm.likelihood import CompletionScorer, chat_completion_ids
from patchgap.lm.models import apply_chat, device_for, dtype_for
from patchgap.progress import Progress
from patchgap.prompts import choice_eval_messages, math_eval_messages, render
from patchgap.reports.evaluation import write_report
from patchgap.reports.forgetting import forgetting_table
from patchgap.settings import data_dir as default_data_dir
from patchgap.stages import resume
from patchgap.stages.base import main, path_hash
from patchgap.stages.resume import LeftOut, StageState
from patchgap.storage.store import fetch_to_local

log = logging.getLogger("patchgap.stages.evaluate")

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

    @field_validator("benchmarks")
    @classmethod
    def _known_sets(cls, value: list[str] | None) -> list[str] | None:
        unknown = [b for b in value or [] if b not in MC_SETS]
        if unknown:
            raise ValueError(f"drift.benchmarks: unknown {unknown}; known: {sorted(MC_SETS)}")
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

    @field_validator("sets")
    @classmethod
    def _known_sets(cls, value: list[str]) -> list[str]:
        unknown = [b for b in value if b not in HELDOUT_SETS]
        if unknown:
            raise ValueError(f"heldout.sets: unknown {unknown}; known: {sorted(HELDOUT_SETS)}")
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


@dataclass
class ItemResult:
    """One model's outcome on one item."""

    id: str
    correct: bool
    prediction: str | None = None
    gold: str | None = None
    text: str | None = None
    num_tokens: int | None = None
    gold_logprob: float | None = None
    gold_logprob_norm: float | None = None
    gold_choice_logprob: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# ----------------------------------------------------------------------------- models


def resolve_models(config: Config, models_input: Path | None, workdir: Path) -> dict[str, Path]:
    """Label -> local model folder, from config entries and/or the `models` input folder."""
    out: dict[str, Path] = {}
    if config.models:
        for entry in config.models:
            out[entry.label] = _model_folder(entry.path, models_input, workdir / entry.label)
    elif models_input is not None:
        if (models_input / "config.json").is_file():
            out[models_input.name] = models_input
        else:
            for sub in sorted(p for p in models_input.iterdir() if p.is_dir()):
                # a stage output folder may hold the model under model/ (sft writes one)
                folder = sub if (sub / "config.json").is_file() else sub / "model"
                if (folder / "config.json").is_file():
                    out[sub.name] = folder
        if not out:
            raise ConfigError(f"models input {models_input}: no model folders (config.json) in it")
    if config.model is not None and config.base not in out:
        out = {config.base: _model_folder(config.model, None, workdir / config.base), **out}
    if not out:
        raise ConfigError("evaluate: no models; set `models:` or pass the `models` input")
    return out


def _model_folder(path: str, models_input: Path | None, dest: Path) -> Path:
    if path.startswith("s3://"):
        return Path(fetch_to_local(path, dest))
    if models_input is not None and (models_input / path).is_dir():
        return models_input / path

    return resolve_model_path(path)


# ----------------------------------------------------------------------------- resume

#: Settings that change no (model, benchmark) result: the table's and where state goes.
NOT_IN_FINGERPRINT = LeftOut.of(
    "model",
    "models",
    "base",
    "baseline",
    "rewritten",
    "gold_logprob",
    "bootstrap_reps",
    "near_zero",
    "state_uri",
)


def fingerprint(config: Config) -> str:
    """What identifies the kept results: every setting that changes one."""
    return resume.fingerprint(config, NOT_IN_FINGERPRINT, length=16)


class EvalState(StageState):
    """Finished (model, benchmark) results under ``<state_uri>/<fingerprint>/<model hash>/``,
    one object per benchmark, so a restarted evaluation only runs what is missing."""

    stage = NAME

    def _key(self, model: str, bench: str) -> str:
        return f"{model}/{bench}.json"

    def load(self, model: str, bench: str) -> dict[str, Any] | None:
        """The saved result, or None when absent or unreadable (then it is recomputed)."""
        return self.load_rows(model, bench, lambda rows: [ItemResult(**row) for row in rows])

    def load_rows(
        self,
        model: str,
        name: str,
        convert: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> dict[str, Any] | None:
        """A saved ``{"items": [...], ...}`` body (items through ``convert``), or None when
        absent or unreadable."""

        def body(blob: bytes) -> dict[str, Any]:
            data = json.loads(blob)
            if not isinstance(data.get("items"), list):
                raise ValueError("no items")
            if convert is not None:
                data["items"] = convert(data["items"])
            return data

        return self.read_unit(self._key(model, name), body)

    def save(self, model: str, bench: str, items: Sequence[ItemResult], **extra: Any) -> None:
        self.save_rows(model, bench, [r.as_dict() for r in items], **extra)

    def save_rows(
        self, model: str, name: str, rows: Sequence[Mapping[str, Any]], **extra: Any
    ) -> None:
        body = {"items": list(rows), **extra}
        blob = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
        self.write_unit(self._key(model, name), blob)


# ----------------------------------------------------------------------------- generative sets


def _math_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    sets: dict[str, list[Any]] = {}
    for ms in config.math:
        if ms.path is not None:
            items = bm.load_mapped_set(ms.path, ms.fields, data_dir)
        elif ms.name in config.benchmark_paths and ms.name in bm.MATH_SETS:
            spec = replace(bm.MATH_SETS[ms.name], path=config.benchmark_paths[ms.name])
            items = bm.load_math_set(spec, data_dir)
        else:
            items = bm.load_math_set(ms.name, data_dir)
        sets[ms.name] = bm.take_subset(items, config.limit_for(ms.name), config.seed)
    return sets


def _choice_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    sets = {}
    for name in config.choice:
        items = bm.load_mc_set(name, config.benchmark_paths.get(name), data_dir)
        sets[name] = bm.take_subset(items, config.limit_for(f"{name}_gen"), config.seed)
    return sets


def generative_eval(
    config: Config,
    model_path: Path,
    math_sets: Mapping[str, Sequence[Any]],
    choice_sets: Mapping[str, Sequence[Any]],
    on_set: Callable[[str, list[ItemResult]], None] | None = None,
) -> dict[str, list[ItemResult]]:
    """Greedy answers of one model to every math and boxed-letter item, scored per item;
    ``on_set`` is called as each set finishes (to save it)."""
    if not math_sets and not choice_sets:
        return {}
    work = sum(len(v) for v in math_sets.values()) + sum(len(v) for v in choice_sets.values())
    gen = make_generator(model_path, None, config.generation, work=work)
    tok = gen.tokenizer  # type: ignore[attr-defined]
    results: dict[str, list[ItemResult]] = {}
    try:
        for name, items in math_sets.items():
            t0 = time.time()
            prompts = [apply_chat(tok, math_eval_messages(it.question)) for it in items]
            outs = _generate(gen, prompts, model_path, name)
            res = []
            for it, (g,) in zip(items, outs, strict=True):
                if it.choice_labels:
                    pred = extract_choice(g.text, it.choice_labels)
                    ok = pred == it.gold
                else:
                    pred = extract_answer(g.text)
                    ok = equivalent(g.text, it.gold)
                res.append(ItemResult(it.id, ok, pred, it.gold, g.text, g.num_tokens))
            results[name] = res
            _log_set(model_path, name, res, time.time() - t0)
            if on_set is not None:
                on_set(name, res)
        for name, items in choice_sets.items():
            t0 = time.time()
            prompts = []
            for it in items:
                question = f"{it.passage}\n\n{it.question}" if it.passage else it.question
                prompts.append(apply_chat(tok, choice_eval_messages(question, it.options)))
            outs = _generate(gen, prompts, model_path, f"{name}_gen")
            res = []
            for it, (g,) in zip(items, outs, strict=True):
                labels = "ABCDEFGHIJ"[: len(it.options)]
                pred = extract_choice(g.text, labels)
                res.append(
                    ItemResult(
                        it.id, pred == it.gold_letter, pred, it.gold_letter, g.text, g.num_tokens
                    )
                )
            results[f"{name}_gen"] = res
            _log_set(model_path, f"{name}_gen", res, time.time() - t0)
            if on_set is not None:
                on_set(f"{name}_gen", res)
    finally:
        gen.close()
        del gen
        gc.collect()
    return results


def _generate(gen: Any, prompts: list[str], model: Path, bench: str) -> list[list[Any]]:
    """Greedy generations with a bar (items/s, ETA) per model and benchmark."""
    with Progress(f"{model.name} {bench}", "items", total=len(prompts)) as bar:
        return gen.generate(prompts, progress=bar.update)


def _log_set(model: Path, name: str, res: Sequence[ItemResult], seconds: float) -> None:
    acc = sum(r.correct for r in res) / max(1, len(res))
    log.info("%s %s: acc %.3f on %d items (%.1f s)", model.name, name, acc, len(res), seconds)


# ----------------------------------------------------------------------------- lm-eval


def lm_eval_general(
    config: Config, model_path: Path, data_dir: Path | None, tasks_dir: Path
) -> tuple[dict[str, list[ItemResult]], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run the general benchmarks through lm-eval's ``simple_evaluate`` on one model.

    Project tasks run on the fixed seeded subset (lm-eval's ``samples``); other lm-eval task
    names run on their first ``limit`` items (lm-eval's ``limit``). Returns per-item outcomes,
    lm-eval's aggregate numbers and its sample logs.
    """
    if not config.general:
        return {}, {}, {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = [b for b in config.general if b in bm.LM_EVAL_TASKS]
    external = [b for b in config.general if b not in bm.LM_EVAL_TASKS]
    device = device_for(config.generation.device)
    dtype = dtype_for(config.generation.dtype, device)
    lm = HFLM(
        pretrained=str(model_path),
        device=device,
        dtype=dtype,
        batch_size=config.generation.batch_size,
        trust_remote_code=config.generation.trust_remote_code,
    )
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=bool(external))
    per_item: dict[str, list[ItemResult]] = {}
    aggregates: dict[str, Any] = {}
    logs: dict[str, list[dict[str, Any]]] = {}
    runs: list[tuple[list[str], dict[str, Any]]] = []
    if ours:
        samples = {}
        for b in ours:
            n = len(bm.load_mc_set(b, config.benchmark_paths.get(b), data_dir))
            samples[bm.LM_EVAL_TASKS[b]] = bm.subset_indices(n, config.limit_for(b), config.seed)
        runs.append(([bm.LM_EVAL_TASKS[b] for b in ours], {"samples": samples}))
    for b in external:
        runs.append(([b], {"limit": config.limit_for(b)}))
    names = {bm.LM_EVAL_TASKS[b]: b for b in ours} | {b: b for b in external}
    try:
        for tasks, kwargs in runs:
            t0 = time.time()
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=0,
                task_manager=manager,
                log_samples=True,
                random_seed=config.seed,
                numpy_random_seed=config.seed,
                torch_random_seed=config.seed,
                fewshot_random_seed=config.seed,
                **kwargs,
            )
            if out is None:  # non-zero ranks under accelerate get nothing back
                continue
            for task in tasks:
                bench = names[task]
                aggregates[bench] = _clean(out["results"].get(task, {}))
                logs[bench] = [_slim_sample(s) for s in out["samples"].get(task, [])]
                per_item[bench] = [
                    ItemResult(
                        str(s["doc"].get("id", s["doc_id"]))
                        if isinstance(s["doc"], dict)
                        else str(s["doc_id"]),
                        _metric(s, config.mc_metric) >= 1.0,
                        **gold_logprobs(s),
                    )
                    for s in out["samples"].get(task, [])
                ]
                _log_set(model_path, bench, per_item[bench], time.time() - t0)
    finally:
        del lm
        gc.collect()
    return per_item, aggregates, logs


def _metric(sample: Mapping[str, Any], name: str) -> float:
    value = sample.get(name, sample.get("acc"))
    if value is None:
        raise DataError(f"lm-eval sample {sample.get('doc_id')}: no {name} (multiple-choice task?)")
    return float(value)


def gold_logprobs(sample: Mapping[str, Any]) -> dict[str, float]:
    """The gold choice's log-likelihood in an lm-eval multiple-choice sample log, that divided
    by the choice's length in characters (what acc_norm compares across choices), and its
    log-probability among the choices (log-softmax over the choices' log-likelihoods: what acc
    turns into right or wrong); empty when the sample has no single gold index or no per-choice
    log-likelihoods."""
    lls = [float(r[0]) for r in sample.get("filtered_resps") or [] if _is_pair(r)]
    gold = sample.get("target")
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(lls):
        return {}
    doc = sample.get("doc")
    options = doc.get("options") if isinstance(doc, dict) else None
    if isinstance(options, list) and len(options) == len(lls):
        choice = str(options[gold])
    else:
        # lm-eval's continuation is the target delimiter (a space by default) and the choice
        args = sample.get("arguments") or []
        cont = str(args[gold][1]) if gold < len(args) and len(args[gold]) == 2 else ""
        choice = cont[1:] if cont.startswith(" ") else cont
    top = max(lls)
    log_z = top + math.log(sum(math.exp(v - top) for v in lls))
    out = {"gold_logprob": lls[gold], "gold_choice_logprob": lls[gold] - log_z}
    if choice:
        out["gold_logprob_norm"] = lls[gold] / len(choice)
    return out


def _slim_sample(s: Mapping[str, Any]) -> dict[str, Any]:
    doc = s.get("doc")
    return {
        "doc_id": s.get("doc_id"),
        "id": doc.get("id") if isinstance(doc, dict) else None,
        "target": s.get("target"),
        "acc": s.get("acc"),
        "acc_norm": s.get("acc_norm"),
        "loglikelihoods": [float(r[0]) for r in s.get("filtered_resps", []) if _is_pair(r)],
        "prompt_hash": s.get("prompt_hash"),
        "doc_hash": s.get("doc_hash"),
    }


def _is_pair(r: Any) -> bool:
    return isinstance(r, (list, tuple)) and len(r) == 2


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and v != "N/A"}


# ----------------------------------------------------------------------------- continuous metrics

#: State and item-file names of the continuous metrics (per model), and of pi0's drift answers.
DRIFT = "drift_nll"
DRIFT_ANSWERS = "drift_answers"
HELDOUT_PREFIX = "heldout_nll_"


def drift_questions(config: Config, data_dir: Path | None) -> list[tuple[str, str, str]]:
    """The fixed general questions pi0 answers for the drift metric: (benchmark, id, text)."""
    if not config.drift.enabled:
        return []

    names = config.drift.benchmarks
    if names is None:
        names = [b for b in config.general if b in bm.MC_SETS]
    if not names:
        if config.general:  # without general benchmarks no forgetting is asked for at all
            log.warning(
                "evaluate: drift is on but no project multiple-choice set to draw questions "
                "from; set drift.benchmarks (e.g. [arc_easy, piqa]) or drift.enabled: false"
            )
        return []
    sets = {b: bm.load_mc_set(b, config.benchmark_paths.get(b), data_dir) for b in names}
    return bm.general_questions(sets, config.drift.questions, config.seed)


def heldout_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    """The held-out problems with reference solutions, a fixed seeded subset per set."""
    if not config.heldout.enabled:
        return {}

    return {
        name: bm.take_subset(
            bm.load_heldout_set(name, config.benchmark_paths.get(name), data_dir),
            config.heldout.limit,
            config.seed,
        )
        for name in config.heldout.sets
    }


def pi0_answers(
    config: Config, base_path: Path, questions: Sequence[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """pi0's greedy answer to every drift question (the texts every model is scored on)."""
    gen_cfg = config.generation.model_copy(update={"max_new_tokens": config.drift.max_new_tokens})
    gen = make_generator(base_path, None, gen_cfg, work=len(questions))
    t0 = time.time()
    try:
        tok = gen.tokenizer  # type: ignore[attr-defined]
        prompts = [apply_chat(tok, [{"role": "user", "content": q}]) for _, _, q in questions]
        outs = _generate(gen, prompts, base_path, "drift answers")
    finally:
        gen.close()
        del gen
        gc.collect()
    rows = [
        {
            "id": f"{bench}:{item_id}",
            "benchmark": bench,
            "question": question,
            "answer": g.text,
            "num_tokens": g.num_tokens,
            "finish_reason": g.finish_reason,
        }
        for (bench, item_id, question), (g,) in zip(questions, outs, strict=True)
    ]
    tokens = sum(r["num_tokens"] for r in rows)
    log.info(
        "%s: %d drift answers, %d tokens (%.1f s)",
        base_path.name,
        len(rows),
        tokens,
        time.time() - t0,
    )
    return rows


def continuous_eval(
    config: Config,
    model_path: Path,
    answers: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Any]],
    on_metric: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """One model's NLL of pi0's drift answers (``answers``, may be empty) and of the held-out
    reference solutions (``heldout``), per item: ``nll`` (nats per token), ``tokens``,
    ``nll_sum``. ``on_metric`` is called as each metric finishes (to save it)."""
    if not answers and not heldout:
        return {}
    scorer = CompletionScorer.load(
        model_path,
        device=config.generation.device,
        dtype=config.generation.dtype,
        trust_remote_code=config.generation.trust_remote_code,
        max_batch_tokens=config.nll_batch_tokens,
    )
    try:
        jobs = _nll_jobs(config, scorer.tokenizer, answers, heldout)
        results: dict[str, list[dict[str, Any]]] = {}
        for metric, ids, pairs in jobs:
            t0 = time.time()
            with Progress(f"{model_path.name} {metric}", "items", total=len(pairs)) as bar:
                scored = scorer.score(pairs, progress=bar.update)
            rows = [
                {
                    "id": i,
                    "nll": sc.mean if sc.tokens else None,
                    "tokens": sc.tokens,
                    "nll_sum": sc.nll,
                }
                for i, sc in zip(ids, scored, strict=True)
            ]
            results[metric] = rows
            got = [r["nll"] for r in rows if r["nll"] is not None]
            seconds = time.time() - t0
            log.info(
                "%s %s: mean NLL %.4f nats/token on %d items, %d tokens (%.1f s, %.0f tokens/s)",
                model_path.name,
                metric,
                sum(got) / max(1, len(got)),
                len(rows),
                sum(r["tokens"] for r in rows),
                seconds,
                sum(r["tokens"] for r in rows) / max(seconds, 1e-9),
            )
            if on_metric is not None:
                on_metric(metric, rows)
    finally:
        scorer.close()
        del scorer
        gc.collect()
    return results


def _nll_jobs(
    config: Config,
    tok: Any,
    answers: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Any]],
) -> list[tuple[str, list[str], list[tuple[list[int], list[int]]]]]:
    """(metric, item ids, (prompt, completion) token ids) for every NLL ``continuous_eval``
    scores."""
    jobs: list[tuple[str, list[str], list[tuple[list[int], list[int]]]]] = []
    if answers:
        # An answer cut at its token limit never closed its turn: score only its own tokens.
        pairs = [
            chat_completion_ids(
                tok, a["question"], a["answer"], close_turn=a["finish_reason"] == "stop"
            )
            for a in answers
        ]
        jobs.append((DRIFT, [str(a["id"]) for a in answers], pairs))
    for name, records in heldout.items():
        template = config.heldout.prompt_template
        pairs = [
            chat_completion_ids(
                tok,
                render(template, question=r.question),
                r.solution,
                max_tokens=config.heldout.max_tokens,
            )
            for r in records
        ]
        jobs.append((f"{HELDOUT_PREFIX}{name}", [str(r.id) for r in records], pairs))
    return jobs


def _drift_answers(
    config: Config,
    models: Mapping[str, Path],
    questions: Sequence[tuple[str, str, str]],
    state: EvalState,
) -> list[dict[str, Any]]:
    """pi0's drift answers: reused from the state when saved, else generated once and saved."""
    if not questions:
        return []
    base = models.get(config.base)
    if base is None:
        log.warning("evaluate: no model labelled %r (pi0): drift is not scored", config.base)
        return []
    key = _model_key(base)
    saved = state.load_rows(key, DRIFT_ANSWERS)
    wanted = [f"{b}:{i}" for b, i, _ in questions]
    if saved is not None and [r.get("id") for r in saved["items"]] == wanted:
        log.info("evaluate: reusing pi0's %d drift answers", len(wanted))
        return saved["items"]
    rows = pi0_answers(config, base, questions)
    state.save_rows(key, DRIFT_ANSWERS, rows)
    return rows


def _continuous_model(
    config: Config,
    path: Path,
    state: EvalState,
    answers: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Reuse this model's saved continuous metrics; score those still missing, saving each."""
    key = _model_key(path)
    results: dict[str, list[dict[str, Any]]] = {}
    wanted = ([DRIFT] if answers else []) + [f"{HELDOUT_PREFIX}{n}" for n in heldout]
    for metric in wanted:
        saved = state.load_rows(key, metric)
        if saved is not None:
            results[metric] = saved["items"]
    todo_answers = answers if DRIFT in wanted and DRIFT not in results else []
    todo_heldout = {n: v for n, v in heldout.items() if f"{HELDOUT_PREFIX}{n}" not in results}
    results.update(
        continuous_eval(
            config,
            path,
            todo_answers,
            todo_heldout,
            on_metric=lambda metric, rows: state.save_rows(key, metric, rows),
        )
    )
    return {m: results[m] for m in wanted if m in results}


def continuous_values(
    general: Mapping[str, Sequence[ItemResult]],
    continuous: Mapping[str, Sequence[Mapping[str, Any]]],
    gold_logprob: bool = True,
    normalised: bool = True,
) -> dict[str, dict[str, float]]:
    """One model's per-item continuous values keyed as the forgetting report reads them:
    ``gold_logprob:<bench>``, ``gold_choice_prob:<bench>`` (the gold choice's probability among
    the choices), ``gold_logprob_norm:<bench>`` (with ``normalised``: when acc_norm is the
    headline), ``drift_nll``, ``heldout_nll:<set>`` (item id -> value)."""
    out: dict[str, dict[str, float]] = {}
    if gold_logprob:
        forms = {
            "gold_logprob": lambda r: r.gold_logprob,
            "gold_choice_prob": lambda r: (
                None if r.gold_choice_logprob is None else math.exp(r.gold_choice_logprob)
            ),
        }
        if normalised:
            forms["gold_logprob_norm"] = lambda r: r.gold_logprob_norm
        for bench, items in general.items():
            for form, get in forms.items():
                vals = {r.id: v for r in items if (v := get(r)) is not None}
                if vals:
                    out[f"{form}:{bench}"] = vals
    for metric, rows in continuous.items():
        key = (
            f"heldout_nll:{metric.removeprefix(HELDOUT_PREFIX)}"
            if metric.startswith(HELDOUT_PREFIX)
            else metric
        )
        vals = {str(r["id"]): float(r["nll"]) for r in rows if r.get("nll") is not None}
        if vals:
            out[key] = vals
    return out


# ----------------------------------------------------------------------------- run


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    out = outputs["report"]
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="patchgap-eval-") as tmp:
        work = Path(tmp)
        models = resolve_models(config, inputs.get("models"), work / "models")
        math_sets = _math_items(config, data_dir)
        choice_sets = _choice_items(config, data_dir)
        tasks_dir = None
        if config.general:
            tasks_dir = render_lm_eval_tasks(work / "tasks", data_dir, config.benchmark_paths)
        scores: dict[str, dict[str, dict[str, bool]]] = {}
        values: dict[str, dict[str, dict[str, float]]] = {}
        aggregates: dict[str, Any] = {}
        state = EvalState.open(config.state_uri, out, fingerprint(config))
        heldout = heldout_items(config, data_dir)
        answers = _drift_answers(config, models, drift_questions(config, data_dir), state)
        if answers:
            _write_jsonl_sets(out / "drift", {"pi0_answers": answers})
        for label, path in models.items():
            log.info("evaluating %s (%s)", label, path)
            results, agg, logs = _evaluate_model(config, path, state, math_sets, choice_sets)
            if tasks_dir is not None:
                pending = [b for b in config.general if b not in results]
                if pending:
                    sub = config.model_copy(update={"general": pending})
                    general, new_agg, new_logs = lm_eval_general(sub, path, data_dir, tasks_dir)
                    key = _model_key(path)
                    for bench, items in general.items():
                        extra = {"aggregate": new_agg.get(bench), "samples": new_logs.get(bench)}
                        state.save(key, bench, items, **extra)
                    results.update(general)
                    agg.update(new_agg)
                    logs.update(new_logs)
                aggregates[label] = agg
                _write_jsonl_sets(out / "lm_eval_samples" / label, logs)
            continuous = _continuous_model(config, path, state, answers, heldout)
            _write_jsonl_sets(
                out / "items" / label,
                {b: [r.as_dict() for r in rs] for b, rs in results.items()} | continuous,
            )
            scores[label] = {b: {r.id: r.correct for r in rs} for b, rs in results.items()}
            general_items = {b: results[b] for b in config.general if b in results}
            values[label] = continuous_values(
                general_items, continuous, config.gold_logprob, config.mc_metric == "acc_norm"
            )
    downstream = list(math_sets)
    general = [f"{n}_gen" for n in choice_sets] + list(config.general)
    table = forgetting_table(
        scores,
        downstream,
        general,
        base=config.base,
        baseline=config.baseline,
        rewritten=config.rewritten,
        near_zero=config.near_zero,
        bootstrap_reps=config.bootstrap_reps,
        seed=config.seed,
        values=values,
    )
    info = {
        "models": {k: str(v) for k, v in models.items()},
        "limit": config.limit,
        "seed": config.seed,
        "mc_metric": config.mc_metric,
        "drift_questions": len(answers),
        "heldout_items": {n: len(v) for n, v in heldout.items()},
        "seconds": round(time.time() - t0, 1),
    }
    write_report(table, out, info, {"lm_eval": aggregates})
    # The report is complete: the per-benchmark state would only duplicate it.
    state.discard()
    return _metrics(table)


def _model_key(path: Path) -> str:
    """What identifies a model's results: its files' content, not its folder name."""
    return path_hash(path)[:16]


def _evaluate_model(
    config: Config,
    path: Path,
    state: EvalState,
    math_sets: Mapping[str, Sequence[Any]],
    choice_sets: Mapping[str, Sequence[Any]],
) -> tuple[dict[str, list[ItemResult]], dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Reuse every saved result of this model; run the generative sets still missing, saving
    each as it finishes. Returns results, lm-eval aggregates and sample logs reused so far."""
    key = _model_key(path)
    results: dict[str, list[ItemResult]] = {}
    aggregates: dict[str, Any] = {}
    logs: dict[str, list[dict[str, Any]]] = {}
    benches = [*math_sets, *(f"{n}_gen" for n in choice_sets), *config.general]
    for bench in benches:
        saved = state.load(key, bench)
        if saved is None:
            continue
        results[bench] = saved["items"]
        if saved.get("aggregate") is not None:
            aggregates[bench] = saved["aggregate"]
        if saved.get("samples") is not None:
            logs[bench] = saved["samples"]
    if results:
        log.info("evaluate: %s: reusing %d finished benchmark(s)", path.name, len(results))
    todo_math = {n: v for n, v in math_sets.items() if n not in results}
    todo_choice = {n: v for n, v in choice_sets.items() if f"{n}_gen" not in results}
    results.update(
        generative_eval(
            config,
            path,
            todo_math,
            todo_choice,
            on_set=lambda bench, items: state.save(key, bench, items),
        )
    )
    return results, aggregates, logs


def _write_jsonl_sets(folder: Path, sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """Flat numbers for KFP Metrics: accuracy per model and benchmark, forgetting, reduction."""
    m: dict[str, float] = {}
    for label, row in table["models"].items():
        for bench, acc in row["accuracy"].items():
            m[f"{label}/{bench}/acc"] = acc["acc"]
        for key in (
            "gain_mean",
            "forgetting_mean",
            "reduction_mean_of_ratios",
            "reduction_of_mean",
        ):
            if row.get(key) is not None:
                m[f"{label}/{key}"] = float(row[key])
    cont = table.get("continuous") or {}
    for label, row in (cont.get("models") or {}).items():
        for metric, test in row.get("vs_base", {}).items():
            m[f"{label}/{metric.replace(':', '/')}/delta"] = float(test["diff"])
        for measure, test in row.get("forgetting", {}).items():
            m[f"{label}/forgetting/{measure}"] = float(test["diff"])
        for measure, value in (row.get("reduction") or {}).items():
            if value is not None:
                m[f"{label}/reduction/{measure}"] = float(value)
    return m


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
