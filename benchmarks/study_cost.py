"""GPU hours of a study config, from per-item token counts measured in a finished study run.

    .venv/bin/python benchmarks/study_cost.py --run .patchgap/runs/<id> \
        [--config configs/study-cluster.yaml] [--small-config configs/study-small.yaml] \
        [--log study.log] [--json cost.json]

Measured, not assumed:

- from the finished run (``--run``, a `study` pipeline's local work folder): the mean tokens of
  D's questions and references, of a rewrite candidate (rewrite summaries), of a GRPO rollout
  (the rewriter's metrics), the gates' acceptance (arms.json), the share of rewrites with a wrong
  final answer, and the length of pi0's drift answers (the evaluation's per-item files); with
  ``--log`` (the run's console output), each stage's wall seconds, which turn the run's own FLOPs
  into the rate this machine reached per stage;
- from the data directory, for the config priced (``--config``): its D's questions and
  references (for the cluster config, MATH train, the local stand-in its comment names), every
  evaluation set's items and tokens (each multiple-choice item one sequence per choice), with the
  tokenizer of the run's pi0;
- the priced model's shape from its config.json dimensions (Qwen2.5-7B for study-cluster).

The ratios measured on the small run (a rewrite's and a rollout's length over the reference's)
carry over to the priced config's references; everything the small run capped (rollouts and
rewrites at 256 new tokens, drift answers at 128) is flagged in the output. Assumed: the GPU's
peak and the utilisation per kind of work (``patchgap.study.cost.H100``, a range). The last line
is ``total_gpu_hours=<low>-<high>``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from patchgap.config import read_yaml  # noqa: E402
from patchgap.data.evalsets import (  # noqa: E402
    load_heldout_set,
    load_math_set,
    load_mc_set,
)
from patchgap.data.sources import DatasetSpec  # noqa: E402
from patchgap.data.stream import load_records  # noqa: E402
from patchgap.errors import ConfigError, DataError  # noqa: E402
from patchgap.lm.models import resolve_model  # noqa: E402
from patchgap.prompts import MATH_EVAL_TEMPLATE, REWRITE_TEMPLATE  # noqa: E402
from patchgap.reward.scoring import JUDGE_TEMPLATE  # noqa: E402
from patchgap.settings import data_dir  # noqa: E402
from patchgap.study import cost  # noqa: E402

#: Model names the script knows the shape of without downloading their config.
SHAPES = {"Qwen/Qwen2.5-7B-Instruct": cost.QWEN25_7B, "Qwen/Qwen2.5-7B": cost.QWEN25_7B}


def _mean(values: list[float], what: str) -> float:
    if not values:
        raise ConfigError(f"nothing measured for {what}")
    return statistics.fmean(values)


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise ConfigError(f"{root}: no {pattern} (is it a finished `study` run?)")
    return found[0]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _section(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    node: Any = raw
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


# ----------------------------------------------------------------------------- the run


def measure_run(run: Path, count) -> dict[str, Any]:  # noqa: ANN001 - count: str -> int
    """Per-item figures of a finished study run's local work folder."""
    root = _one(run / "pipeline-root", "patchgap-study-*")
    records = _jsonl(_one(root, "stage-dataset/dataset/*.jsonl"))
    q = _mean([count(r["question"]) for r in records], "D's questions")
    ref = _mean([count(r["solution"]) for r in records], "D's references")
    steps = _jsonl(_one(root, "train-rewriter/training/metrics.jsonl"))
    rollout = _mean([s["completion_length"] for s in steps if "completion_length" in s], "rollouts")
    clipped = _mean([s.get("clipped_completions", 0.0) for s in steps], "rollouts")
    generated = candidates = 0.0
    for summary in root.glob("for-loop-*/rewrite*/candidates/summary-*.json"):
        metrics = json.loads(summary.read_text())["metrics"]
        generated += metrics["generated_tokens"]
        candidates += metrics["candidates"]
    if not candidates:
        raise ConfigError(f"{root}: no rewrite summaries")
    answer_ok, cut = [], []
    for path in root.glob("for-loop-*/rewrite*/candidates/candidates-*.jsonl"):
        for row in _jsonl(path):
            for cand in row.get("candidates") or []:
                cut.append(1.0 if cand.get("finish_reason") == "length" else 0.0)
                if cand.get("sampling") == "greedy" and "answer_ok" in cand:
                    answer_ok.append(1.0 if cand["answer_ok"] else 0.0)
    arms = json.loads(_one(root, "build-arms/arms/arms.json").read_text())["arms"]
    acceptance = {
        key: arms[arm]["records"] / len(records)
        for key, arm in (("rl", "rw_rl"), ("prompt", "rw_prompt"))
        if arm in arms
    }
    drift = _jsonl(_one(root, "evaluate/report/items/base/drift_nll.jsonl"))
    return {
        "records": len(records),
        "question": q,
        "reference": ref,
        "rollout": rollout,
        "rollout_clipped": clipped,
        "candidate": generated / candidates,
        "candidates": candidates,
        "candidate_clipped": statistics.fmean(cut) if cut else None,
        "answer_failure": 1 - statistics.fmean(answer_ok) if answer_ok else None,
        "acceptance": acceptance,
        "drift_answer": _mean([row["tokens"] for row in drift], "drift answers"),
    }


_TASK = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (Executing task|Task) '([\w-]+)'(.*)$")


def stage_seconds(log: Path) -> dict[str, float]:
    """Wall seconds per stage from a local run's console output (KFP's task lines)."""
    started: dict[str, datetime] = {}
    out: dict[str, float] = {}
    last: datetime | None = None
    day = timedelta(0)
    for line in log.read_text(errors="replace").splitlines():
        match = _TASK.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%H:%M:%S.%f") + day
        if last is not None and stamp < last:
            day += timedelta(days=1)
            stamp += timedelta(days=1)
        last = stamp
        name = match.group(3)
        if match.group(2) == "Executing task":
            started[name] = stamp
        elif "finished" in match.group(4) and name in started:
            stage = re.sub(r"-\d+$", "", name)
            out[stage] = out.get(stage, 0.0) + (stamp - started.pop(name)).total_seconds()
    return out


# ----------------------------------------------------------------------------- a config


def plan_from_config(raw: dict[str, Any]) -> cost.Plan:
    """The sizes of a study config's work (the keys it sets, else the stages' defaults)."""
    tr = raw.get("train_rewriter") or {}
    rw = raw.get("rewrite") or {}
    study = raw.get("study") or {}
    ev = raw.get("evaluate") or {}
    generation = rw.get("generation") or {}
    reward = tr.get("reward") or {}
    if "max_steps" not in tr:
        raise ConfigError("train_rewriter.max_steps: the estimate needs the rewriter's steps")
    return cost.Plan(
        records=int(_section(raw, "run", "dataset", "limit")),
        rl_steps=int(tr["max_steps"]),
        prompts_per_step=int(tr.get("prompts_per_step", 1)),
        generations=int(tr.get("num_generations", 4)),
        max_completion=int(tr.get("max_completion_length", 512)),
        rewrite_max_new=int(generation.get("max_new_tokens", 512)),
        candidates=int(generation.get("n", 1)) + (1 if rw.get("include_greedy") else 0),
        max_retries=int(rw.get("max_retries", 0)),
        kl=float(tr.get("beta", 0.0)) > 0,
        judge=bool(reward.get("judge", True)) and reward.get("judge_kind") != "reasoning_check",
        arms=tuple(study.get("arms") or (*cost.FULL_ARMS, *cost.CONCENTRATED_ARMS)),
        seeds=len(study.get("seeds") or [0, 1, 2]),
        snapshots=len(study.get("snapshots") or [1.0]),
        epochs_full=float(_section(study, "epochs", "full", default=1)),
        epochs_concentrated=float(_section(study, "epochs", "concentrated", default=1)),
        drift_questions=int(_section(ev, "drift", "questions", default=64)),
        drift_max_new=int(_section(ev, "drift", "max_new_tokens", default=128)),
        math_max_new=int(_section(ev, "generation", "max_new_tokens", default=512)),
        checkpointing_rl=bool(tr.get("gradient_checkpointing", True)),
        checkpointing_sft=bool(_section(raw, "sft", "gradient_checkpointing", default=True)),
    )


def _template_tokens(template: str, count) -> float:  # noqa: ANN001
    return float(count(re.sub(r"\{[a-z_]+\}", "", template)))


def config_tokens(
    raw: dict[str, Any],
    run: dict[str, Any],
    count,  # noqa: ANN001 - str -> int
    data: Path | None,
) -> cost.Tokens:
    """Token counts of a config's data (D, evaluation sets) and the run's measured ratios."""
    spec = dict(_section(raw, "run", "dataset") or {})
    if str(spec.get("source", "")).startswith("hf://"):
        spec = {"source": "math_train", "limit": spec.get("limit"), "seed": spec.get("seed", 0)}
    records = load_records(DatasetSpec(**spec)).records
    ev = raw.get("evaluate") or {}
    limit = ev.get("limit")
    general: dict[str, tuple[int, float]] = {}
    pool: list[str] = []
    for name in ev.get("general") or []:
        items = load_mc_set(name, data_dir=data)
        if limit:
            items = items[:limit]
        lengths = [
            count(f"{it.passage or ''} {it.question} {opt}") for it in items for opt in it.options
        ]
        general[name] = (len(lengths), statistics.fmean(lengths))
        pool += [f"{it.passage or ''} {it.question}" for it in items[:200]]
    heldout_cfg = ev.get("heldout") or {}
    heldout: dict[str, tuple[int, float]] = {}
    for name in heldout_cfg.get("sets") or []:
        recs = load_heldout_set(name, data_dir=data)
        if heldout_cfg.get("limit"):
            recs = recs[: heldout_cfg["limit"]]
        heldout[name] = (len(recs), statistics.fmean(count(r.question + r.solution) for r in recs))
    # Generative math: a model's answer is taken as long as a rewrite of the set's reference
    # solution (the run's rewrite/reference ratio); sets without solutions use D's.
    math: dict[str, tuple[int, float, float]] = {}
    prompt_extra = _template_tokens(MATH_EVAL_TEMPLATE, count)
    ratio = run["candidate"] / run["reference"]
    d_reference = statistics.fmean(count(r.solution) for r in records)
    for entry in ev.get("math") or []:
        name = entry if isinstance(entry, str) else entry["name"]
        items = load_math_set(name, data)
        n = min(len(items), (ev.get("limits") or {}).get(name) or limit or len(items))
        try:
            solutions = [r.solution for r in load_heldout_set(name, data_dir=data)[:n]]
            reference = statistics.fmean(count(text) for text in solutions)
        except (ConfigError, DataError):
            reference = d_reference
        prompt = statistics.fmean(count(it.question) + prompt_extra for it in items[:n])
        math[name] = (n, prompt, reference * ratio)
    return cost.Tokens(
        question=statistics.fmean(count(r.question) for r in records),
        reference=d_reference,
        rewrite_prompt=_template_tokens(REWRITE_TEMPLATE, count),
        judge_prompt=_template_tokens(JUDGE_TEMPLATE, count),
        rewrite_ratio=ratio,
        rollout_ratio=run["rollout"] / run["reference"],
        answer_failure=run["answer_failure"] if run["answer_failure"] is not None else 0.5,
        acceptance=run["acceptance"],
        heldout=heldout,
        general=general,
        math=math,
        drift_question=statistics.fmean(count(t) for t in pool) if pool else 64.0,
        drift_answer=run["drift_answer"],
    )


def shape_of(raw: dict[str, Any]) -> cost.Shape:
    name = str(raw.get("model"))
    if name in SHAPES:
        return SHAPES[name]
    config = resolve_model(name) / "config.json"
    return cost.Shape.from_config(json.loads(config.read_text()))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished study's work folder")
    parser.add_argument("--config", type=Path, default=Path("configs/study-cluster.yaml"))
    parser.add_argument("--small-config", type=Path, default=Path("configs/study-small.yaml"))
    parser.add_argument("--log", type=Path, help="the run's console output (stage seconds)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    small = read_yaml(args.small_config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(str(small["model"])))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    run = measure_run(args.run, count)
    print(f"measured in {args.run}:")
    print(
        f"  D: {run['records']} records, question {run['question']:.0f} tokens, reference "
        f"{run['reference']:.0f}; a rewrite candidate {run['candidate']:.0f} new tokens "
        f"(x{run['candidate'] / run['reference']:.2f} the reference; "
        f"{100 * (run['candidate_clipped'] or 0):.0f}% cut at the limit); a GRPO rollout "
        f"{run['rollout']:.0f} (x{run['rollout'] / run['reference']:.2f}; "
        f"{100 * run['rollout_clipped']:.0f}% cut at the limit); pi0's drift answers "
        f"{run['drift_answer']:.0f} tokens"
    )
    failure = run["answer_failure"]
    print(
        "  acceptance: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in run["acceptance"].items())
        + (f"; greedy rewrites with a wrong answer {100 * failure:.0f}%" if failure is not None
           else "; greedy rewrites' answers not recorded (0.5 assumed)")
    )  # fmt: skip
    figures: dict[str, Any] = {"run": run, "rate": cost.H100.name}

    small_works = cost.study_works(
        plan_from_config(small), config_tokens(small, run, count, data_dir())
    )
    small_shape = shape_of(small)
    if args.log:
        seconds = stage_seconds(args.log)
        figures["stage_seconds"] = seconds
        print("\nthis machine, the run itself (FLOPs of its work / its measured wall seconds):")
        print(f"  {'stage':16} {'TFLOP':>8} {'seconds':>8} {'GFLOP/s':>8}")
        flops: dict[str, float] = {}
        for work in small_works:
            flops[work.stage] = flops.get(work.stage, 0.0) + work.flops(small_shape)
        for stage, value in flops.items():
            secs = seconds.get(stage)
            rate = f"{value / secs / 1e9:8.1f}" if secs else "       -"
            print(f"  {stage:16} {value / 1e12:8.2f} {secs or 0:8.0f} {rate}")

    raw = read_yaml(args.config)
    plan = plan_from_config(raw)
    tokens = config_tokens(raw, run, count, data_dir())
    shape = shape_of(raw)
    works = cost.study_works(plan, tokens)
    hours = cost.total_hours(works, shape, cost.H100)
    print(
        f"\n{args.config} on {cost.H100.name}, {raw.get('model')} "
        f"({shape.matmul_params / 1e9:.2f}e9 matmul weights):"
    )
    rewrite = min(tokens.rewrite_ratio * tokens.reference, plan.rewrite_max_new)
    rollout = min(tokens.rollout_ratio * tokens.reference, plan.max_completion)
    print(
        f"  D {plan.records} records: question {tokens.question:.0f} tokens, reference "
        f"{tokens.reference:.0f}; a rewrite {rewrite:.0f}, a rollout {rollout:.0f}"
    )
    print(f"  {'stage':16} {'work':44} {'Gtokens':>8} {'PFLOP':>9} {'GPU-h':>13}")
    rows = []
    for work in works:
        low, high = cost.H100.hours(work, shape)
        rows.append(
            {"stage": work.stage, "what": work.what, "kind": work.kind, "tokens": work.tokens,
             "flops": work.flops(shape), "hours": [low, high]}
        )  # fmt: skip
        print(
            f"  {work.stage:16} {work.what[:44]:44} {work.tokens / 1e9:8.3f} "
            f"{work.flops(shape) / 1e15:9.1f} {low:6.1f}-{high:<6.1f}"
        )
    print()
    for stage, (low, high) in hours.items():
        if stage != "total":
            print(f"  {stage:16} {low:7.1f} - {high:7.1f} GPU-h")
    figures.update({"config": str(args.config), "works": rows, "hours": hours})
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    low, high = hours["total"]
    print(f"total_gpu_hours={low:.0f}-{high:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
