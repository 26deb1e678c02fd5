"""Which forget document each verbmem and knowmem forget item comes from.

The held-out relearning check (`relearn`) relearns on some forget documents and scores
only the items of the others, so it needs this mapping. In order of preference:

1. a `mapping.json` file in the corpus directory:
   `{"verbmem_forget": [doc, ...], "forget_qa": [doc, ...]}`, one index into
   `raw/forget.json` per item of `verbmem/forget.json` and `knowmem/forget_qa.json`;
2. a `"doc"` field on every item of those two files;
3. derived from the texts, as the embedded benchmarks are built (tasks/worldgen.py): a
   verbmem prompt is the beginning of its document, and a knowmem question is one of the
   `Question: ...\\nAnswer: ...` lines of its document's question box. Each item must
   match exactly one document, or there is no mapping.

`item_documents` raises `DataError` with one line saying why when there is none (MUSE's
hub data has none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from muse_bench.core.errors import DataError
from muse_bench.core.types import Corpus

MAPPING_FILE = "mapping.json"
NO_MAPPING = (
    "the corpus has no item-to-document mapping, so the held-out check 'relearn' cannot run; "
    "use 'relearn_all' (Fan et al.'s protocol) instead"
)


@dataclass(frozen=True)
class ItemDocuments:
    """Document index of each verbmem forget item and each knowmem forget question."""

    verbmem: tuple[int, ...]
    knowmem: tuple[int, ...]
    source: str  # "mapping.json", "items" or "derived"


def _checked(values: object, n_items: int, n_docs: int, what: str) -> tuple[int, ...]:
    if not isinstance(values, list) or len(values) != n_items:
        raise DataError(f"{MAPPING_FILE}: '{what}' must list one document per item ({n_items}).")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_docs:
            raise DataError(f"{MAPPING_FILE}: '{what}' has {v!r}, not a document index.")
    return tuple(values)


def _from_file(path: Path, corpus: Corpus) -> ItemDocuments:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold an object.")
    n = len(corpus.forget)
    return ItemDocuments(
        _checked(data.get("verbmem_forget"), len(corpus.verbmem_forget), n, "verbmem_forget"),
        _checked(data.get("forget_qa"), len(corpus.forget_qa), n, "forget_qa"),
        MAPPING_FILE,
    )


def _item_field(data_dir: Path, corpus: Corpus) -> ItemDocuments | None:
    """The items' own "doc" fields, when every item has one."""
    found = []
    for rel, n_items in (
        ("verbmem/forget.json", len(corpus.verbmem_forget)),
        ("knowmem/forget_qa.json", len(corpus.forget_qa)),
    ):
        try:
            items = json.loads((data_dir / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(items, list) or not all(
            isinstance(x, dict) and "doc" in x for x in items
        ):
            return None
        found.append(_checked([x["doc"] for x in items], n_items, len(corpus.forget), rel))
    return ItemDocuments(found[0], found[1], "items")


def _unique(matches: Sequence[int], what: str) -> int:
    if len(matches) != 1:
        raise DataError(f"{NO_MAPPING} ({what} matches {len(matches)} documents).")
    return matches[0]


def derive_item_documents(corpus: Corpus) -> ItemDocuments:
    """The mapping read from the texts (see the module docstring); DataError if an item
    does not match exactly one forget document."""
    docs = corpus.forget
    verbmem = tuple(
        _unique([d for d, t in enumerate(docs) if t.startswith(p.prompt)], f"verbmem item {i}")
        for i, p in enumerate(corpus.verbmem_forget)
    )
    knowmem = tuple(
        _unique(
            [d for d, t in enumerate(docs) if f"Question: {q.question}\nAnswer: {q.answer}" in t],
            f"knowmem question {i}",
        )
        for i, q in enumerate(corpus.forget_qa)
    )
    return ItemDocuments(verbmem, knowmem, "derived")


def item_documents(corpus: Corpus) -> ItemDocuments:
    """The item-to-document mapping of `corpus` (see the module docstring)."""
    path = corpus.data_dir / MAPPING_FILE
    if path.is_file():
        return _from_file(path, corpus)
    return _item_field(corpus.data_dir, corpus) or derive_item_documents(corpus)


def held_out_split(n_docs: int) -> tuple[range, range]:
    """(relearned, held-out) document indices: the first half (rounded down) and the rest."""
    if n_docs < 2:
        raise DataError("the held-out relearning check needs at least two forget documents.")
    half = n_docs // 2
    return range(half), range(half, n_docs)
