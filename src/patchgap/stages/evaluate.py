"""Stage evaluate: score base pi0, SFT on D and SFT on D_R (and any other model) on downstream math
and general benchmarks, and write the forgetting table and report."""

from __future__ import annotations

import gc
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from patchgap.config import StrictModel
from patchgap.errors import ConfigError, DataError
from patchgap.stages.base import main

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
    """A downstream math set: a known name, or a JSONL file with mapped field names."""

    name: str = Field(description="gsm8k, math500, amc23, aime24, minerva_math, sat_math, ...")
    path: str | None = Field(None, description="JSONL path or s3:// URI (custom sets)")
    question_field: str = Field("question", description="field with the problem text")
    answer_field: str | None = Field("answer", description="field with the final answer")
    solution_field: str | None = Field(
        None, description="field with a worked solution, used when no answer field is given"
    )
    id_field: str | None = Field(None, description="field with the item id")


class Config(StrictModel):
    """Settings of the evaluate stage (defaults: the CPU demo, small seeded subsets)."""

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
    data_dir: str | None = Field(
        None, description="folder laid out like shared/data (default: PATCHGAP_DATA_DIR)"
    )
    benchmark_paths: dict[str, str] = Field(
        default_factory=dict,
        description="override a named benchmark's location (path or s3://), math or general",
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="generation backend for the math and boxed-letter sets"
    )
    max_new_tokens: int = Field(512, ge=1, description="most new tokens per answer")
    batch_size: int = Field(8, ge=1, description="prompts per batch (generation and lm-eval)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    trust_remote_code: bool = Field(False, description="allow model code from model folders")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (vllm)")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="vllm memory share")
    max_model_len: int | None = Field(None, ge=1, description="vllm context length")
    bootstrap_reps: int = Field(2000, ge=100, description="bootstrap resamples")
    near_zero: float = Field(
        0.005, ge=0.0, description="|F_D| below this: no forgetting reduction (caveat)"
    )

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
        from patchgap.storage.store import fetch_to_local

        return Path(fetch_to_local(path, dest))
    if models_input is not None and (models_input / path).is_dir():
        return models_input / path
    from patchgap.lm.generation import resolve_model_path

    return resolve_model_path(path)


# ----------------------------------------------------------------------------- generative sets


def _math_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    from patchgap.data import evalsets as bm

    sets: dict[str, list[Any]] = {}
    for ms in config.math:
        if ms.path is not None:
            spec = bm.MathSetSpec(
                ms.path, ms.question_field, ms.answer_field, ms.solution_field, ms.id_field
            )
            items = bm.load_math_set(spec, data_dir)
        elif ms.name in config.benchmark_paths and ms.name in bm.MATH_SETS:
            spec = replace(bm.MATH_SETS[ms.name], path=config.benchmark_paths[ms.name])
            items = bm.load_math_set(spec, data_dir)
        else:
            items = bm.load_math_set(ms.name, data_dir)
        sets[ms.name] = bm.take_subset(items, config.limit_for(ms.name), config.seed)
    return sets


def _choice_items(config: Config, data_dir: Path | None) -> dict[str, list[Any]]:
    from patchgap.data import evalsets as bm

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
) -> dict[str, list[ItemResult]]:
    """Greedy answers of one model to every math and boxed-letter item, scored per item."""
    from patchgap.answers import equivalent, extract_answer, extract_choice
    from patchgap.lm.generation import GenerationConfig, make_generator
    from patchgap.lm.models import apply_chat
    from patchgap.prompts import choice_eval_messages, math_eval_messages

    if not math_sets and not choice_sets:
        return {}
    gen_cfg = GenerationConfig(
        backend=config.backend,
        max_new_tokens=config.max_new_tokens,
        temperature=0.0,
        batch_size=config.batch_size,
        seed=config.seed,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_model_len=config.max_model_len,
    )
    gen = make_generator(model_path, None, gen_cfg)
    tok = gen.tokenizer  # type: ignore[attr-defined]
    results: dict[str, list[ItemResult]] = {}
    try:
        for name, items in math_sets.items():
            t0 = time.time()
            prompts = [apply_chat(tok, math_eval_messages(it.question)) for it in items]
            outs = gen.generate(prompts)
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
        for name, items in choice_sets.items():
            t0 = time.time()
            prompts = []
            for it in items:
                question = f"{it.passage}\n\n{it.question}" if it.passage else it.question
                prompts.append(apply_chat(tok, choice_eval_messages(question, it.options)))
            outs = gen.generate(prompts)
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
    finally:
        gen.close()
        del gen
        gc.collect()
    return results


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

    from patchgap.data import evalsets as bm
    from patchgap.lm.models import device_for

    ours = [b for b in config.general if b in bm.LM_EVAL_TASKS]
    external = [b for b in config.general if b not in bm.LM_EVAL_TASKS]
    device = device_for(config.device)
    dtype = (
        config.dtype if config.dtype != "auto" else ("bfloat16" if "cuda" in device else "float32")
    )
    lm = HFLM(
        pretrained=str(model_path),
        device=device,
        dtype=dtype,
        batch_size=config.batch_size,
        trust_remote_code=config.trust_remote_code,
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


# ----------------------------------------------------------------------------- run


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    from patchgap.reports.evaluation import write_report
    from patchgap.reports.forgetting import forgetting_table
    from patchgap.settings import data_dir as default_data_dir

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
            from patchgap.data.evalsets import render_lm_eval_tasks

            tasks_dir = render_lm_eval_tasks(work / "tasks", data_dir, config.benchmark_paths)
        scores: dict[str, dict[str, dict[str, bool]]] = {}
        aggregates: dict[str, Any] = {}
        for label, path in models.items():
            log.info("evaluating %s (%s)", label, path)
            results = generative_eval(config, path, math_sets, choice_sets)
            if tasks_dir is not None:
                general, agg, logs = lm_eval_general(config, path, data_dir, tasks_dir)
                results.update(general)
                aggregates[label] = agg
                _write_jsonl_sets(out / "lm_eval_samples" / label, logs)
            _write_jsonl_sets(
                out / "items" / label, {b: [r.as_dict() for r in rs] for b, rs in results.items()}
            )
            scores[label] = {b: {r.id: r.correct for r in rs} for b, rs in results.items()}
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
    )
    info = {
        "models": {k: str(v) for k, v in models.items()},
        "limit": config.limit,
        "seed": config.seed,
        "mc_metric": config.mc_metric,
        "seconds": round(time.time() - t0, 1),
    }
    write_report(table, out, info, {"lm_eval": aggregates})
    return _metrics(table)


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
    return m


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))
