"""The data layer: embedded, directory and hub sources, and validation errors."""

from __future__ import annotations

import json
import shutil

import pytest

from muse_bench import data
from muse_bench.core.errors import ConfigError, DataError
from muse_bench.protocols import check_protocol, requests


def test_embedded_news_and_books_load():
    news = data.load_corpus("news-v3", "embedded")
    books = data.load_corpus("books-v3", "embedded")
    assert news.benchmark_id == "embedded-news-v3" and books.benchmark_id == "embedded-books-v3"
    assert news.name == "news" and books.name == "books"
    assert len(news.scal) == 4 and len(news.sust) == 4
    assert books.scal == () and books.sust == ()
    for c in (news, books):
        assert len(c.verbmem_forget) == len(c.forget_qa) == len(c.retain_qa) == 100
        assert len(c.privleak_forget) == len(c.privleak_retain) == len(c.privleak_holdout) == 100
        # privleak items 2i and 2i+1 are the halves of forget document i
        halves = c.privleak_forget
        assert [a + "\n\n" + b for a, b in zip(halves[::2], halves[1::2], strict=True)] == list(
            c.forget
        )


def test_embedded_v2_stays_loadable_with_its_models():
    news = data.load_corpus("news-v2")
    assert news.name == "news" and news.benchmark_id == "embedded-news-v2"
    assert (len(news.forget), len(news.forget_qa), len(news.retain_qa)) == (20, 36, 76)
    assert news.privleak_forget == news.forget[: len(news.privleak_forget)]
    assert data.embedded_models_dir("books-v2").parent.name == "v2"


@pytest.mark.parametrize("name", data.CORPORA)
def test_a_plain_corpus_name_loads_its_default_version_which_has_models(name):
    version = data.default_version(name)
    assert version in data.embedded_versions()
    plain, versioned = data.load_corpus(name), data.load_corpus(f"{name}-v{version}")
    assert plain.benchmark_id == versioned.benchmark_id == f"embedded-{name}-v{version}"
    assert plain.forget == versioned.forget and plain.data_dir == versioned.data_dir
    for which in ("target", "retrain"):
        assert (data.embedded_models_dir(name) / which / "model.safetensors").is_file()


def test_version_suffix_errors():
    with pytest.raises(ConfigError, match=r"unknown embedded version 'news-v9'.*news-v2, news-v3"):
        data.load_corpus("news-v9")
    with pytest.raises(ConfigError, match="unknown corpus 'newz-v2'.*Did you mean: news"):
        data.load_corpus("newz-v2")
    with pytest.raises(ConfigError, match="use --corpus news with --source hub"):
        data.load_corpus("news-v2", "hub")


def test_item_documents_map_every_item_to_its_document():
    docs = data.item_documents(data.embedded_dir("news-v3"))
    corpus = data.load_corpus("news-v3")
    assert len(docs["verbmem"]) == len(corpus.verbmem_forget)
    for pair, d in zip(corpus.verbmem_forget, docs["verbmem"], strict=True):
        assert corpus.forget[d].startswith(pair.prompt + pair.gt)
    for key, split in (("forget_qa", corpus.forget), ("retain_qa", corpus.retain2)):
        for qa, d in zip(getattr(corpus, key), docs[key], strict=True):
            assert f"Question: {qa.question}\nAnswer: {qa.answer}" in split[d]
    with pytest.raises(DataError, match="no integer 'doc' field"):
        data.item_documents(data.embedded_dir("news-v2"))


def test_directory_source_equals_embedded(tmp_path):
    dest = tmp_path / "muse_news"
    shutil.copytree(data.embedded_dir("news"), dest)
    a = data.load_corpus("news", str(dest))
    b = data.load_corpus("news", "embedded")
    assert a.forget == b.forget and a.retain_qa == b.retain_qa and a.sust == b.sust
    assert a.benchmark_id.startswith("dir-news-") and a.data_dir == dest.resolve()


def _hub_repo_copy(tmp_path, name, split_renames=None):
    """A local directory laid out like the hub dataset repository (parquet + README configs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_renames = split_renames or {}
    src = data.embedded_dir(name)
    repo = tmp_path / f"hub_{name}"
    configs: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(src.rglob("*.json")):
        config, split = path.parent.name, path.stem
        split = split_renames.get((config, split), split)
        rows = json.loads(path.read_text())
        table = pa.Table.from_pylist([r if isinstance(r, dict) else {"text": r} for r in rows])
        out = repo / config / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        configs.setdefault(config, []).append((split, f"{config}/{split}-*.parquet"))
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: {p}" for s, p in splits]
    (repo / "README.md").write_text("\n".join(lines + ["---", ""]))
    return repo


def test_hub_source_reads_a_local_copy_of_the_hub_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSE_BENCH_CACHE", str(tmp_path / "cache"))
    repo = _hub_repo_copy(tmp_path, "news")
    corpus = data.load_corpus("news", "hub", hub_source=str(repo))
    ref = data.load_corpus("news", "embedded")
    assert corpus.benchmark_id == "hub-muse-bench/MUSE-News@main"
    assert corpus.forget == ref.forget and corpus.verbmem_forget == ref.verbmem_forget
    assert corpus.forget_qa == ref.forget_qa and corpus.scal == ref.scal
    # second load comes from the materialised cache, no hub access
    assert data.load_corpus("news", "hub", hub_source="/nonexistent").forget == ref.forget


def test_hub_split_names_of_older_revisions(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSE_BENCH_CACHE", str(tmp_path / "cache"))
    renames = {
        ("knowmem", "forget_qa"): "forget",
        ("knowmem", "retain_qa"): "retain",
        ("scal", "forget_2"): "forget2",
    }
    repo = _hub_repo_copy(tmp_path, "news", renames)
    corpus = data.load_corpus("news", "hub", hub_source=str(repo))
    ref = data.load_corpus("news", "embedded")
    assert corpus.forget_qa == ref.forget_qa and corpus.scal[1] == ref.scal[1]


def test_books_on_hub_has_no_folds(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSE_BENCH_CACHE", str(tmp_path / "cache"))
    corpus = data.load_corpus("books", "hub", hub_source=str(_hub_repo_copy(tmp_path, "books")))
    assert corpus.scal == ()


@pytest.fixture()
def corpus_copy(tmp_path):
    dest = tmp_path / "c"
    shutil.copytree(data.embedded_dir("news"), dest)
    return dest


def _error(dest) -> str:
    with pytest.raises(DataError) as info:
        data.load_corpus("news", str(dest))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(corpus_copy):
    (corpus_copy / "knowmem/retain_qa.json").unlink()
    assert "missing file" in _error(corpus_copy) and "retain_qa.json" in _error(corpus_copy)


def test_malformed_json_names_file_and_position(corpus_copy):
    (corpus_copy / "raw/forget.json").write_text('["a",\n  "b" oops]')
    msg = _error(corpus_copy)
    assert "forget.json" in msg and "line 2 column 7" in msg


def test_wrong_keys(corpus_copy):
    (corpus_copy / "verbmem/forget.json").write_text(json.dumps([{"prompt": "a", "text": "b"}]))
    msg = _error(corpus_copy)
    assert "item 0" in msg and "prompt, gt" in msg


def test_empty_list(corpus_copy):
    (corpus_copy / "raw/forget.json").write_text("[]")
    assert "empty list" in _error(corpus_copy)


def test_not_muse_layout(tmp_path):
    (tmp_path / "x").mkdir()
    assert "no raw/ folder" in _error(tmp_path / "x")
    with pytest.raises(DataError, match="neither"):
        data.load_corpus("news", str(tmp_path / "missing"))


def test_unknown_corpus_suggests():
    with pytest.raises(ConfigError, match="Did you mean: news"):
        data.load_corpus("nwes")


def test_books_refuses_scale_and_sustain():
    books = data.load_corpus("books")
    for protocol in ("scale", "sustain", "all"):
        with pytest.raises(ConfigError, match="no s"):
            check_protocol(protocol, books)
    assert [r.label for r in requests("single", books)] == ["single_1"]


def test_protocol_requests_order_and_starts():
    news = data.load_corpus("news-v3")
    reqs = requests("all", news)
    assert [r.label for r in reqs] == ["single_1"] + [f"scale_{k}" for k in range(1, 5)] + [
        f"sustain_{k}" for k in range(1, 5)
    ]
    assert [r.start for r in reqs if r.protocol == "sustain"] == [
        "target",
        "previous",
        "previous",
        "previous",
    ]
    assert [len(r.forget) for r in reqs if r.protocol == "scale"] == [50, 100, 150, 200]
    with pytest.raises(ConfigError, match="Did you mean: scale"):
        requests("scal", news)


def test_prepare_streams_lines_while_the_work_runs_and_reraises():
    import threading

    from muse_bench.prepare import streamed

    gate = threading.Event()
    waited = []

    def work(log):
        log("first")
        waited.append(gate.wait(5))  # set only once the consumer has seen "first"
        log("second")
        raise DataError("boom")

    lines = streamed(work)
    assert next(lines) == "first"
    gate.set()
    assert next(lines) == "second"
    with pytest.raises(DataError, match="boom"):
        next(lines)
    assert waited == [True]  # "first" arrived before the work finished, not batched after


@pytest.mark.parametrize("spec", ["news", "books", "news-v2", "books-v2"])
def test_committed_models_were_trained_with_their_versions_recipe(spec):
    from dataclasses import asdict

    from muse_bench.tasks.refmodels import MODEL_RECIPES_BY_VERSION

    name, version = data.parse_corpus(spec)
    recipe = asdict(MODEL_RECIPES_BY_VERSION[version or data.default_version(name)][name])
    tokenizers = set()
    for which in ("target", "retrain"):
        model_dir = data.embedded_models_dir(spec) / which
        assert json.loads((model_dir / "muse_recipe.json").read_text()) == recipe
        tokenizers.add((model_dir / "tokenizer.json").read_bytes())
    assert len(tokenizers) == 1  # both models share one tokenizer
