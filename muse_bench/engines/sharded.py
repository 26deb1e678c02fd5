"""An engine split over the launched processes: each runs a share, every one gets it all.

Under `accelerate launch` / `torchrun` every process holds the whole model. Without this
wrapper every process would evaluate every input; with it each process decodes or scores
a contiguous share of the inputs (`Processes.share`), and the shares are gathered back in
input order on every process. So every process then computes the same metrics from the
same outputs, and takes the same decisions from them (which epoch MUSE's model selection
keeps, whether training goes on), which keeps the processes in step.

Results equal the inner engine's on the whole list up to what batching changes: the inner
engine batches only its share, so the padding of a batch (and with it the float summation
order) can differ from one process's run, by float noise only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from muse_bench.core.distributed import Processes
from muse_bench.engines.base import Engine, TokenScores

T = TypeVar("T")


class ShardedEngine:
    """`inner` run on this process's share of every call's inputs; results for all inputs.

    Every process must make the same calls in the same order (each call gathers). A
    process whose share is empty (fewer inputs than processes) does not call `inner` at all,
    so engines need not accept an empty list. Only the main process shows progress bars.
    """

    def __init__(self, inner: Engine, processes: Processes | None = None) -> None:
        self.inner = inner
        self.processes = processes or Processes.current()

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def supports_stats(self) -> bool:
        return self.inner.supports_stats

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        desc: str | None = None,
    ) -> list[str]:
        """The inner engine's `generate` on this process's share, gathered for all prompts."""
        return self._sharded(
            prompts,
            lambda part, label: self.inner.generate(part, max_new_tokens, stop=stop, desc=label),
            desc,
        )

    def token_logprobs(
        self, texts: Sequence[str], with_stats: bool = False, *, desc: str | None = None
    ) -> list[TokenScores]:
        """The inner engine's `token_logprobs` on this process's share, gathered for all texts."""
        return self._sharded(
            texts,
            lambda part, label: self.inner.token_logprobs(part, with_stats, desc=label),
            desc,
        )

    def _sharded(
        self,
        items: Sequence[str],
        run: Callable[[list[str], str | None], list[T]],
        desc: str | None,
    ) -> list[T]:
        """`run` on this process's contiguous share; every share, concatenated in rank order
        (which is input order, since shares are contiguous and follow the ranks)."""
        items = list(items)
        start, stop = self.processes.share(len(items))
        label = desc if self.processes.is_main else None
        mine = run(items[start:stop], label) if stop > start else []
        return [out for share in self.processes.gather(mine) for out in share]


def shard(engine: Engine, processes: Processes | None = None) -> Engine:
    """`engine` itself in a single process, else wrapped in a `ShardedEngine`."""
    processes = processes or Processes.current()
    return engine if processes.world == 1 else ShardedEngine(engine, processes)
