"""The lm-eval adapter: the general (forgetting) benchmarks through lm-evaluation-harness's
``simple_evaluate`` on one model, turned into per-item results, aggregates and slim sample logs.
(Named so that it does not shadow the ``lm_eval`` library.)"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from patchgap.data import evalsets as bm
from patchgap.errors import DataError
from patchgap.lm.models import device_for, dtype_for
from patchgap.stages.evaluate.config import Config
from patchgap.stages.evaluate.items import ItemResult, log_accuracy
from patchgap.stages.evaluate.models import released

#: One ``simple_evaluate`` call: its lm-eval task names and the keyword that picks its items
#: (``samples`` for project tasks, ``limit`` for other lm-eval tasks).
TaskRun = tuple[list[str], dict[str, Any]]


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
    # lm-eval pulls in torch, transformers and datasets: loaded only when a model is scored.
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours = [b for b in config.general if b in bm.LM_EVAL_TASKS]
    external = [b for b in config.general if b not in bm.LM_EVAL_TASKS]
    runs = _task_runs(config, ours, external, data_dir)
    bench_of_task = {bm.LM_EVAL_TASKS[b]: b for b in ours} | {b: b for b in external}
    device = device_for(config.generation.device)
    model = HFLM(
        pretrained=str(model_path),
        device=device,
        dtype=dtype_for(config.generation.dtype, device),
        batch_size=config.generation.batch_size,
        trust_remote_code=config.generation.trust_remote_code,
    )
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=bool(external))
    per_item: dict[str, list[ItemResult]] = {}
    aggregates: dict[str, Any] = {}
    logs: dict[str, list[dict[str, Any]]] = {}
    # HFLM has no close(); its weights are its `_model`.
    with released(model, drop_weights=_drop_hflm_weights) as lm:
        for tasks, kwargs in runs:
            started = time.time()
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
                bench = bench_of_task[task]
                samples = out["samples"].get(task, [])
                aggregates[bench] = _scalars(out["results"].get(task, {}))
                logs[bench] = [_slim_sample(s) for s in samples]
                per_item[bench] = [_item_result(s, config.mc_metric) for s in samples]
                log_accuracy(model_path, bench, per_item[bench], time.time() - started)
    return per_item, aggregates, logs


def _task_runs(
    config: Config, ours: list[str], external: list[str], data_dir: Path | None
) -> list[TaskRun]:
    """The ``simple_evaluate`` calls: the project tasks together on their seeded subsets, then
    each other lm-eval task on its first ``limit`` items."""
    runs: list[TaskRun] = []
    if ours:
        samples = {}
        for bench in ours:
            size = len(bm.load_mc_set(bench, config.benchmark_paths.get(bench), data_dir))
            indices = bm.subset_indices(size, config.limit_for(bench), config.seed)
            samples[bm.LM_EVAL_TASKS[bench]] = indices
        runs.append(([bm.LM_EVAL_TASKS[b] for b in ours], {"samples": samples}))
    for bench in external:
        runs.append(([bench], {"limit": config.limit_for(bench)}))
    return runs


def _drop_hflm_weights(model: Any) -> None:
    model._model = None


def _item_result(sample: Mapping[str, Any], mc_metric: str) -> ItemResult:
    """One lm-eval sample as an item: right when its ``mc_metric`` is 1, with its gold
    log-probabilities; its id is the document's own when it has one."""
    doc = sample["doc"]
    item_id = (
        str(doc.get("id", sample["doc_id"])) if isinstance(doc, dict) else str(sample["doc_id"])
    )
    return ItemResult(item_id, _metric(sample, mc_metric) >= 1.0, **gold_logprobs(sample))


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


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and v != "N/A"}
