"""SFT calibration sweep: which learning rate and epochs make SFT on D both fit and forget.

    .venv/bin/python benchmarks/sft_sweep.py [--grid 2e-5:1,1e-4:1,2e-5:2,1e-4:2]
        [--items 40] [--heldout-items 60] [--drift-questions 24] [--json sweep.json]
        # --report-only sweep.json prints the table again

D is configs/repro-small.yaml's: the same seeded 128 GSM8K train records (``gsm8k:train``, limit
128, seed 1). Each grid point ``lr:epochs`` is a full fine-tune of SmolLM2-135M-Instruct on D with
repro-small's other SFT settings (batch 4 x 2 accumulation, cosine, 3% warm-up, 768 tokens), then
goes through the evaluate stage's own code on the same seeded items as the base model:

- downstream: NLL per token of held-out GSM8K test reference solutions (SFT's chat format);
- forgetting: P(gold | choices) on the general multiple-choice items, pooled over the benchmarks
  (points; lower = forgot), acc_norm beside it (0/1), and the drift from pi0 (NLL per token of
  pi0's own greedy answers to general questions; higher = moved away).

Each figure is the paired mean difference against the base model with a bootstrap CI and p.

The rule, fixed before the sweep ran: a setting qualifies when its held-out NLL falls (CI below
0) and it forgets significantly (P(gold | choices) falls with p < 0.05, or, failing that on every
setting, the drift rises with p < 0.05). Of the qualifying settings the one that forgets most
(largest fall in P(gold | choices), then the largest drift) is chosen for every SFT row of the
run (the rule and the paired figures live in ``patchgap.reports.sft_sweep``). The last line is
``chosen=<lr>:<epochs>`` (``chosen=none`` if nothing qualifies).

Every model and measurement is kept in ``--work``: a stopped sweep resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from forgetting_power import Clock, Steps, eval_setup, general_items  # noqa: E402

from patchgap.errors import ConfigError  # noqa: E402
from patchgap.reports.sft_sweep import choose, paired, parse_grid, tag, tag_plain  # noqa: E402


def stage_d(work: Path, records: int, seed: int) -> Path:
    """D as repro-small stages it: the seeded subset of GSM8K train, written as records."""
    from patchgap.data.sources import DatasetSpec
    from patchgap.data.stream import load_records
    from patchgap.data.writers import write_records_jsonl

    out = work / f"gsm8k-train-{records}-seed{seed}.jsonl"
    if not out.is_file():
        spec = DatasetSpec(source="gsm8k:train", limit=records, seed=seed)
        write_records_jsonl(load_records(spec).records, out)
    return out


def fine_tune(base: Path, d: Path, lr: float, epochs: float, work: Path) -> tuple[Path, float]:
    """SFT on D at ``lr`` for ``epochs`` (kept in ``work``); the model and its wall seconds."""
    from patchgap.stages import sft

    out = work / tag(lr, epochs)
    if (out / "config.json").is_file():
        return out, 0.0
    cfg = sft.Config(
        model=str(base),
        finetuning="full",
        learning_rate=lr,
        num_epochs=epochs,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        max_length=768,
        lr_scheduler="cosine",
        warmup_ratio=0.03,
        device="cpu",
        seed=0,
    )
    t0 = time.time()
    sft.run(cfg, {"dataset": d}, {"model": out, "metrics": work / f"{tag(lr, epochs)}-metrics"})
    return out, time.time() - t0


def measure(
    ev: Any, cfg: Any, path: Path, answers: list, heldout: dict, data_dir: Path, tasks: Path
) -> dict[str, Any]:
    """One model's per-item values: general items per benchmark, drift and held-out NLLs."""
    t0 = Clock()
    general, _ = general_items(ev, cfg, path, data_dir, tasks)
    nll = ev.continuous_eval(cfg, path, answers, heldout)
    return {"general": general, "nll": nll, "eval_wall_s": t0.since()[0]}


def report(data: dict[str, Any]) -> None:
    meta = data["meta"]
    print(
        f"\nSFT sweep on D ({meta['records']} GSM8K train records, seed {meta['data_seed']}); "
        f"{meta['items']} items x {len(meta['benchmarks'])} general benchmarks, "
        f"{meta['heldout_items']} held-out solutions, {meta['drift_questions']} drift questions"
    )
    head = (
        "| lr | epochs | SFT wall s | held-out NLL/tok | P(gold|choices) pts "
        "| acc_norm pts | drift NLL/tok |"
    )
    print(head)
    print("|" + "---|" * 7)

    def cell(d: dict[str, Any], digits: int) -> str:
        return (
            f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] "
            f"p={d['p_bootstrap']:.3f}"
        )

    for r in data["rows"]:
        d = r["diff"]
        print(
            f"| {r['lr']:g} | {r['epochs']:g} | {r['sft_wall_s']:.0f} "
            f"| {cell(d['heldout_nll_gsm8k'], 3)} | {cell(d['gold_choice_prob'], 2)} "
            f"| {cell(d['acc_norm'], 2)} | {cell(d['drift_nll'], 3)} |"
        )
    base = data["base_means"]
    print(
        f"base: held-out NLL {base['heldout_nll_gsm8k']:.3f}/tok, P(gold|choices) "
        f"{base['gold_choice_prob']:.2f} pts, acc_norm {base['acc_norm']:.2f} pts, drift NLL "
        f"{base['drift_nll']:.3f}/tok"
    )
    c = data.get("chosen")
    print(f"chosen={tag_plain(c) if c else 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="2e-5:1,1e-4:1,2e-5:2,1e-4:2", help="lr:epochs,...")
    p.add_argument("--records", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--items", type=int, default=40, help="items per general benchmark")
    p.add_argument("--benchmarks", default="arc_easy,piqa,hellaswag,mmlu")
    p.add_argument("--drift-questions", type=int, default=24)
    p.add_argument("--drift-tokens", type=int, default=128)
    p.add_argument("--heldout-items", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sft-sweep")
    p.add_argument("--json", type=Path, help="write every figure here too")
    p.add_argument("--report-only", type=Path, help="print the table of a saved --json run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:  # before any model loads: a bad grid is refused at once
        grid = parse_grid(args.grid)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    if args.report_only:
        report(json.loads(args.report_only.read_text()))
        return 0

    setup = eval_setup(args)
    if setup is None:
        return 2
    ev, data_dir, base, cfg, tasks = setup
    d = stage_d(args.work, args.records, args.data_seed)
    done = Steps(args.work / f"sweep-{args.items}-{args.heldout_items}-{args.seed}.json")

    answers = done.get("answers")
    if answers is None:
        answers = ev.pi0_answers(cfg, base, ev.drift_questions(cfg, data_dir))
        done.save(answers=answers)
    heldout = ev.heldout_items(cfg, data_dir)
    measured: dict[str, Any] = done.get("measured", {})
    if "base" not in measured:
        measured["base"] = measure(ev, cfg, base, answers, heldout, data_dir, tasks)
        done.save(measured=measured)

    rows = []
    for lr, epochs in grid:
        key = tag(lr, epochs)
        if key not in measured:
            model, wall = fine_tune(base, d, lr, epochs, args.work)
            print(f"{key}: SFT {wall:.0f} s")
            measured[key] = {
                **measure(ev, cfg, model, answers, heldout, data_dir, tasks),
                "sft_wall_s": wall,
            }
            done.save(measured=measured)
        rows.append(
            {
                "lr": lr,
                "epochs": epochs,
                "sft_wall_s": measured[key]["sft_wall_s"],
                "diff": paired(measured[key], measured["base"], args.seed),
            }
        )

    first = rows[0]["diff"] if rows else {}
    data = {
        "meta": {
            "records": args.records,
            "data_seed": args.data_seed,
            "items": args.items,
            "benchmarks": cfg.general,
            "heldout_items": len(heldout["gsm8k"]),
            "drift_questions": len(answers),
        },
        "base_means": {k: v["mean_b"] for k, v in first.items()},
        "rows": rows,
        "chosen": choose(rows),
    }
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    report(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
