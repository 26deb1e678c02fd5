"""Load and save causal LMs and tokenizers safely (safetensors only unless allowed)."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import torch

from muse_bench.core.errors import ConfigError, ModelError


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars and info logs (ours are enough)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
#: A tokenizer directory holds at least one of these (fast, sentencepiece or BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def resolve_device(device: str | None) -> torch.device:
    """'auto' picks CUDA when present; asking for a GPU that is absent is a user error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device} was requested but no CUDA GPU is available; use --device cpu."
        )
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise ConfigError(
            f"--device {device} was requested but MPS is not available; use --device cpu."
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"'{device}' is not a device; use cpu, cuda, cuda:N or auto.") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on GPU (MUSE's recipe)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_checkpoint_dir(
    path: str | os.PathLike[str], allow_pickle: bool = False, need_tokenizer: bool = False
) -> Path:
    """Refuse paths that are missing, not a causal LM, or hold only pickle weights.

    Cheap (file names only, nothing is loaded or executed), so it runs before any work;
    `need_tokenizer` also asks for tokenizer files beside the weights.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model path '{p}' does not exist.")
    if not p.is_dir():
        raise ModelError(f"model path '{p}' is not a directory with config.json and weights.")
    if not (p / "config.json").is_file():
        raise ModelError(f"'{p}' has no config.json; it is not a Hugging Face model directory.")
    names = {f.name for f in p.iterdir()}
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n in PICKLE_WEIGHTS or n.endswith(".bin") for n in names)
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise ModelError(
                f"'{p}' holds only pickle weights, which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source."
            )
        if not has_pickle:
            raise ModelError(f"'{p}' has no model weights (*.safetensors).")
    if need_tokenizer and not any(n in names for n in TOKENIZER_FILES):
        raise ModelError(
            f"'{p}' has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); save the tokenizer "
            "beside the model (tokenizer.save_pretrained)."
        )
    return p


def _remote_code_error(p: Path, exc: Exception) -> ModelError | None:
    if "trust_remote_code" in str(exc):
        return ModelError(
            f"'{p}' needs its own Python code to load, which is not run by default; pass "
            "--trust-remote-code if you trust its source."
        )
    return None


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False):
    """Load a tokenizer; make sure it has BOS and a pad token (pad falls back to EOS)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        remote = _remote_code_error(Path(path), exc)
        if remote is not None:
            raise remote from exc
        raise ModelError(f"no usable tokenizer at '{path}': {str(exc).splitlines()[0]}") from exc
    if tok.bos_token_id is None:
        raise ModelError(
            f"the tokenizer at '{path}' has no BOS token; MUSE prompts start with BOS."
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Load a causal LM from a local directory (safetensors unless `allow_pickle`)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    p = check_checkpoint_dir(path, allow_pickle=allow_pickle)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype or default_dtype(dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        remote = _remote_code_error(p, exc)
        if remote is not None:
            raise remote from exc
        raise ModelError(f"'{p}' is not a loadable causal LM: {str(exc).splitlines()[0]}") from exc
    return model.to(dev).eval()


def load_model_and_tokenizer(
    path, device="cpu", dtype=None, allow_pickle=False, trust_remote_code=False
):
    """Load the model and the tokenizer saved beside it."""
    model = load_model(path, device, dtype, allow_pickle, trust_remote_code)
    return model, load_tokenizer(path, trust_remote_code)


def save_model(model, tokenizer, path: str | os.PathLike[str]) -> Path:
    """Save model (safetensors) and tokenizer into a fresh directory, atomically."""
    import shutil
    import tempfile

    quiet_transformers()
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def forward_parameters(model) -> set[str]:
    """The parameter names of `model.forward` (empty when they cannot be read)."""
    forward = getattr(model, "forward", model)
    try:
        return set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_keyword(model) -> str:
    """The name under which `model.forward` takes and returns its KV cache.

    transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated and
    announced for removal); older releases, which vLLM's pins may bring, and wrappers
    written for them use `past_key_values`. A pass-through wrapper that names neither
    (`forward(**kwargs)`) gets the name the installed transformers' causal LMs take.
    Callers pass and read the cache under this name.
    """
    params = forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return _installed_cache_keyword()


@functools.cache
def _installed_cache_keyword() -> str:
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in forward_parameters(LlamaForCausalLM) else "past_key_values"
