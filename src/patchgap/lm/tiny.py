"""Tiny random Llama/Qwen2 causal LMs with a locally trained tokenizer and a chat template.

Tests need a real ``transformers`` model folder (config, safetensors weights, tokenizer, chat
template) that loads like any pi0 but builds in seconds with no hub access. The weights are
random, so generated text is gibberish; the tokenizer is real and encodes any text.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

ARCHS = ("llama", "qwen2")

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, IM_START, IM_END]

# ChatML-like, the format SmolLM2 and Qwen2 instruct models use, so prompts built for the tiny
# models look like the real ones. The turn ends with IM_END, which is also eos.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Words the judge and the answer code rely on; repeated in the corpus so BPE merges them into
# single tokens (with and without the leading space).
_MUST_MERGE = ("YES", "NO", " YES", " NO")

_CORPUS = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Natalia sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips. #### 72
Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting.
How much did she earn? She earned 12 / 60 * 50 = 10 dollars. #### 10
Betty is saving money for a new wallet which costs $100. She has half of the money she needs.
The answer is \\boxed{5}.
Therefore the final answer is \\boxed{\\frac{1}{2}}.
So the area of the triangle is \\boxed{12} square units.
The sum of the interior angles of a hexagon is \\boxed{720} degrees.
Let x be the number of apples. Then 3x + 4 = 19, so 3x = 15 and x = 5.
If a train travels 60 miles per hour for 3 hours, it travels 180 miles.
The probability of rolling a 6 on a fair die is 1/6.
A rectangle has length 8 and width 3, so its perimeter is 2(8 + 3) = 22.
We compute 17 * 23 = 391, then subtract 91 to get 300.
The square root of 144 is 12, because 12 * 12 = 144.
Solve for y: 2y - 7 = 9. Adding 7 gives 2y = 16, so y = 8.
What is the remainder when 100 is divided by 7? 100 = 7 * 14 + 2, so the remainder is 2.
The least common multiple of 4 and 6 is 12.
The greatest common divisor of 18 and 24 is 6.
There are 24 hours in a day and 7 days in a week, so 168 hours in a week.
A shirt costs $20 and is on sale for 25% off, so it costs $15.
Tom has 3 more marbles than Jerry. Together they have 17 marbles. Jerry has 7 marbles.
Step 1: read the problem carefully. Step 2: write the equation. Step 3: solve it.
Let me think step by step. First, we find the total. Then we divide by the number of people.
The function f(x) = x^2 + 2x + 1 equals (x + 1)^2.
The slope of the line through (1, 2) and (3, 8) is (8 - 2) / (3 - 1) = 3.
In the interval [0, 1], the function is increasing.
The set of solutions is {1, 2, 3}.
Is the rewritten answer still correct? YES
Is the rewritten answer still correct? NO
Does the response reach the same final answer? YES
Does the response reach the same final answer? NO
Answer YES or NO. YES
Answer YES or NO. NO
Judge: YES. Judge: NO. YES NO YES NO
You are a helpful assistant. Please reason step by step, and put your final answer in a box.
Sure! Here is the solution. We add the two numbers and then multiply by three.
The user asks a question and the assistant answers it clearly and correctly.
Rewrite the solution in your own words, keeping the final answer the same.
The quick brown fox jumps over the lazy dog.
Mathematics is the study of numbers, shapes, patterns and change.
An even number is divisible by 2; an odd number is not.
A prime number has exactly two divisors: 1 and itself. The first primes are 2, 3, 5, 7, 11, 13.
Percentages: 50% of 80 is 40, and 10% of 250 is 25.
Fractions: 3/4 + 1/4 = 1 and 2/3 - 1/6 = 1/2.
Decimals: 0.5 + 0.25 = 0.75, and 1.2 * 3 = 3.6.
Thousands: 1,000 + 2,500 = 3,500.
Negative numbers: -3 + 5 = 2 and -4 * -2 = 8.
Multiple choice: the correct option is (B). The answer is A, B, C or D.
"""


def corpus_lines(n_arith: int = 200) -> list[str]:
    """The training text: the hand-written lines above plus deterministic arithmetic drills."""
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    rng = random.Random(1234)  # fixed: the tokenizer must not depend on the model seed
    ops = ("+", "-", "*")
    for _ in range(n_arith):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice(ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        verdict = rng.choice(_MUST_MERGE)
        lines.append(f"Compute {a} {op} {b}. We get {a} {op} {b} = {value}, so \\boxed{{{value}}}.")
        lines.append(f"Is {a} {op} {b} = {value}?{verdict}")
    return lines


def train_tokenizer(vocab_size: int = 768) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :func:`corpus_lines`.

    Byte-level means any string encodes and decodes back exactly; digits are split one by one,
    as in Llama-style math tokenizers, so numbers round-trip digit by digit.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    for word in _MUST_MERGE:
        ids = fast.encode(word, add_special_tokens=False)
        if len(ids) != 1:  # the corpus guarantees this; fail loudly if someone edits it
            raise RuntimeError(f"tiny tokenizer splits {word!r} into {len(ids)} tokens")
    return fast


def _config(arch: str, vocab_size: int, tok: Any, **sizes: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        num_key_value_heads=sizes["num_kv_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common)


def build_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    vocab_size: int = 768,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM``/``Qwen2ForCausalLM`` folder to ``out_dir``.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and a
    fast tokenizer with bos/eos/pad and a ChatML chat template. The same ``seed`` gives the
    same weights; the tokenizer does not depend on the seed. Takes about a second on a CPU.

    >>> path = build_tiny_model(tmp_path / "tiny", "qwen2", seed=1)  # doctest: +SKIP
    >>> load_causal_lm(path)  # doctest: +SKIP
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; choose one of {', '.join(ARCHS)}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    tok = train_tokenizer(vocab_size)
    config = _config(
        arch,
        len(tok),
        tok,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )
    # Seed a private generator state, not the caller's global RNG beyond this block.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=16,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "patchgap_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "vocab_size": len(tok)}, indent=2) + "\n"
    )
    return out_dir


def save_random_lora(
    model_path: str | Path,
    out: str | Path,
    *,
    r: int = 8,
    alpha: int = 16,
    b_std: float | None = None,
    seed: int = 0,
) -> Path:
    """A LoRA adapter on every linear layer of ``model_path`` with random, non-zero B matrices,
    saved to ``out``: it changes what the model says, so tests and benchmarks exercise the
    adapter path for real. ``b_std`` (e.g. 0.002 on a real model) keeps the text fluent; None
    keeps PEFT's own random initialisation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_path)),
        LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False),
    )
    if b_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, b_std)
    model.save_pretrained(str(out))
    return Path(out)
