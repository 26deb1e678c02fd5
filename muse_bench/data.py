"""Load a MUSE-layout corpus from the embedded benchmark, a local directory or the hub.

All three sources end in the same place: a directory in MUSE's file layout, read and
validated by `load_corpus_dir`. The hub source materialises the dataset's configs and
splits into such a directory once (cached per repository and revision).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from muse_bench.core.errors import ConfigError, DataError
from muse_bench.core.registry import suggest
from muse_bench.core.types import Corpus, QAPair, VerbMemPair

EMBEDDED_ROOT = Path(__file__).resolve().parent / "tasks"
try:  # installed layout: muse_bench.tasks is the top-level tasks/ folder
    import muse_bench.tasks as _tasks_pkg

    EMBEDDED_ROOT = Path(_tasks_pkg.__file__).resolve().parent
except ImportError:  # pragma: no cover
    pass

CORPORA = ("news", "books")
RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")
QA_FILES = ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")
PRIVLEAK_SPLITS = ("forget", "retain", "holdout")
FOLDS = 4


@dataclass(frozen=True)
class HubDataset:
    """Where a MUSE corpus lives on the hub, at a pinned revision."""

    repo: str
    revision: str
    target: str
    retrain: str
    tokenizer: str = "meta-llama/Llama-2-7b-hf"


# The revision is part of the benchmark id; change it only together with the id.
HUB_DATASETS: dict[str, HubDataset] = {
    "news": HubDataset(
        "muse-bench/MUSE-News",
        "main",
        "muse-bench/MUSE-News_target",
        "muse-bench/MUSE-News_retrain",
    ),
    "books": HubDataset(
        "muse-bench/MUSE-Books",
        "main",
        "muse-bench/MUSE-Books_target",
        "muse-bench/MUSE-Books_retrain",
    ),
}

# Split names changed across revisions of the hub datasets: each logical split lists the
# names it has had, newest first.
HUB_SPLIT_ALIASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("raw", "retain1"): ("retain1", "retain_1", "retain"),
    ("raw", "retain2"): ("retain2", "retain_2"),
    ("knowmem", "forget_qa"): ("forget_qa", "forget"),
    ("knowmem", "retain_qa"): ("retain_qa", "retain"),
    ("knowmem", "forget_qa_icl"): ("forget_qa_icl", "forget_icl"),
    ("knowmem", "retain_qa_icl"): ("retain_qa_icl", "retain_icl"),
    **{("scal", f"forget_{k}"): (f"forget_{k}", f"forget{k}", str(k)) for k in range(1, FOLDS + 1)},
    **{("sust", f"forget_{k}"): (f"forget_{k}", f"forget{k}", str(k)) for k in range(1, FOLDS + 1)},
}


def embedded_versions() -> tuple[str, ...]:
    """The embedded benchmark versions that can be loaded, oldest first."""
    from muse_bench.tasks.worldgen import VERSIONS

    return VERSIONS


# The version `--corpus news|books` means (a versioned name such as 'news-v2' picks
# another). A new generator version becomes the default once its models are committed
# (`muse prepare --corpus news-v3 --rebuild`, the same for books); v2 stays loadable.
DEFAULT_VERSIONS: dict[str, str] = {"news": "3", "books": "3"}


def default_version(name: str) -> str:
    """The embedded version that corpus `name` (without a suffix) loads."""
    return DEFAULT_VERSIONS[name]


def parse_corpus(spec: str) -> tuple[str, str | None]:
    """Split a corpus spec into (corpus name, embedded version or None).

    'news' -> ('news', None); 'news-v2' -> ('news', '2'). Checks the name and the version.
    """
    name, sep, version = spec.partition("-v")
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus '{spec}'.{suggest(name, list(CORPORA))}")
    if not sep:
        return name, None
    if version not in embedded_versions():
        known = ", ".join(f"{name}-v{v}" for v in embedded_versions())
        raise ConfigError(f"unknown embedded version '{spec}'; known: {known}.")
    return name, version


def embedded_version_dir(spec: str) -> Path:
    """tasks/<corpus>/v<N>/: one embedded benchmark version's data/ and models/."""
    name, version = parse_corpus(spec)
    return EMBEDDED_ROOT / name / f"v{version or default_version(name)}"


def embedded_dir(spec: str) -> Path:
    """The committed MUSE-layout directory of an embedded corpus ('news' or 'news-v2')."""
    return embedded_version_dir(spec) / "data"


def embedded_models_dir(spec: str) -> Path:
    """Where an embedded corpus's target/ and retrain/ models live ('news' or 'news-v2')."""
    return embedded_version_dir(spec) / "models"


def check_corpus_name(spec: str) -> str:
    """Raise ConfigError unless `spec` is a corpus name, optionally with a version suffix."""
    parse_corpus(spec)
    return spec


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"missing file '{path}': a MUSE-layout corpus needs it.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON in '{path}' at line {exc.lineno} column {exc.colno}: {exc.msg}."
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text.") from None


def _read_texts(path: Path) -> tuple[str, ...]:
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DataError(f"'{path}' must be a JSON array of strings (documents).")
    if not data:
        raise DataError(f"'{path}' is an empty list; it needs at least one document.")
    return tuple(data)


def _read_records(path: Path, keys: tuple[str, str]) -> list[dict]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"'{path}' must be a JSON array of objects with keys {', '.join(keys)}.")
    if not data:
        raise DataError(f"'{path}' is an empty list; it needs at least one item.")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in keys):
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(
                f"'{path}' item {i} must have string keys {', '.join(keys)}; found {found}."
            )
    return data


def _qa(path: Path) -> tuple[QAPair, ...]:
    return tuple(
        QAPair(r["question"], r["answer"]) for r in _read_records(path, ("question", "answer"))
    )


def _folds(data_dir: Path, folder: str) -> tuple[tuple[str, ...], ...]:
    d = data_dir / folder
    if not d.exists():
        return ()
    return tuple(_read_texts(d / f"forget_{k}.json") for k in range(1, FOLDS + 1))


def data_fingerprint(data_dir: Path) -> str:
    """A short hash of every JSON file of a corpus directory (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(data_dir.rglob("*.json")):
        h.update(str(path.relative_to(data_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def load_corpus_dir(
    name: str, data_dir: str | os.PathLike[str], benchmark_id: str | None = None
) -> Corpus:
    """Read and validate a corpus directory in MUSE's file layout."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"corpus directory '{d}' does not exist.")
    if not (d / "raw").is_dir():
        raise DataError(f"'{d}' is not in MUSE layout: it has no raw/ folder (see SPEC §2).")
    raw = {s: _read_texts(d / "raw" / f"{s}.json") for s in RAW_SPLITS}
    verbmem = tuple(
        VerbMemPair(r["prompt"], r["gt"])
        for r in _read_records(d / "verbmem/forget.json", ("prompt", "gt"))
    )
    qa = {f: _qa(d / "knowmem" / f"{f}.json") for f in QA_FILES}
    priv = {s: _read_texts(d / "privleak" / f"{s}.json") for s in PRIVLEAK_SPLITS}
    return Corpus(
        name=name,
        benchmark_id=benchmark_id or f"dir-{name}-{data_fingerprint(d)}",
        data_dir=d.resolve(),
        forget=raw["forget"],
        retain1=raw["retain1"],
        retain2=raw["retain2"],
        holdout=raw["holdout"],
        verbmem_forget=verbmem,
        forget_qa=qa["forget_qa"],
        retain_qa=qa["retain_qa"],
        forget_qa_icl=qa["forget_qa_icl"],
        retain_qa_icl=qa["retain_qa_icl"],
        privleak_forget=priv["forget"],
        privleak_retain=priv["retain"],
        privleak_holdout=priv["holdout"],
        scal=_folds(d, "scal"),
        sust=_folds(d, "sust"),
    )


ITEM_FILES = {
    "verbmem": "verbmem/forget.json",
    "forget_qa": "knowmem/forget_qa.json",
    "forget_qa_icl": "knowmem/forget_qa_icl.json",
    "retain_qa": "knowmem/retain_qa.json",
    "retain_qa_icl": "knowmem/retain_qa_icl.json",
}


def item_documents(data_dir: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Which document each verbmem/knowmem item comes from, by the items' `doc` fields.

    Indices point into raw/forget.json (verbmem, forget_qa*) or raw/retain2.json
    (retain_qa*), item by item in file order. Embedded v3 corpora carry the fields; MUSE's
    files and embedded v2 do not, which raises DataError.
    """
    d = Path(data_dir)
    sizes = {"forget": len(_read_texts(d / "raw/forget.json"))}
    sizes["retain"] = len(_read_texts(d / "raw/retain2.json"))
    out = {}
    for key, rel in ITEM_FILES.items():
        records = _read_json(d / rel)
        docs = [r.get("doc") if isinstance(r, dict) else None for r in records]
        bad = next((i for i, x in enumerate(docs) if type(x) is not int), None)
        if bad is not None:
            raise DataError(
                f"'{d / rel}' item {bad} has no integer 'doc' field: this corpus has no "
                "item-to-document map (embedded v3 corpora have one)."
            )
        n = sizes["retain" if key.startswith("retain") else "forget"]
        if any(not 0 <= x < n for x in docs):
            raise DataError(f"'{d / rel}' has a 'doc' index outside 0..{n - 1}.")
        out[key] = tuple(docs)
    return out


def embedded_benchmark_id(spec: str) -> str:
    """Names the embedded data and reference-model version, e.g. 'embedded-news-v3'."""
    name, version = parse_corpus(spec)
    return f"embedded-{name}-v{version or default_version(name)}"


def hub_cache_dir(hub: HubDataset) -> Path:
    root = Path(os.environ.get("MUSE_BENCH_CACHE", Path.home() / ".cache" / "muse_bench"))
    return root / "hub" / hub.repo.replace("/", "__") / hub.revision


def _hub_split(load, config: str, split: str):
    """Load one split, trying the names it has had across dataset revisions."""
    errors = []
    for candidate in HUB_SPLIT_ALIASES.get((config, split), (split,)):
        try:
            return load(config, candidate)
        except ValueError as exc:  # datasets raises ValueError for an unknown split
            errors.append(str(exc).splitlines()[0])
    raise DataError(f"hub dataset has no split '{split}' in config '{config}' ({errors[-1]}).")


def materialize_hub(
    hub: HubDataset, dest: Path, source: str | None = None, with_folds: bool = True
) -> Path:
    """Write the hub dataset (or a local copy laid out like its repository) in MUSE layout.

    `source` overrides where `datasets.load_dataset` reads from (a local directory laid out
    like the hub repository), which is how this code is tested offline.
    """
    from datasets import load_dataset

    from muse_bench.core.io import atomic_write_json

    path = source or hub.repo
    # a private datasets cache, removed afterwards: the MUSE-layout JSON is what we keep
    hf_cache = dest / ".datasets_cache"

    def load(config: str, split: str):
        try:
            return load_dataset(
                path,
                config,
                split=split,
                revision=None if source else hub.revision,
                cache_dir=str(hf_cache),
            )
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise DataError(
                f"cannot load '{path}' config '{config}' from the hub ({str(exc).splitlines()[0]}); "
                "check the connection or HF_HUB_OFFLINE, or use --source embedded."
            ) from None

    def texts(config: str, split: str) -> list[str]:
        return list(_hub_split(load, config, split)["text"])

    def records(config: str, split: str, keys: tuple[str, str]) -> list[dict]:
        ds = _hub_split(load, config, split)
        return [{k: row[k] for k in keys} for row in ds]

    for s in RAW_SPLITS:
        atomic_write_json(dest / "raw" / f"{s}.json", texts("raw", s))
    atomic_write_json(dest / "verbmem/forget.json", records("verbmem", "forget", ("prompt", "gt")))
    for f in QA_FILES:
        atomic_write_json(
            dest / "knowmem" / f"{f}.json", records("knowmem", f, ("question", "answer"))
        )
    for s in PRIVLEAK_SPLITS:
        atomic_write_json(dest / "privleak" / f"{s}.json", texts("privleak", s))
    if with_folds:
        for folder in ("scal", "sust"):
            for k in range(1, FOLDS + 1):
                atomic_write_json(dest / folder / f"forget_{k}.json", texts(folder, f"forget_{k}"))
    shutil.rmtree(hf_cache, ignore_errors=True)
    (dest / ".complete").write_text(f"{hub.repo}@{hub.revision}\n")  # last: marks a whole copy
    return dest


def load_corpus(name: str, source: str = "embedded", hub_source: str | None = None) -> Corpus:
    """Load corpus `name` from `source`: 'embedded', 'hub', or a MUSE-layout directory.

    An embedded corpus may name its version ('news-v2'); without one it is the current
    version. The loaded Corpus is named without the suffix; its benchmark id has it.
    """
    base, version = parse_corpus(name)
    if source == "embedded":
        return load_corpus_dir(base, embedded_dir(name), embedded_benchmark_id(name))
    if version is not None:
        raise ConfigError(
            f"'{name}' names an embedded benchmark version; use --corpus {base} with --source {source}."
        )
    if source == "hub":
        hub = HUB_DATASETS[name]
        dest = hub_cache_dir(hub)
        if not (dest / ".complete").is_file():
            materialize_hub(hub, dest, source=hub_source, with_folds=name != "books")
        return load_corpus_dir(name, dest, f"hub-{hub.repo}@{hub.revision}")
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"--source '{source}' is neither 'embedded', 'hub' nor an existing directory."
        )
    return load_corpus_dir(name, path)
