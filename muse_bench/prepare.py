"""`muse prepare`: make a corpus and its reference models ready, or rebuild the embedded ones."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

from muse_bench.core.models import check_checkpoint_dir
from muse_bench.data import (
    check_corpus_name,
    default_version,
    embedded_dir,
    embedded_models_dir,
    parse_corpus,
)
from muse_bench.task import local_model_dir, resolve_task


def rebuild_embedded(corpus: str, epochs: int | None = None, log=print) -> None:
    """Regenerate an embedded corpus's files and retrain its tokenizer and models.

    `corpus` may name a version ('news-v2'); the default is the current version.
    """
    from muse_bench.tasks.refmodels import MODEL_RECIPES_BY_VERSION, build_reference_models
    from muse_bench.tasks.worldgen import RECIPES_BY_VERSION, write_corpus

    name, version = parse_corpus(corpus)
    version = version or default_version(name)
    data_dir = embedded_dir(corpus)
    write_corpus(RECIPES_BY_VERSION[version][name], data_dir)
    log(f"regenerated {data_dir}")
    recipe = MODEL_RECIPES_BY_VERSION[version][name]
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    build_reference_models(data_dir, embedded_models_dir(corpus), recipe, log=log)


def streamed(work: Callable[[Callable[[str], None]], None]) -> Iterator[str]:
    """Run `work(log)` in a thread and yield each line it logs as it logs it (a rebuild
    takes many minutes: its progress shows while it runs); re-raise what it raised."""
    lines: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work(lines.put)
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)
        finally:
            lines.put(done)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while (line := lines.get()) is not done:
        yield line
    thread.join()
    if failure:
        raise failure[0]


def prepare(
    corpus: str, source: str = "embedded", rebuild: bool = False, epochs: int | None = None
) -> Iterator[str]:
    """Yield progress lines while making `corpus` from `source` ready."""
    check_corpus_name(corpus)
    if rebuild:
        if source != "embedded":
            yield "--rebuild applies to the embedded benchmark only; ignoring it."
        else:
            yield from streamed(lambda log: rebuild_embedded(corpus, epochs, log=log))
    task = resolve_task(corpus, source)
    c = task.corpus
    yield (
        f"{c.benchmark_id}: {len(c.forget)} forget / {len(c.retain1)} retain1 / {len(c.retain2)} "
        f"retain2 / {len(c.holdout)} holdout documents, {len(c.forget_qa)} forget QA, "
        f"{len(c.retain_qa)} retain QA, scale/sustain: {'yes' if c.has_scale else 'no'} ({c.data_dir})"
    )
    for which in ("target", "retrain"):
        path = local_model_dir(getattr(task.models, which))
        check_checkpoint_dir(path)
        yield f"{which} model ready: {path}"
