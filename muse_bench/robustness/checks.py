"""The robustness checks of `--robustness`: names, defaults, settings, and what each does
to a model and which items it scores (SPEC-robustness, "Harness decisions and contracts").

- `quant8`, `quant4`, `quant4_nf4`: round-to-nearest weight quantization
  (`muse_bench.robustness.quantize`), then the full evaluation.
- `relearn`: held-out relearning: fine-tune on the first half of the forget documents,
  score VerbMem_f and KnowMem_f only on the items of the other half (needs the
  item-to-document mapping, `muse_bench.robustness.mapping`).
- `relearn_all`: fine-tune on the whole forget corpus (Fan et al.), full evaluation.
- `relearn_retain`: the control: the same budget on retain text (`raw/retain1`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from muse_bench.core.errors import ConfigError, DataError
from muse_bench.core.registry import suggest
from muse_bench.core.types import Corpus
from muse_bench.robustness.mapping import NO_MAPPING, held_out_split, item_documents
from muse_bench.robustness.quantize import QUANT_SCHEMES, QuantScheme
from muse_bench.robustness.relearn import RelearnSettings

QUANT_CHECKS = tuple(QUANT_SCHEMES)
RELEARN_CHECKS = ("relearn", "relearn_all", "relearn_retain")
CHECKS = (*QUANT_CHECKS, *RELEARN_CHECKS)
#: The checks the spec proposes as `muse run`'s default on the embedded benchmarks.
RECOMMENDED_CHECKS = ("quant4", "relearn")
#: What `muse run` runs when --robustness is not given: none. The spec's rule keeps the
#: recommended checks on by default unless they more than double a run's wall time; on
#: embedded news they do (npo: about 2.0x, ga: 2.3x; docs/robustness.md), so they are
#: opt-in: `--robustness quant4,relearn`.
DEFAULT_CHECKS: tuple[str, ...] = ()

#: Relearning budgets. Embedded: lr 3e-4, the embedded default of the gradient
#: unlearners, fixed so the references do not depend on the unlearner; hub MUSE: lr 1e-5
#: and the smallest step budget of Fan et al. (News 100, Books 50).
EMBEDDED_RELEARN = {"steps": 25, "lr": 3e-4}
HUB_RELEARN = {"news": {"steps": 100, "lr": 1e-5}, "books": {"steps": 50, "lr": 1e-5}}
OTHER_RELEARN = {"steps": 100, "lr": 1e-5}


def parse_checks(spec: str | None, source: str = "embedded") -> tuple[str, ...]:
    """The checks `--robustness SPEC` names (comma-separated, or `none`); without SPEC,
    `DEFAULT_CHECKS` on the embedded benchmarks and none elsewhere (hub, directories)."""
    if spec is None:
        return DEFAULT_CHECKS if source == "embedded" else ()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["none"]:
        return ()
    if not names:
        raise ConfigError("--robustness needs a comma-separated list of checks, or 'none'.")
    for name in names:
        if name not in CHECKS:
            hint = suggest(name, [*CHECKS, "none"])
            raise ConfigError(
                f"unknown robustness check '{name}' (choose from {', '.join(CHECKS)} or "
                f"none).{hint}"
            )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Check:
    """One robustness check with its settings resolved for a benchmark."""

    name: str
    scheme: QuantScheme | None = None
    relearn: RelearnSettings | None = None

    @property
    def is_quant(self) -> bool:
        """Whether the check quantizes (else it relearns)."""
        return self.scheme is not None

    def settings(self) -> dict[str, Any]:
        """The settings as report fields."""
        if self.scheme is not None:
            return {"attack": "quantization", **self.scheme.settings()}
        data = {
            "relearn": "first half of the forget documents; scored on the other half",
            "relearn_all": "all forget documents",
            "relearn_retain": "retain documents (raw/retain1), as many steps as relearn_all",
        }[self.name]
        return {"attack": "relearning", "data": data, **self.relearn.to_dict()}  # type: ignore[union-attr]


def relearn_settings(source: str, corpus: str, seed: int) -> RelearnSettings:
    """The relearning budget for a benchmark (see `EMBEDDED_RELEARN`, `HUB_RELEARN`)."""
    if source == "embedded":
        base = EMBEDDED_RELEARN
    elif source == "hub":
        base = HUB_RELEARN.get(corpus, OTHER_RELEARN)
    else:
        base = OTHER_RELEARN
    return RelearnSettings(steps=base["steps"], lr=base["lr"], seed=seed)


def make_check(name: str, source: str, corpus: Corpus, seed: int) -> Check:
    """Resolve check `name` for a benchmark; ConfigError (one line) when it cannot run on
    this corpus (`relearn` without an item-to-document mapping)."""
    if name in QUANT_SCHEMES:
        return Check(name, scheme=QUANT_SCHEMES[name])
    if name not in RELEARN_CHECKS:
        parse_checks(name)  # raises the unknown-check error
    if name == "relearn":
        try:
            item_documents(corpus)
            held_out_split(len(corpus.forget))
        except DataError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(NO_MAPPING) else f"relearn: {msg}") from None
    return Check(name, relearn=relearn_settings(source, corpus.name, seed))


def held_out_corpus(corpus: Corpus) -> tuple[Corpus, dict[str, Any]]:
    """The corpus with only the verbmem and knowmem forget items of the held-out documents
    (the second half), and a description of the split."""
    mapping = item_documents(corpus)
    _, held = held_out_split(len(corpus.forget))
    verbmem = tuple(
        p for p, d in zip(corpus.verbmem_forget, mapping.verbmem, strict=True) if d in held
    )
    qa = tuple(q for q, d in zip(corpus.forget_qa, mapping.knowmem, strict=True) if d in held)
    if not verbmem or not qa:
        raise DataError("the held-out forget documents have no verbmem or knowmem items.")
    info = {
        "relearn_docs": [0, held.start],
        "held_out_docs": [held.start, held.stop],
        "verbmem_items": len(verbmem),
        "knowmem_items": len(qa),
        "mapping": mapping.source,
    }
    return dataclasses.replace(corpus, verbmem_forget=verbmem, forget_qa=qa), info


def scoring_corpus(check: Check, corpus: Corpus) -> tuple[Corpus, dict[str, Any] | None]:
    """The corpus a check's attacked model is evaluated on (held-out items for
    `relearn`, the whole corpus otherwise), with the split description."""
    if check.name == "relearn":
        return held_out_corpus(corpus)
    return corpus, None


def relearn_texts(check: Check, corpus: Corpus, tokenizer: Any, max_len: int) -> list[str]:
    """The documents a relearning check trains on."""
    from muse_bench.robustness.relearn import retain_like
    from muse_bench.training.packing import pack_texts

    if check.name == "relearn":
        relearned, _ = held_out_split(len(corpus.forget))
        return list(corpus.forget[: relearned.stop])
    if check.name == "relearn_all":
        return list(corpus.forget)
    n_forget = len(pack_texts(corpus.forget, tokenizer, max_len))
    return retain_like(corpus.retain1, tokenizer, max_len, n_forget, check.relearn.batch_size)  # type: ignore[union-attr]


def apply_check(
    check: Check, model, tokenizer, corpus: Corpus, device: str, progress: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Attack `model` in place (quantize or relearn); returns the attacked model and
    what was done."""
    if check.scheme is not None:
        from muse_bench.robustness.quantize import quantize_model

        return model, quantize_model(model, check.scheme).to_dict()
    from muse_bench.robustness.relearn import chunk_len, relearn

    texts = relearn_texts(check, corpus, tokenizer, chunk_len(model))
    model, info = relearn(model, tokenizer, texts, check.relearn, device, progress)  # type: ignore[arg-type]
    return model, {"docs": len(texts), **info}
