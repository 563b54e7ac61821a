"""Generation backends side by side on the same rewrite prompts, in one run: patchgap's batched
transformers decode, transformers' own ``generate_batch`` (paged cache, continuous batching),
vLLM's CPU build, and one record at a time.

    make setup    # the default venv, vLLM's CPU build included
    .venv/bin/python benchmarks/generation_backends.py [--records 16] [--new-tokens 160]
        [--repeats 3] [--keep DIR]   # --keep: each way's result is kept there; a rerun skips it

pi0 is SmolLM2-135M-Instruct in float32 on the CPU; the prompts are the rewriting prompt over
GSM8K train problems from the data directory; decoding is greedy. The real rewrite case carries
a LoRA adapter (rank 64 on every linear layer, the train-rewriter's default; small random B
matrices, so it changes the texts and keeps them fluent), so each backend is measured with it
where it applies, and vLLM also without it: the target's denominator is vLLM-CPU's raw speed.

Each way runs in a child process of its own, one after the other: vLLM binds its OpenMP threads
to the cores, which would slow a torch measured after it in the same process, and each engine
frees its memory on exit. vLLM gets both cores (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``). Engine
start (model load, KV cache, compile or warm-up) is timed apart from generation; then the same
prompts are generated ``--repeats`` times with the engine warm and tokens/s is new tokens over
the median generation seconds (a single pass of a few dozen seconds moved by up to 15% between
two vLLM engines that compute the same thing). Texts (of the first pass) are compared with
patchgap's batched decode of the same model (with the adapter, or without it for vLLM's raw row).

The last line is ``best_vs_vllm=<ratio>``: the fastest way patchgap offers on a CPU with the
adapter (its transformers decode, or vLLM-CPU with the adapter merged, as ``backend: auto``
does), over vLLM-CPU's tokens/s without an adapter, compiled, both cores. Target >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (key, what, adapter, offered by patchgap on a CPU)
WAYS = (
    ("ours", "patchgap transformers, batched (adapter merged)", True, True),
    ("ours_peft", "patchgap transformers, batched (PEFT adapter)", True, True),
    ("ours_raw", "patchgap transformers, batched, no adapter", False, False),
    ("one_at_a_time", "patchgap transformers, one record at a time", True, False),
    ("generate_batch", "transformers generate_batch (paged, sdpa), merged", True, False),
    ("vllm_raw", "vLLM-CPU, no adapter, compiled", False, False),
    ("vllm_raw_eager", "vLLM-CPU, no adapter, eager", False, False),
    ("vllm_merged", "vLLM-CPU, adapter merged, compiled", True, True),
    ("vllm_merged_eager", "vLLM-CPU, adapter merged, eager (auto on small work)", True, True),
    ("vllm_lora", "vLLM-CPU, enable_lora (LoRARequest), eager", True, False),
)


def _prompts(n: int) -> list[str]:
    from patchgap.lm.models import apply_chat, load_tokenizer, prepare_smollm2
    from patchgap.prompts import rewrite_messages
    from patchgap.settings import data_dir

    d = data_dir()
    if d is None or not (d / "gsm8k" / "train.jsonl").is_file():
        sys.exit("needs the data directory (gsm8k/train.jsonl): set PATCHGAP_DATA_DIR")
    with (d / "gsm8k" / "train.jsonl").open() as fh:
        rows = [json.loads(next(fh)) for _ in range(n)]
    tok = load_tokenizer(prepare_smollm2())
    return [apply_chat(tok, rewrite_messages(r["question"], r["answer"])) for r in rows]


def _adapter(folder: Path) -> Path:
    from patchgap.lm.models import prepare_smollm2
    from patchgap.lm.tiny import save_random_lora

    return save_random_lora(prepare_smollm2(), folder, r=64, alpha=32, b_std=0.002)


def _run_one(way: str, prompts: list[str], adapter: Path, new_tokens: int, repeats: int) -> dict:
    """One way, in this (child) process: start seconds, the median of ``repeats`` generation
    passes' seconds (each pass's too), the first pass's texts and tokens."""
    from patchgap.lm.generation import GenerationConfig, make_generator
    from patchgap.lm.models import prepare_smollm2

    model = prepare_smollm2()
    uses_adapter = next(w[2] for w in WAYS if w[0] == way)
    cfg = dict(device="cpu", dtype="float32", max_new_tokens=new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    if way.startswith("vllm"):
        gen_cfg = GenerationConfig(
            backend="vllm",
            merge_adapter=way != "vllm_lora",
            enforce_eager=way.endswith(("eager", "lora")),
            **cfg,
        )
        gen = make_generator(model, adapter if uses_adapter else None, gen_cfg)
    elif way == "generate_batch":
        return _generate_batch(model, adapter, prompts, new_tokens, repeats)
    else:
        gen_cfg = GenerationConfig(
            backend="transformers",
            batch_size=1 if way == "one_at_a_time" else len(prompts),
            merge_adapter=way != "ours_peft",
            **cfg,
        )
        gen = make_generator(model, adapter if uses_adapter else None, gen_cfg)
    start = time.perf_counter() - t0
    passes, outs = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = gen.generate(prompts)
        passes.append(time.perf_counter() - t0)
        outs = outs or got
    return {
        "start_s": start,
        "passes_s": passes,
        "seconds": statistics.median(passes),
        "tokens": sum(o[0].num_tokens for o in outs),
        "texts": [o[0].text for o in outs],
    }


def _generate_batch(
    model: Path, adapter: Path, prompts: list[str], new_tokens: int, repeats: int
) -> dict:
    import torch
    from transformers import GenerationConfig as HFGenerationConfig

    from patchgap.lm.models import load_tokenizer, save_merged

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        merged = save_merged(model, adapter, Path(tmp), dtype="float32")
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(
            str(merged), dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
    tok = load_tokenizer(model)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    hf_cfg = HFGenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )
    start = time.perf_counter() - t0
    passes, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        # No inference_mode: generate_batch decodes in a thread of its own, outside it.
        got = lm.generate_batch(inputs=ids, generation_config=hf_cfg)
        passes.append(time.perf_counter() - t0)
        out = out or got
    ordered = [out[k] for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]
    texts, tokens = [], 0
    for o in ordered:
        if o.error:
            raise RuntimeError(f"generate_batch: {o.request_id}: {o.error}")
        gen_ids = list(o.generated_tokens)
        tokens += len(gen_ids)
        texts.append(tok.decode(gen_ids, skip_special_tokens=True))
    return {
        "start_s": start,
        "passes_s": passes,
        "seconds": statistics.median(passes),
        "tokens": tokens,
        "texts": texts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--only", help=argparse.SUPPRESS)  # child mode: one way, JSON to --out
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="generation passes per way")
    ap.add_argument("--keep", type=Path, help="keep each way's result here; a rerun skips it")
    ap.add_argument("--skip", default="", help="comma-separated ways to leave out")
    args = ap.parse_args()
    prompts = _prompts(args.records)
    if args.only:
        result = _run_one(args.only, prompts, Path(args.adapter), args.new_tokens, args.repeats)
        Path(args.out).write_text(json.dumps(result))
        return
    from patchgap.lm.generation import vllm_build

    if vllm_build() != "cpu":
        sys.exit("needs vLLM's CPU build: make setup, then run with .venv/bin/python")
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        adapter = keep / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            adapter = _adapter(adapter)
        for key, what, _, _ in WAYS:
            if key in skip:
                continue
            out = keep / f"{key}-{args.records}x{args.new_tokens}-r{args.repeats}.json"
            if out.is_file():
                print(f"{what}: kept from {out}", file=sys.stderr)
                results[key] = json.loads(out.read_text())
                continue
            cmd = [sys.executable, __file__, "--only", key, "--adapter", str(adapter)]
            cmd += ["--out", str(out), "--records", str(args.records)]
            cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            print(f"running {what} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                sys.exit(f"{key} failed (exit {proc.returncode})")
            results[key] = json.loads(out.read_text())
    ref_adapter = results.get("ours", {}).get("texts")
    ref_raw = results.get("ours_raw", {}).get("texts")
    print(f"\n{args.records} GSM8K rewrite prompts, greedy, {args.new_tokens} new tokens, fp32,")
    print("SmolLM2-135M-Instruct on the CPU; identical = texts equal to patchgap's batched decode")
    print(f"generation s: the median of {args.repeats} passes with the engine warm")
    print(f"{'way':<56} {'start s':>8} {'gen s':>7} {'tokens':>7} {'tok/s':>7} {'identical':>9}")
    for key, what, uses_adapter, _ in WAYS:
        if key not in results:
            continue
        r = results[key]
        ref = ref_adapter if uses_adapter else ref_raw
        same = sum(a == b for a, b in zip(r["texts"], ref, strict=True)) if ref else None
        r["tok_s"] = r["tokens"] / r["seconds"]
        ident = f"{same}/{len(r['texts'])}" if same is not None else "-"
        print(
            f"{what:<56} {r['start_s']:>8.1f} {r['seconds']:>7.1f} {r['tokens']:>7d} "
            f"{r['tok_s']:>7.1f} {ident:>9}"
        )
    offered = [results[k]["tok_s"] for k, _, _, o in WAYS if o and k in results]
    if "vllm_raw" not in results or not offered:
        sys.exit("best_vs_vllm needs the vllm_raw row and at least one offered way")
    print(f"best_vs_vllm={max(offered) / results['vllm_raw']['tok_s']:.2f}")


if __name__ == "__main__":
    main()
