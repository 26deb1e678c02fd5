"""A Task: a loaded corpus plus where its target and retrain models are."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from muse_bench.core.errors import ConfigError, ModelError
from muse_bench.core.types import Corpus, ReferenceModels
from muse_bench.data import HUB_DATASETS, embedded_models_dir, load_corpus


@dataclass(frozen=True)
class Task:
    """What a run unlearns and is measured on."""

    corpus: Corpus
    models: ReferenceModels
    source: str


def resolve_task(
    corpus: str,
    source: str = "embedded",
    target: str | None = None,
    retrain: str | None = None,
    hub_source: str | None = None,
) -> Task:
    """Load the corpus and find its reference models (explicit paths win)."""
    loaded = load_corpus(corpus, source, hub_source=hub_source)
    if source == "embedded":
        root = embedded_models_dir(corpus)
        default = ReferenceModels(str(root / "target"), str(root / "retrain"))
    elif source == "hub":
        hub = HUB_DATASETS[corpus]
        default = ReferenceModels(hub.target, hub.retrain)
    else:
        default = None
    if default is None and (target is None or retrain is None):
        raise ConfigError(
            "a directory --source needs --target and --retrain model paths (Hugging Face directories)."
        )
    models = ReferenceModels(target or default.target, retrain or default.retrain)  # type: ignore[union-attr]
    return Task(loaded, models, source)


def local_model_dir(spec: str) -> Path:
    """A local directory for a model given as a path or a hub id (downloaded once, safetensors only)."""
    path = Path(spec)
    if path.exists():
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]
                )
            )
        except Exception as exc:  # offline, unknown repo, gated...
            raise ModelError(
                f"cannot fetch model '{spec}' from the hub: {str(exc).splitlines()[0]}"
            ) from None
    if "embedded" in str(path) or path.parent.name == "models":
        raise ModelError(
            f"reference model '{spec}' is missing; run `muse prepare --corpus <name> --rebuild` to build it."
        )
    raise ModelError(f"model path '{spec}' does not exist.")


def model_fingerprint(path: str | Path) -> str:
    """A short hash of a checkpoint directory's weights and config (cheap for 7B: head, tail, size)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.suffix not in (".safetensors", ".json", ".bin"):
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:12]
