"""Which removal requests a protocol makes, and in which order (SPEC §3, C5 and C6)."""

from __future__ import annotations

from muse_bench.core.errors import ConfigError
from muse_bench.core.registry import suggest
from muse_bench.core.types import PROTOCOLS, Corpus, ForgetRequest


def check_protocol(protocol: str, corpus: Corpus) -> str:
    """Reject unknown protocols, and scale/sustain on corpora without those folds."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'.{suggest(protocol, list(PROTOCOLS))}")
    if protocol in ("scale", "all") and not corpus.has_scale:
        raise ConfigError(
            f"corpus '{corpus.name}' has no scal/ folds (MUSE-Books has none); use --protocol single."
        )
    if protocol in ("sustain", "all") and not corpus.has_sustain:
        raise ConfigError(
            f"corpus '{corpus.name}' has no sust/ folds (MUSE-Books has none); use --protocol single."
        )
    return protocol


def single(corpus: Corpus) -> list[ForgetRequest]:
    """The main forget set, unlearned from the target; retain1 regularizes (MUSE)."""
    return [ForgetRequest("single", 1, corpus.forget, corpus.retain1, "target")]


def scale(corpus: Corpus) -> list[ForgetRequest]:
    """Each nested scal fold, each unlearned from the target."""
    return [
        ForgetRequest("scale", k, fold, corpus.retain1, "target")
        for k, fold in enumerate(corpus.scal, 1)
    ]


def sustain(corpus: Corpus) -> list[ForgetRequest]:
    """The disjoint sust folds in sequence, each starting from the previous output."""
    return [
        ForgetRequest("sustain", k, fold, corpus.retain1, "target" if k == 1 else "previous")
        for k, fold in enumerate(corpus.sust, 1)
    ]


def requests(protocol: str, corpus: Corpus) -> list[ForgetRequest]:
    """All requests of `protocol` ('all' = single, then scale, then sustain)."""
    check_protocol(protocol, corpus)
    plan = {
        "single": (single,),
        "scale": (scale,),
        "sustain": (sustain,),
        "all": (single, scale, sustain),
    }
    return [req for make in plan[protocol] for req in make(corpus)]
