"""Several training processes (`accelerate launch` / `torchrun`, DDP): who owns which data.

The training loop keeps the optimisation independent of the number of processes: a
micro-batch of `batch_size` chunks is the same set of chunks whatever the world size, and
each process takes a contiguous share of it (`Processes.share`). Each process weights its
loss by its share, so DDP's gradient average equals the gradient of the whole micro-batch:
for losses that average over sequences (NPO) directly, and for token means (GA, GDR, KL)
because the loop also tells each share the micro-batch's token count (`token_norm`, an
all-reduce per micro-batch), which the loss helpers divide by instead of the share's own
count (`unlearners.losses.token_count`). A plugin loss that takes its own `.mean()` over
tokens gets the share-weighted mean: exact when the chunks have equal length, as MUSE's
packing makes all but the last.

`muse run` and `muse eval` keep every process in step outside training too: the processes
join one process group before any work (`start_processes`), split each evaluation between
them (`muse_bench.engines.sharded`), and leave every file write, and every decision that
depends on what is on disk, to the main process (`on_main`, `held_by_main`).

Launch, for example::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m muse_bench.cli run ...
    torchrun --standalone --nproc_per_node 2 -m muse_bench.cli run ...   # CPU processes, gloo
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from muse_bench.core.errors import MuseError

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Processes:
        """From the initialised default process group, else a single process."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This process's contiguous slice `[start, stop)` of `n` items.

        Sizes differ by at most one, the first `n % world` processes taking one more; a
        process gets an empty slice when `n < world`.
        """
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce `tensor` in place by summing over processes; returns it."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (picklable objects; small ones only)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.world > 1:
            torch.distributed.barrier()


def launched_processes() -> int:
    """How many processes the launcher started (`WORLD_SIZE`, set by torchrun and
    `accelerate launch`; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """This process's device: with several processes, a GPU given without an index is the
    process's own one (`cuda:LOCAL_RANK`), not GPU 0 for all of them.

    An explicit index (`cuda:1`) is kept as given; one process is left unchanged.
    """
    if device.type == "cuda" and device.index is None and launched_processes() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def start_processes(device: str | torch.device) -> Processes:
    """Join the other launched processes, then return this process's place among them.

    Training creates its own `accelerate.Accelerator`, but evaluation and the file writes
    before it need the process group already: so when several processes were launched and
    no default process group exists yet, it is created here the way accelerate does it
    (`PartialState`: gloo for CPU devices, NCCL for GPUs), which the training loop's
    Accelerator then reuses. Does nothing for a single process.
    """
    dist = torch.distributed
    if launched_processes() > 1 and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=torch.device(device).type != "cuda")
    return Processes.current()


class MainProcessError(MuseError):
    """The main process failed in a step that only it runs; the others stop with it."""


def on_main(fn: Callable[[], T], procs: Processes | None = None) -> T:
    """`fn()` run by the main process only; its result (or failure) reaches every process.

    Files are written by one process, and every decision that depends on files (is this
    stage already done? is the AUC cached?) must be taken once: processes that each read
    the disk could read it at different moments, take different branches and then wait for
    each other forever. The broadcast is also a barrier: no process goes on before the main
    one has finished `fn` (so its files are on disk). If `fn` raises, the main process
    raises it and the others raise `MainProcessError`, instead of waiting. The result must
    be picklable; with one process this is just `fn()`.
    """
    procs = procs or Processes.current()
    if procs.world == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if procs.is_main:
        try:
            box[0] = (True, fn())
        except BaseException as exc:  # re-raised below, once the others know
            error = exc
            box[0] = (False, (str(exc) or type(exc).__name__, getattr(exc, "exit_code", 1)))
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    ok, value = box[0]
    if not ok:
        message, exit_code = value
        failure = MainProcessError(f"the main process stopped: {message}")
        failure.exit_code = exit_code
        raise failure
    return value


@contextmanager
def held_by_main(
    factory: Callable[[], AbstractContextManager[Any]], procs: Processes | None = None
) -> Iterator[None]:
    """Hold `factory()` (a lock) in the main process only, for the duration of the block.

    One launch is one run: the main process takes the run's lock for all of them, and if
    it cannot (another command holds it) every process stops.
    """
    with ExitStack() as stack:

        def enter() -> None:
            stack.enter_context(factory())

        on_main(enter, procs)
        yield


def main_only(echo: Callable[[str], None], procs: Processes | None = None) -> Callable[[str], None]:
    """`echo` in the main process, a no-op in the others: each message is printed once."""
    procs = procs or Processes.current()
    return echo if procs.is_main else _silent


def _silent(_: str) -> None:
    pass
