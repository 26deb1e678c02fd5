"""Small frozen dataclasses that carry data between the stages of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PROTOCOLS = ("single", "scale", "sustain", "all")


@dataclass(frozen=True)
class QAPair:
    """One knowmem question and its exact answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class VerbMemPair:
    """A forget-set prefix (`prompt`) and its true continuation (`gt`)."""

    prompt: str
    gt: str


@dataclass(frozen=True)
class Corpus:
    """A whole MUSE-layout corpus, loaded and validated.

    `scal` and `sust` are empty tuples when the corpus has no such folders (MUSE-Books).
    """

    name: str
    benchmark_id: str
    data_dir: Path
    forget: tuple[str, ...]
    retain1: tuple[str, ...]
    retain2: tuple[str, ...]
    holdout: tuple[str, ...]
    verbmem_forget: tuple[VerbMemPair, ...]
    forget_qa: tuple[QAPair, ...]
    retain_qa: tuple[QAPair, ...]
    forget_qa_icl: tuple[QAPair, ...]
    retain_qa_icl: tuple[QAPair, ...]
    privleak_forget: tuple[str, ...]
    privleak_retain: tuple[str, ...]
    privleak_holdout: tuple[str, ...]
    scal: tuple[tuple[str, ...], ...] = ()
    sust: tuple[tuple[str, ...], ...] = ()

    @property
    def has_scale(self) -> bool:
        return bool(self.scal)

    @property
    def has_sustain(self) -> bool:
        return bool(self.sust)


@dataclass(frozen=True)
class RetrainAUC:
    """The retrained model's forget-vs-holdout AUC and where it came from."""

    auc: float
    attack: str
    provenance: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceModels:
    """Paths (or hub ids) of the target and retrain checkpoints for a benchmark."""

    target: str
    retrain: str


@dataclass(frozen=True)
class ForgetRequest:
    """One removal request: what to forget, what to retain, and where to start from.

    `start` is "target" (unlearn from the original model) or "previous" (from the
    output of the previous request, for sequential unlearning).
    """

    protocol: str
    index: int
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    start: str = "target"

    @property
    def label(self) -> str:
        return f"{self.protocol}_{self.index}"
