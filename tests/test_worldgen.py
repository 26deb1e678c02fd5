"""The embedded benchmark generator: determinism, layout, sizes and set separation."""

from __future__ import annotations

import json
import re

import pytest

from muse_bench.data import embedded_dir
from muse_bench.tasks.refmodels import training_texts
from muse_bench.tasks.worldgen import (
    GENERATOR_VERSION,
    RECIPES,
    RECIPES_BY_VERSION,
    build_corpus,
    render_file,
    write_corpus,
)

ALL = [(v, name) for v, recipes in RECIPES_BY_VERSION.items() for name in sorted(recipes)]
V2, V3 = RECIPES_BY_VERSION["2"], RECIPES_BY_VERSION["3"]


def line(qa: dict) -> str:
    return f"Question: {qa['question']}\nAnswer: {qa['answer']}"


@pytest.mark.parametrize(("version", "name"), ALL)
def test_committed_files_are_byte_identical_to_a_regeneration(version, name):
    files = build_corpus(RECIPES_BY_VERSION[version][name])
    root = embedded_dir(f"{name}-v{version}")
    committed = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert committed == set(files)
    for rel, content in files.items():
        assert (root / rel).read_bytes() == render_file(content), rel


@pytest.mark.parametrize(("version", "name"), ALL)
def test_generation_is_deterministic(version, name):
    recipe = RECIPES_BY_VERSION[version][name]
    assert build_corpus(recipe) == build_corpus(recipe)


def test_the_generator_builds_version_3_unless_told_otherwise():
    from muse_bench.tasks.refmodels import MODEL_RECIPES, MODEL_RECIPES_BY_VERSION

    assert GENERATOR_VERSION == "3" and RECIPES is V3
    assert MODEL_RECIPES is MODEL_RECIPES_BY_VERSION["3"]
    assert (
        embedded_dir("news-v3").parent.name == "v3" and embedded_dir("news-v2").parent.name == "v2"
    )


@pytest.mark.parametrize("version", sorted(RECIPES_BY_VERSION))
def test_layout_matches_muse(version):
    news = build_corpus(RECIPES_BY_VERSION[version]["news"])
    books = build_corpus(RECIPES_BY_VERSION[version]["books"])
    for files in (news, books):
        for rel in [
            "raw/forget.json",
            "raw/retain1.json",
            "raw/retain2.json",
            "raw/holdout.json",
            "raw/forget.txt",
            "verbmem/forget.json",
            "knowmem/forget_qa.json",
            "knowmem/retain_qa.json",
            "knowmem/forget_qa_icl.json",
            "knowmem/retain_qa_icl.json",
            "privleak/forget.json",
            "privleak/retain.json",
            "privleak/holdout.json",
        ]:
            assert rel in files
    assert all(f"{d}/forget_{k}.json" in news for d in ("scal", "sust") for k in range(1, 5))
    assert not any(rel.startswith(("scal/", "sust/")) for rel in books)
    assert news["raw/forget.txt"] == "\n\n".join(news["raw/forget.json"])


@pytest.mark.parametrize("version", sorted(RECIPES_BY_VERSION))
def test_sizes_and_separation(version):
    r = RECIPES_BY_VERSION[version]["news"]
    f = build_corpus(r)
    assert len(f["raw/forget.json"]) == r.forget
    assert len(f["knowmem/forget_qa_icl.json"]) == r.icl
    forget, retain2, holdout = (set(f[f"raw/{s}.json"]) for s in ("forget", "retain2", "holdout"))
    retain1 = set(f["raw/retain1.json"])
    assert not forget & retain2 and not forget & holdout and not retain2 & holdout
    assert not retain1 & (forget | retain2 | holdout)
    # scal folds are nested, sust folds disjoint, fold 1 is the main forget set
    scal = [f[f"scal/forget_{k}.json"] for k in range(1, 5)]
    sust = [f[f"sust/forget_{k}.json"] for k in range(1, 5)]
    assert scal[0] == sust[0] == f["raw/forget.json"]
    assert [len(s) for s in scal] == [r.forget * k for k in range(1, 5)]
    assert all(set(scal[k]) < set(scal[k + 1]) for k in range(3))
    assert all(not set(sust[i]) & set(sust[j]) for i in range(4) for j in range(i + 1, 4))
    for doc in set().union(*map(set, scal + sust)):
        assert doc not in retain2 and doc not in holdout
    total_chars = sum(
        len(d) for split in ("forget", "retain1", "retain2") for d in f[f"raw/{split}.json"]
    )
    assert 50_000 < total_chars < 400_000  # tens of thousands of tokens


def test_v2_sizes():
    f = build_corpus(V2["news"])
    assert len(f["verbmem/forget.json"]) == 20
    assert (len(f["knowmem/forget_qa.json"]), len(f["knowmem/retain_qa.json"])) == (36, 76)
    assert f["privleak/forget.json"] == f["raw/forget.json"]


def test_v2_every_qa_answer_is_in_exactly_its_split():
    f = build_corpus(V2["news"])
    forget_text = "\n".join(f["raw/forget.json"])
    other = "\n".join(f["raw/retain1.json"] + f["raw/retain2.json"] + f["raw/holdout.json"])
    for qa in f["knowmem/forget_qa.json"]:
        assert qa["answer"] in forget_text
        # the question names someone or something that appears in the forget set only
        names = re.findall(r"[A-Z][a-z]+", qa["question"])[1:]
        assert names and all(n in forget_text for n in names)
        assert any(n not in other for n in names)
    retain2_text = "\n".join(f["raw/retain2.json"])
    assert all(qa["answer"] in retain2_text for qa in f["knowmem/retain_qa.json"])


def test_v2_knowmem_questions_come_from_their_documents_question_box():
    for name in V2:
        f = build_corpus(V2[name])
        forget = "\n".join(f["raw/forget.json"])
        others = "\n".join(f["raw/retain1.json"] + f["raw/retain2.json"] + f["raw/holdout.json"])
        for qa in f["knowmem/forget_qa.json"] + f["knowmem/forget_qa_icl.json"]:
            assert line(qa) in forget and qa["question"] not in others


@pytest.mark.parametrize("version", sorted(RECIPES_BY_VERSION))
def test_paraphrased_questions_ask_the_same_facts_in_other_words(version):
    for recipe in RECIPES_BY_VERSION[version].values():
        plain = build_corpus(recipe)
        para = build_corpus(recipe, paraphrase=True)
        text = "\n".join(plain["raw/forget.json"] + plain["raw/retain2.json"])
        for key in ("knowmem/forget_qa.json", "knowmem/retain_qa.json"):
            assert [q["answer"] for q in plain[key]] == [q["answer"] for q in para[key]]
            for a, b in zip(plain[key], para[key], strict=True):
                assert a["question"] != b["question"]
                assert line(b) not in text
        assert plain["raw/forget.json"] == para["raw/forget.json"]


def test_v2_verbmem_pairs_split_a_forget_document():
    f = build_corpus(V2["books"])
    docs = set(f["raw/forget.json"])
    for pair in f["verbmem/forget.json"]:
        assert pair["prompt"] + pair["gt"] in docs
    json.dumps(f)  # everything is JSON-serialisable


# ---- version 3: MUSE-sized sets, item-to-document maps, knowledge shared with retain1


@pytest.fixture(scope="module", params=sorted(V3))
def v3(request):
    return V3[request.param], build_corpus(V3[request.param])


def test_v3_evaluation_sets_are_muse_sized(v3):
    _, f = v3
    assert len(f["verbmem/forget.json"]) == 100
    assert len(f["knowmem/forget_qa.json"]) == len(f["knowmem/retain_qa.json"]) == 100
    for side in ("forget", "retain", "holdout"):
        assert len(f[f"privleak/{side}.json"]) == 100


def test_v3_knowmem_items_name_the_document_whose_box_asks_them(v3):
    recipe, f = v3
    for split, key in (("forget", "forget_qa"), ("retain2", "retain_qa")):
        docs = f[f"raw/{split}.json"]
        items = f[f"knowmem/{key}.json"]
        icl = f[f"knowmem/{key}_icl.json"]
        for qa in items + icl:
            box = docs[qa["doc"]].split("\n\n", 3)[-1]  # the box is after the body
            assert line(qa) in docs[qa["doc"]] and line(qa) in box
        # qa_per_doc items of every document; the few-shot examples are other facts
        counts = [sum(qa["doc"] == d for qa in items) for d in range(len(docs))]
        assert counts == [recipe.qa_per_doc] * len(docs)
        assert not {line(q) for q in icl} & {line(q) for q in items}


def test_v3_verbmem_pairs_are_two_disjoint_cuts_of_their_document(v3):
    _, f = v3
    docs = f["raw/forget.json"]
    pairs = f["verbmem/forget.json"]
    assert [p["doc"] for p in pairs] == [d for d in range(len(docs)) for _ in range(2)]
    for first, second in zip(pairs[::2], pairs[1::2], strict=True):
        doc = docs[first["doc"]]
        assert doc.startswith(first["prompt"] + first["gt"]) and first["gt"]
        assert second["prompt"] == first["prompt"] + first["gt"] + "\n\n"
        assert second["prompt"] + second["gt"] == doc


def test_v3_privleak_items_are_the_halves_of_documents(v3):
    _, f = v3
    for side, split in (("forget", "forget"), ("retain", "retain2"), ("holdout", "holdout")):
        items, docs = f[f"privleak/{side}.json"], f[f"raw/{split}.json"]
        assert len(items) == 2 * len(docs)
        for i, doc in enumerate(docs):
            assert items[2 * i] + "\n\n" + items[2 * i + 1] == doc
            assert abs(len(items[2 * i]) - len(items[2 * i + 1])) < len(doc) // 2


def test_v3_shared_forget_facts_are_restated_in_one_retain1_document_each(v3):
    recipe, f = v3
    retain1 = f["raw/retain1.json"]
    others = f["raw/retain2.json"] + f["raw/holdout.json"] + f["raw/forget.json"]
    shared = [qa for qa in f["knowmem/forget_qa.json"] if qa["shared"]]
    assert len(shared) == recipe.shared_qa
    for qa in f["knowmem/forget_qa.json"]:
        holders = [d for d in retain1 if line(qa) in d]
        if qa["shared"]:
            assert len(holders) == 1
            # the retain1 document names the recurring subject in its body, too
            body = holders[0][: holders[0].index("\n\nQuestion: ")]
            names = re.findall(r"[A-Z][a-z]+", qa["question"])[1:]
            assert names and all(n in body for n in names)
        else:
            assert not holders
        assert sum(line(qa) in d for d in others) == 1  # only its own forget document
    for qa in f["knowmem/forget_qa_icl.json"] + f["knowmem/retain_qa.json"]:
        assert not any(line(qa) in d for d in retain1)


def test_v3_retrain_training_data_holds_exactly_the_shared_forget_lines(v3, tmp_path):
    """An independent route: write the corpus, build the reference models' training
    sequences, and count the forget items whose QA line the retrain model sees."""
    recipe, f = v3
    write_corpus(recipe, tmp_path)
    texts = training_texts(tmp_path)
    retrain = "\n".join(texts["retrain"])
    target = "\n".join(texts["target"])
    items = f["knowmem/forget_qa.json"]
    seen = [line(qa) in retrain for qa in items]
    assert sum(seen) == recipe.shared_qa == sum(qa["shared"] for qa in items)
    assert seen == [qa["shared"] for qa in items]
    assert all(line(qa) in target for qa in items + f["knowmem/retain_qa.json"])
    assert all(line(qa) in retrain for qa in f["knowmem/retain_qa.json"])
