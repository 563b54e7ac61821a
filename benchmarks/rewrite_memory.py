"""Peak memory of rewrite + gate over 10k and 100k synthetic records with a tiny model.

    .venv/bin/python benchmarks/rewrite_memory.py [--sizes 10000,100000]

Both stages stream: records are read, generated, gated and written a batch at a time, so the
peak RSS should not grow with the dataset (only a few numbers per record are kept: candidate
offsets, ids seen, NLLs and lengths for the report). Each size runs in a fresh child process
(rewrite, then gate, with a tiny random Llama, one new token per candidate, the judge off) and
reports its own peak RSS. The last line is ``rss_ratio=<peak at the largest / smallest size>``;
within 20% (<= 1.2) is the target.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_records(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            a, b = i % 97, i % 89
            row = {
                "id": f"s{i}",
                "question": f"Sam has {a} marbles and finds {b} more. How many marbles now?",
                "solution": f"Sam has {a} + {b} = {a + b} marbles.\n#### {a + b}",
                "answer": str(a + b),
                "meta": {},
            }
            fh.write(json.dumps(row) + "\n")


def child(n: int, work: Path, model: Path) -> dict[str, float]:
    import torch

    from patchgap.stages import gate, rewrite

    # One thread: on a shared CPU, OpenMP threads waiting on each other dominate small forwards.
    torch.set_num_threads(1)

    data = work / f"records-{n}.jsonl"
    write_records(data, n)
    t0 = time.perf_counter()
    rcfg = rewrite.Config(
        model=str(model),
        fields="records",
        template="{question}\n{solution}",
        generation={"max_new_tokens": 1, "batch_size": 256},
        batch_records=256,
        progress=False,
    )
    rm = rewrite.run(rcfg, {"dataset": data}, {"candidates": work / f"cands-{n}"})
    t1 = time.perf_counter()
    gcfg = gate.Config(
        model=str(model),
        fields="records",
        reward={"judge": False, "max_batch_tokens": 16384},
        batch_records=256,
        diversity_sample=200,
    )
    gm = gate.run(
        gcfg,
        {"dataset": data, "candidates": work / f"cands-{n}"},
        {"dataset_r": work / f"dr-{n}", "report": work / f"report-{n}"},
    )
    t2 = time.perf_counter()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "records": n,
        "rewrite_records": rm["records"],
        "d_r_records": gm["records"],
        "rewrite_s": t1 - t0,
        "gate_s": t2 - t1,
        "peak_rss_mib": peak_kib / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, Path(args.work), Path(args.model))))
        return 0

    from patchgap.lm.tiny import build_tiny_model

    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="patchgap-rewrite-mem-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "tiny", "llama", seed=0)
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--work", tmp, "--model", str(model)],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                print(out.stderr[-4000:], file=sys.stderr)
                return out.returncode
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'records':>10}{'D_R':>10}{'rewrite s':>12}{'gate s':>10}{'peak RSS MiB':>15}")
    for r in results:
        print(
            f"{r['records']:>10d}{int(r['d_r_records']):>10d}{r['rewrite_s']:>12.1f}"
            f"{r['gate_s']:>10.1f}{r['peak_rss_mib']:>15.1f}"
        )
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    print(f"rss_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
