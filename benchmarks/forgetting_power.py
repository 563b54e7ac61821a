"""Forgetting metrics' power: cost per item of each metric and the items a paired comparison needs.

    .venv/bin/python benchmarks/forgetting_power.py [--items 80] [--perturb sft|noise]
        [--benchmarks arc_easy,piqa,hellaswag,mmlu] [--drift-questions 32] [--heldout-items 60]
        [--json run.json]          # then: --report-only run.json prints the tables again

pi0 is SmolLM2-135M-Instruct; the perturbed model is SmolLM2 after a few SFT steps on GSM8K train
(``--perturb sft``: configs/repro-small.yaml's SFT, 16 steps of 8 records at lr 2e-5, unless
told otherwise) or a copy with Gaussian noise on its weights (``--perturb noise``). Both models
go through the evaluate stage's own code on the same seeded items:

- general multiple choice through lm-eval: one pass gives acc, acc_norm, the gold choice's
  log-probability (raw and per character) and its probability among the choices (P(gold |
  choices), the accuracy of a model that answers by sampling: a soft accuracy, in points);
- drift: pi0's greedy answers to general questions (generated once), NLL under each model;
- held-out: NLL of GSM8K test reference solutions in SFT's chat format;
- GSM8K accuracy by generation, a few items, for its cost only.

It prints, per benchmark and metric, the mean paired difference (perturbed - base), the SD of the
per-item differences, and the items a paired test needs (two-sided alpha 0.05, power 0.8),
``n = ((1.96 + 0.84) * SD / delta)^2``, for ``delta`` = the difference this perturbation made,
12.34% of it (the paper's forgetting reduction) and one point (acc, acc_norm, P(gold | choices):
one percentage point, with the SD of a 0/1 metric at least what one point of flips implies;
log-probabilities 0.01 nats per item, NLLs 0.01 nats per token). Then the wall and CPU seconds
per item of every metric, and per benchmark the items and CPU time one point of accuracy and one
point of soft accuracy cost. The last line is
``ratio=<items for one point of accuracy / items for one point of P(gold | choices)>``, the
median over benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


#: Per-item values of a general benchmark: accuracies, the gold choice's log-probability (raw
#: and per character) and its probability among the choices (soft accuracy, in points).
LP_METRICS = ("acc", "acc_norm", "gold_choice_prob", "gold_logprob", "gold_logprob_norm")


def perturbed_model(base: Path, args: argparse.Namespace, work: Path, data_dir: Path) -> Path:
    """The perturbed copy of pi0 (kept in ``work`` so a rerun reuses it) and its build time."""
    tag = (
        f"sft-{args.sft_steps}x{args.sft_batch}-lr{args.sft_lr:g}"
        if args.perturb == "sft"
        else f"noise-{args.noise:g}"
    )
    out = work / tag
    if (out / "config.json").is_file():
        print(f"perturbed model: {out} (reused)")
        return out
    t0 = time.time()
    if args.perturb == "sft":
        from patchgap.stages import sft

        cfg = sft.Config(
            model=str(base),
            limit=args.sft_steps * args.sft_batch,
            max_steps=args.sft_steps,
            per_device_batch_size=args.sft_batch,
            learning_rate=args.sft_lr,
            device="cpu",
            seed=1,
        )
        sft.run(
            cfg,
            {"dataset": data_dir / "gsm8k" / "train.jsonl"},
            {"model": out, "metrics": work / f"{tag}-metrics"},
        )
    else:
        import shutil

        import torch
        from safetensors.torch import load_file, save_file

        shutil.copytree(base, out)
        for f in out.glob("*.safetensors"):
            tensors = load_file(f)
            gen = torch.Generator().manual_seed(0)
            for k, t in tensors.items():
                if t.dim() == 2 and t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                    tensors[k] = (t.float() + args.noise * t.float().std() * noise).to(t.dtype)
            save_file(tensors, f, metadata={"format": "pt"})
    print(f"perturbed model: {out} ({time.time() - t0:.0f} s to build)")
    return out


class Steps:
    """The measured steps of a run, kept in a JSON file as each finishes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if self.data:
            print(f"resuming from {path}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def save(self, **values: Any) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


class Clock:
    """Wall and CPU seconds (this process, all threads) since creation: on a shared machine the
    wall time is mostly waiting for cores; the CPU time is the work."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.time(), time.process_time()

    def since(self, n: int = 1) -> tuple[float, float]:
        return ((time.time() - self.wall) / n, (time.process_time() - self.cpu) / n)


def general_items(ev: Any, cfg: Any, path: Path, data_dir: Path, tasks: Path) -> tuple[dict, dict]:
    """Per benchmark: item id -> {acc, acc_norm, gold_logprob, gold_logprob_norm}, and the
    (wall, CPU) seconds each benchmark took (one lm-eval pass per benchmark, model load
    included)."""
    values: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, tuple[float, float]] = {}
    for bench in cfg.general:
        sub = cfg.model_copy(update={"general": [bench]})
        t0 = Clock()
        items, _, logs = ev.lm_eval_general(sub, path, data_dir, tasks)
        seconds[bench] = t0.since()
        by_id = {r.id: r for r in items[bench]}
        values[bench] = {}
        for s in logs[bench]:
            rid = str(s["id"] if s["id"] is not None else s["doc_id"])
            r = by_id[rid]
            values[bench][rid] = {
                "acc": float(s["acc"]),
                "acc_norm": float(s["acc_norm"]),
                "gold_logprob": r.gold_logprob,
                "gold_logprob_norm": r.gold_logprob_norm,
                "gold_choice_prob": (
                    None if r.gold_choice_logprob is None else math.exp(r.gold_choice_logprob)
                ),
            }
    return values, seconds


def eval_setup(
    args: argparse.Namespace, **generation: Any
) -> tuple[Any, Path, Path, Any, Path] | None:
    """What every measurement script needs from the command line: the evaluate module, the data
    directory, pi0, the evaluate stage's Config (benchmarks, items, seed, drift and held-out
    sizes from ``args``; ``generation`` settings beside device and backend) and rendered lm-eval
    tasks; None (after saying why) without a data directory."""
    from patchgap.data.evalsets import render_lm_eval_tasks
    from patchgap.lm.models import prepare_smollm2
    from patchgap.settings import data_dir as default_data_dir
    from patchgap.stages import evaluate as ev

    data_dir = default_data_dir()
    if data_dir is None:
        print("no data directory: set PATCHGAP_DATA_DIR to a folder laid out like shared/data")
        return None
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = ev.Config(
        general=args.benchmarks.split(","),
        limit=args.items,
        seed=args.seed,
        mc_metric=getattr(args, "mc_metric", "acc_norm"),
        generation={"device": "cpu", "backend": "transformers", **generation},
        drift={"questions": args.drift_questions, "max_new_tokens": args.drift_tokens},
        heldout={"limit": args.heldout_items},
        data_dir=str(data_dir),
    )
    tasks = render_lm_eval_tasks(args.work / "tasks", data_dir)
    return ev, data_dir, prepare_smollm2(), cfg, tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=60, help="items per general benchmark")
    p.add_argument("--benchmarks", default="arc_easy,piqa,hellaswag,mmlu")
    p.add_argument("--mc-metric", choices=("acc", "acc_norm"), default="acc_norm")
    p.add_argument("--drift-questions", type=int, default=24)
    p.add_argument("--drift-tokens", type=int, default=128)
    p.add_argument("--heldout-items", type=int, default=40)
    p.add_argument("--gsm8k-items", type=int, default=4, help="GSM8K generations, for cost only")
    p.add_argument("--gsm8k-tokens", type=int, default=200)
    p.add_argument("--perturb", choices=("sft", "noise"), default="sft")
    p.add_argument("--sft-steps", type=int, default=16)
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=2e-5)
    p.add_argument("--noise", type=float, default=0.05, help="noise SD / weight SD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "forgetting-power")
    p.add_argument("--json", type=Path, help="write every figure here too")
    p.add_argument("--report-only", type=Path, help="print the tables of a saved --json run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.report_only:
        report(json.loads(args.report_only.read_text()))
        return 0

    from patchgap.reports.stats import paired_mean_diff

    setup = eval_setup(args, max_new_tokens=args.gsm8k_tokens)
    if setup is None:
        return 2
    ev, data_dir, base, cfg, tasks = setup
    perturbed = perturbed_model(base, args, args.work, data_dir)
    models = {"base": base, "perturbed": perturbed}
    # Every measured step is kept in a file: a run stopped halfway resumes where it was.
    done = Steps(args.work / f"steps-{perturbed.name}-{args.items}-{args.seed}.json")
    # metric -> model -> (wall, CPU) seconds per item
    cost: dict[str, dict[str, tuple[float, float]]] = done.get("cost", {})

    general: dict[str, dict] = done.get("general", {})
    for label, path in models.items():
        for bench in cfg.general:
            if bench in general.get(label, {}):
                continue
            sub = cfg.model_copy(update={"general": [bench]})
            got, secs = general_items(ev, sub, path, data_dir, tasks)
            general.setdefault(label, {})[bench] = got[bench]
            wall, cpu = secs[bench]
            n = len(got[bench])
            cost.setdefault(f"lm-eval {bench}", {})[label] = (wall / n, cpu / n)
            done.save(general=general, cost=cost)

    questions = ev.drift_questions(cfg, data_dir)
    answers = done.get("answers")
    if answers is None or len(answers) != len(questions):
        t0 = Clock()
        answers = ev.pi0_answers(cfg, base, questions)
        cost["drift: pi0 answers (once)"] = {"base": t0.since(len(answers))}
        done.save(answers=answers, cost=cost)
    heldout = ev.heldout_items(cfg, data_dir)
    nll: dict[str, dict[str, list[dict]]] = done.get("nll", {})
    for label, path in models.items():
        if "drift_nll" not in nll.get(label, {}):
            t0 = Clock()
            nll.setdefault(label, {}).update(ev.continuous_eval(cfg, path, answers, {}))
            cost.setdefault("drift: NLL of pi0's answers", {})[label] = t0.since(len(answers))
            done.save(nll=nll, cost=cost)
        if "heldout_nll_gsm8k" not in nll[label]:
            t0 = Clock()
            nll[label].update(ev.continuous_eval(cfg, path, [], heldout))
            cost.setdefault("held-out NLL gsm8k", {})[label] = t0.since(len(heldout["gsm8k"]))
            done.save(nll=nll, cost=cost)
    if args.gsm8k_items and "gsm8k accuracy (generation)" not in cost:
        from patchgap.data.evalsets import load_math_set, take_subset

        math = {"gsm8k": take_subset(load_math_set("gsm8k", data_dir), args.gsm8k_items)}
        t0 = Clock()
        ev.generative_eval(cfg, base, math, {})
        cost["gsm8k accuracy (generation)"] = {"base": t0.since(args.gsm8k_items)}
        done.save(cost=cost)

    # ------------------------------------------------------------------ paired differences
    rows: list[dict[str, Any]] = []
    for bench in cfg.general:
        b, q = general["base"][bench], general["perturbed"][bench]
        ids = [i for i in b if i in q]
        for metric in LP_METRICS:
            pairs = [(q[i][metric], b[i][metric]) for i in ids if b[i][metric] is not None]
            test = paired_mean_diff([x for x, _ in pairs], [y for _, y in pairs], 2000, args.seed)
            rows.append({"benchmark": bench, "metric": metric, **test.as_dict()})
    for label, metric in (("drift", "drift_nll"), ("held-out gsm8k", "heldout_nll_gsm8k")):
        b = {r["id"]: r["nll"] for r in nll["base"][metric] if r["nll"] is not None}
        q = {r["id"]: r["nll"] for r in nll["perturbed"][metric] if r["nll"] is not None}
        ids = [i for i in b if i in q]
        test = paired_mean_diff([q[i] for i in ids], [b[i] for i in ids], 2000, args.seed)
        rows.append({"benchmark": label, "metric": "nll/token", **test.as_dict()})

    meta = {
        "perturbed": perturbed.name,
        "items": args.items,
        "headline": args.mc_metric,
        "drift_questions": len(answers),
        "heldout_items": len(heldout["gsm8k"]),
        "cores": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 1),
    }
    data = {"meta": meta, "rows": rows, "cost": cost}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    report(data)
    return 0


#: The paper's headline: SFT on D_R forgets 12.34% less than SFT on D.
PAPER_REDUCTION = 0.1234


def sizes(row: dict[str, Any]) -> dict[str, int | None]:
    """Items a paired test needs (alpha 0.05 two-sided, power 0.8) to resolve: the difference
    this perturbation made; 12.34% of it (D_R against D at the paper's reduction, taking the SD
    of D_R - D to be the SD of D - base); one point, 0.01 in the metric's unit (accuracy and
    P(gold | choices): one percentage point; log-probabilities and NLLs: 0.01 nats). A 0/1 metric
    cannot move by one point unless at least 1% of items flip, so its SD is at least
    sqrt(0.01 * 0.99) there, whatever few flips a mild perturbation showed."""
    from patchgap.reports.stats import required_n

    sd, diff = float(row["sd_diff"]), float(row["diff"])
    point_sd = max(sd, (0.01 * 0.99) ** 0.5) if row["metric"] in ("acc", "acc_norm") else sd
    return {
        "this": required_n(sd, diff),
        "paper": required_n(sd, PAPER_REDUCTION * diff),
        "point": required_n(point_sd, 0.01),
    }


def report(data: dict[str, Any]) -> None:
    """Print the tables of a measured run (also from its saved JSON: --report-only)."""
    meta, rows, cost = data["meta"], data["rows"], data["cost"]
    headline = meta["headline"]
    print(
        f"\nbase: SmolLM2-135M-Instruct; perturbed: {meta['perturbed']}; {meta['items']} items "
        f"per benchmark; {meta['drift_questions']} drift questions; {meta['heldout_items']} "
        f"held-out GSM8K solutions; {meta['cores']} CPU cores at a load average of "
        f"{meta['load_average']} (other work shared them)\n"
    )
    print(
        "n: items a paired test needs (alpha 0.05, power 0.8) for the difference this model "
        "made, for 12.34% of it\n(the paper's reduction), and for one point (acc, acc_norm, "
        "P(gold | choices): 1 percentage point;\nlog-probabilities: 0.01 nats per item; NLLs: "
        "0.01 nats per token)\n"
    )
    head = f"{'benchmark':<16}{'metric':<21}{'n':>4}{'mean delta':>12}{'SD delta':>10}{'p':>7}"
    head += f"{'n: this':>10}{'n: 12.34%':>12}{'n: 1 point':>12}"
    print(head)
    for r in rows:
        n = sizes(r)
        print(
            f"{r['benchmark']:<16}{r['metric']:<21}{r['n']:>4}{r['diff']:>+12.4f}"
            f"{r['sd_diff']:>10.4f}{r['p_bootstrap']:>7.3f}"
            f"{_n(n['this']):>10}{_n(n['paper']):>12}{_n(n['point']):>12}"
        )
    models = ("base", "perturbed")
    print(f"\n{'seconds per item (wall / CPU)':<34}{'base':>16}{'perturbed':>16}")
    for name, per in cost.items():
        cells = [f"{per[m][0]:.2f} / {per[m][1]:.2f}" if m in per else "-" for m in models]
        print(f"{name:<34}{cells[0]:>16}{cells[1]:>16}")
    print(
        "\n(lm-eval: one pass gives acc, acc_norm and every log P(gold) form; its model load is "
        "spread over the items)"
    )
    print(f"\nitems per benchmark and CPU time per model for one point of {headline}:")
    ratios = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows if r["metric"] == headline):
        s = cost[f"lm-eval {bench}"]["base"][1]
        by = {r["metric"]: r for r in rows if r["benchmark"] == bench}
        n_acc, n_soft = sizes(by[headline])["point"], sizes(by["gold_choice_prob"])["point"]
        n_lp = sizes(by["gold_logprob"])["this"]
        print(
            f"  {bench:<11}{headline}: {_n(n_acc):>6} items ({n_acc * s / 60:4.0f} CPU-min)   "
            f"P(gold | choices): {_n(n_soft):>5} items ({n_soft * s / 60:4.1f} CPU-min)   "
            f"log P(gold) sees this model with {_n(n_lp)}"
        )
        if n_acc and n_soft:
            ratios.append(n_acc / n_soft)
    # How many times the items for one point of accuracy are those for one point of soft accuracy.
    ratios.sort()
    print(f"ratio={ratios[len(ratios) // 2]:.1f}" if ratios else "ratio=n/a")


def _n(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


if __name__ == "__main__":
    raise SystemExit(main())
