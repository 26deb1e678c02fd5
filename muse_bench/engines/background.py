"""Scoring on a background thread while the calling thread generates (CPU engines).

On a CPU, greedy decoding of a small model is bound by per-step overhead and by streaming
the weights, not by arithmetic: the embedded target decodes the verbmem prompts about as
fast on one thread as on two. Scoring (the privleak forward passes) is arithmetic-bound
and does use a second core. So the evaluator submits its scoring first, a background
thread works through it on its own share of the torch threads while the calling thread
generates with the rest, and whichever thread is free takes the next batch
(`benchmarks/bench_eval.py` measures the effect).

A process has one background `Lane`, shared by every engine, so two engines never put
three busy threads on two cores. Work is split by batch; a batch gives the same numbers
whichever thread scores it (both run the same kernels on the same rows).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op torch threads in this thread, then restore."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ScoringJob(Generic[T]):
    """Batches of one scoring call; each batch's results go to its rows' slots.

    `score(batch)` maps a batch (a list of row indices) to one result per row. Batches are
    taken in order by the lane's thread and, in `result()`, by the calling thread; either
    way a batch runs on `threads` torch threads, so its numbers do not depend on which
    thread took it (small matrix products can round differently on other thread counts).
    """

    def __init__(
        self, n_rows: int, batches: Sequence[list[int]], score: Callable[[list[int]], list[T]]
    ) -> None:
        self._results: list[T | None] = [None] * n_rows
        self._todo = deque(batches)
        self._running = 0
        self._error: BaseException | None = None
        self._score = score
        self._cond = threading.Condition()
        self._lane: Lane | None = None
        self.threads = 1

    def take(self) -> list[int] | None:
        """The next unstarted batch (now counted as running), or None."""
        with self._cond:
            if not self._todo or self._error is not None:
                return None
            self._running += 1
            return self._todo.popleft()

    def run(self, batch: list[int]) -> None:
        """Score a batch taken with `take` and store its results (or the error)."""
        try:
            with torch_threads(self.threads):
                values = self._score(batch)
            for i, value in zip(batch, values, strict=True):
                self._results[i] = value
        except BaseException as error:  # re-raised in the caller's thread by result()
            with self._cond:
                self._error = self._error or error
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def cancel(self) -> None:
        """Drop the batches not yet started (the caller no longer wants the result)."""
        with self._cond:
            self._todo.clear()
        self._close()

    def result(self) -> list[T]:
        """Score what is left in this thread, wait for batches in flight, return all rows."""
        try:
            while (batch := self.take()) is not None:
                self.run(batch)
            with self._cond:
                self._cond.wait_for(lambda: self._running == 0)
                if self._error is not None:
                    raise self._error
            return self._results  # type: ignore[return-value]
        finally:
            self._close()

    def _close(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.closed()


class Lane:
    """One background thread that works through submitted jobs, batch by batch.

    While a submitted job is open (its result not yet collected), the lane's share of the
    torch threads is reserved for it: jobs run on half of them, and work the calling
    thread does in `foreground()` on the rest. The split depends only on the order of
    calls, never on how far the lane has got, so results are reproducible.
    """

    def __init__(self) -> None:
        self._jobs: deque[ScoringJob] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._open = 0  # submitted jobs whose result was not collected yet
        self._share = 1  # torch threads the open jobs run on

    @staticmethod
    def useful(device: torch.device) -> bool:
        """Whether scoring in the background pays: a CPU with two or more torch threads."""
        return device.type == "cpu" and torch.get_num_threads() >= 2

    def submit(self, job: ScoringJob[T]) -> ScoringJob[T]:
        """Queue `job` (to run on half the caller's torch threads); returns `job`."""
        with self._lock:
            if self._open == 0:
                self._share = max(1, torch.get_num_threads() // 2)
            self._open += 1
            job.threads, job._lane = self._share, self
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="muse-bench-scoring", daemon=True
                )
                self._thread.start()
        return job

    def closed(self) -> None:
        """A job's result was collected (or the job cancelled)."""
        with self._lock:
            self._open -= 1

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Run the block on the torch threads that open jobs leave free (all if none)."""
        with self._lock:
            reserved = self._share if self._open else 0
        if not reserved:
            yield
            return
        with torch_threads(max(1, torch.get_num_threads() - reserved)):
            yield

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._jobs and (batch := self._jobs[0].take()) is None:
                    self._jobs.popleft()
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs[0]
            job.run(batch)


#: The process's background lane.
LANE = Lane()
