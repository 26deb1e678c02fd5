"""The narrow, batched model interface that every metric goes through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from muse_bench.core.errors import ConfigError
from muse_bench.core.registry import Registry

T_co = TypeVar("T_co", covariant=True)

#: Keyword arguments used whenever token ids are turned back into text (generations and
#: truncated ground truths alike), so both sides of a ROUGE comparison are decoded the
#: same way. MUSE also passes clean_up_tokenization_spaces=True; transformers 5 ignores it
#: for BPE tokenizers, so the tokenizer's own setting applies.
DECODE_KWARGS: dict[str, Any] = {"skip_special_tokens": True}


@dataclass(frozen=True)
class TokenScores:
    """Per-token scores of one text under a model.

    `logprobs[i]` is log p(x_{i+1} | x_{<=i}) for every token after BOS. With stats,
    `mean[i]` and `std[i]` are the mean and standard deviation of log p(z) for z drawn from
    the model's own next-token distribution at that position (Min-K%++'s mu and sigma).
    """

    logprobs: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        """Number of scored tokens (the text's length without BOS)."""
        return int(self.logprobs.shape[0])

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token (NaN for a text with no tokens)."""
        return float(-self.logprobs.mean()) if self.n_tokens else float("nan")

    @property
    def has_stats(self) -> bool:
        """Whether `mean` and `std` are present."""
        return self.mean is not None and self.std is not None


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's special tokens (BOS for Llama)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]]


def fit_prompt(
    ids: list[int], bos_id: int | None, max_length: int | None, max_new_tokens: int
) -> list[int]:
    """Shorten a prompt so that it and `max_new_tokens` fit in `max_length` positions.

    A prompt that is too long keeps its BOS and its last tokens, the text nearest to the
    continuation.
    """
    if max_length is None:
        return ids
    budget = max_length - max_new_tokens
    if budget < 2:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a model "
            f"with {max_length} positions."
        )
    if len(ids) <= budget:
        return ids
    if ids and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - budget + 1 :]
    return ids[len(ids) - budget :]


def stop_settled(text: str, stops: Sequence[str]) -> bool:
    """Whether `text` holds a stop string that no continuation can move.

    True when some stop string occurs in `text` and no other stop string could still
    complete at an earlier start: every later token only appends, so the earliest stop
    position (what the text is cut at) is then final.
    """
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not found:
        return False
    first = min(found)
    for s in stops:
        # a stop that starts before `first` and is still incomplete would end with text
        for start in range(max(0, len(text) - len(s) + 1), first):
            if s.startswith(text[start:]):
                return False
    return True


@runtime_checkable
class Engine(Protocol):
    """What metrics need from a model: greedy continuations and per-token log-probs.

    Implementations own batching, padding, devices and truncation; callers pass plain
    strings and get results back in input order.
    """

    #: The tokenizer that defines the model's tokens (also used to truncate ground truths).
    tokenizer: Any
    #: Whether `token_logprobs(..., with_stats=True)` is available (Min-K%++ needs it).
    supports_stats: bool

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        desc: str | None = None,
    ) -> list[str]:
        """Greedy-decode up to `max_new_tokens` after each prompt (encoded with BOS).

        Returns only the decoded new text of each prompt, stopped at EOS. With `stop`, an
        engine may end a prompt's decoding early once `stop_settled` says the text before
        the earliest stop string can no longer change; callers that pass `stop` must only
        use that text (the rest may be shorter than without `stop`). `desc`, when given,
        labels a progress bar.
        """
        ...

    def token_logprobs(
        self, texts: Sequence[str], with_stats: bool = False, *, desc: str | None = None
    ) -> list[TokenScores]:
        """Score every token after BOS of each text (encoded with BOS)."""
        ...


class Pending(Protocol[T_co]):
    """A result that may still be computing; `result()` waits for it."""

    def result(self) -> T_co: ...


class Ready(Generic[T_co]):
    """A result that is already there (what engines that score at once return)."""

    def __init__(self, value: T_co) -> None:
        self._value = value

    def result(self) -> T_co:
        return self._value


def submit_token_logprobs(
    engine: Engine, texts: Sequence[str], with_stats: bool = False, *, desc: str | None = None
) -> Pending[list[TokenScores]]:
    """Start `engine.token_logprobs(texts, with_stats)`; collect it with `.result()`.

    Engines that can score in the background (`submit_token_logprobs`, as the hf engine on
    CPU) do so while the caller goes on, without a progress bar; any other engine scores
    now, with `desc` labelling its bar.
    """
    submit = getattr(engine, "submit_token_logprobs", None)
    if submit is not None:
        return submit(texts, with_stats, desc=desc)
    return Ready(engine.token_logprobs(texts, with_stats, desc=desc))


ENGINES: Registry[Any] = Registry("engine", entry_point_group="muse_bench.engines")


def make_engine(
    name: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    max_length: int | None = None,
) -> Engine:
    """Build the engine registered as `name` ("hf", "vllm", or a plugin).

    Either pass an in-memory `model` and `tokenizer` (hf only) or a `model_path`
    directory holding both. `max_length` caps the tokens per sequence (default: the
    model's maximum number of positions).
    """
    cls = ENGINES.get(name)
    return cls(
        model=model,
        tokenizer=tokenizer,
        model_path=model_path,
        device=device,
        batch_size=batch_size,
        max_length=max_length,
    )
