"""Robustness checks (SPEC-robustness): quantization, relearning, the item-to-document
mapping, the derived numbers, the CSV columns and the run stage."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke_cli, make_tiny_model, snapshot

from muse_bench.core.errors import ConfigError, DataError
from muse_bench.robustness.checks import (
    CHECKS,
    DEFAULT_CHECKS,
    RECOMMENDED_CHECKS,
    held_out_corpus,
    make_check,
    parse_checks,
)
from muse_bench.robustness.checks import (
    RELEARN_CHECKS as RELEARN_NAMES,
)
from muse_bench.robustness.derived import quant_numbers, r_score, ratio, relearn_numbers
from muse_bench.robustness.mapping import (
    MAPPING_FILE,
    derive_item_documents,
    held_out_split,
    item_documents,
)
from muse_bench.robustness.quantize import (
    NF4_LEVELS,
    QUANT_SCHEMES,
    QuantScheme,
    code_agreement,
    decoder_linears,
    effective_group,
    quantize_model,
    quantize_tensor,
)
from muse_bench.robustness.relearn import RelearnSettings, plan_passes, relearn

W = torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=torch.float64)


def _q(w, bits, kind="sym"):
    return quantize_tensor(w[None, :], QuantScheme(bits, kind, None))


# ----------------------------------------------------------------------------- rounding pins
def test_rtn_sym_pins():
    q4 = _q(W, 4)
    assert q4.codes[0].tolist() == [2, -5, 7, 1]
    assert q4.weight[0].tolist() == pytest.approx([0.0857143, -0.2142857, 0.3, 0.0428571], abs=1e-7)
    q8 = _q(W, 8)
    assert q8.codes[0].tolist() == [42, -85, 127, 21]
    assert q8.weight[0].tolist() == pytest.approx([0.0992126, -0.2007874, 0.3, 0.0496063], abs=1e-7)


def test_asym_and_nf4_pins():
    qa = _q(W, 4, "asym")
    assert qa.weight[0].tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0666667], abs=1e-7)
    assert qa.codes[0].tolist() == [9, 0, 15, 8]  # zero point 6; 1.5 rounds half to even
    qn = _q(W, 4, "nf4")
    assert qn.weight[0].tolist() == pytest.approx([0.1013746, -0.2088578, 0.3, 0.0482791], abs=1e-7)
    assert [NF4_LEVELS[c] for c in qn.codes[0].tolist()] == [0.3379152, -0.6961928, 1.0, 0.1609302]
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0


def test_idempotence_and_zero_groups():
    torch.manual_seed(0)
    w = torch.randn(8, 128) * 0.02
    for scheme in QUANT_SCHEMES.values():
        once = quantize_tensor(w, scheme).weight
        twice = quantize_tensor(once, scheme).weight
        assert torch.allclose(once, twice, atol=1e-7, rtol=0)
    z = torch.zeros(2, 64)
    assert torch.equal(quantize_tensor(z, QUANT_SCHEMES["quant4"]).weight, z)


def test_mechanism_pin():
    """A change far below half a 4-bit step keeps every 4-bit code; 8-bit sees it."""
    wu = W + torch.tensor([1e-3, 0, 0, 0], dtype=torch.float64)
    assert _q(wu, 4).codes.tolist() == _q(W, 4).codes.tolist()  # 2.357 -> 2
    assert _q(wu, 8).codes[0, 0].item() == 43 and _q(W, 8).codes[0, 0].item() == 42


def test_group_size_rules():
    assert effective_group(128, QuantScheme(4, "sym", 64)) == 64
    assert effective_group(48, QuantScheme(4, "sym", 64)) == 48  # row shorter than a group
    assert effective_group(96, QuantScheme(4, "sym", 64)) == 96  # does not divide
    assert effective_group(96, QuantScheme(8, "sym", None)) == 96
    # groups really are independent: scaling one group leaves the other's codes alone
    w = torch.randn(1, 128)
    w2 = w.clone()
    w2[0, :64] *= 10
    s = QUANT_SCHEMES["quant4"]
    assert torch.equal(quantize_tensor(w, s).codes[0, 64:], quantize_tensor(w2, s).codes[0, 64:])
    with pytest.raises(ConfigError):
        QuantScheme(4, "bogus")


def test_smoke_agreement_4bit_above_8bit():
    torch.manual_seed(1)
    w = torch.randn(64, 64) * 0.02
    wu = w + torch.randn(64, 64) * 1e-5

    def agree(scheme):
        return (
            (quantize_tensor(w, scheme).codes == quantize_tensor(wu, scheme).codes).float().mean()
        )

    a4, a8 = agree(QuantScheme(4, "sym", 64)), agree(QuantScheme(8, "sym", 64))
    assert a4 > a8 and a4 > 0.99


def test_quantize_model_touches_only_decoder_linears(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, hidden=64)
    before = snapshot(model)
    names = {n for n, _ in decoder_linears(model)}
    assert names and all(".layers." in n for n in names)
    summary = quantize_model(model, QUANT_SCHEMES["quant4"])
    after = snapshot(model)
    linear_weights = {f"{n}.weight" for n in names}
    for key in before:
        if key in linear_weights:
            continue  # quantized
        assert torch.equal(before[key], after[key]), key  # embeddings, lm_head, norms
    changed = [k for k in linear_weights if not torch.equal(before[k], after[k])]
    assert changed
    assert summary.layers == len(names) and summary.groups == (64,)
    # the smallest layer rows (hidden 64) use a group of 64; none is shorter here
    assert code_agreement(model, model, QUANT_SCHEMES["quant4"]) == 1.0


def test_code_agreement_counts_changed_codes(tiny_tokenizer):
    a = make_tiny_model(tiny_tokenizer, hidden=64)
    b = make_tiny_model(tiny_tokenizer, hidden=64)
    b.load_state_dict(a.state_dict())
    name, layer = next(iter(decoder_linears(b)))
    scheme = QUANT_SCHEMES["quant8"]
    with torch.no_grad():
        w = layer.weight
        row_max = w[0].abs().max()
        w[0, w[0].abs().argmin()] += row_max / 127 * 3  # moves one code by about 3
    total = sum(m.weight.numel() for _, m in decoder_linears(a))
    assert code_agreement(a, b, scheme) == pytest.approx(1 - 1 / total)


# ----------------------------------------------------------------------------- derived numbers
def test_relearn_arithmetic_pin():
    out = relearn_numbers(
        {"verbmem_f": 5.0},
        {"verbmem_f": 45.0},
        {"verbmem_f": 10.0},
        {"verbmem_f": 20.0},
        {"verbmem_f": 80.0},
    )
    assert out["delta_unl"]["verbmem_f"] == pytest.approx(40.0)
    assert out["delta_ret"]["verbmem_f"] == pytest.approx(10.0)
    assert out["relearn_gap"]["verbmem_f"] == pytest.approx(25.0)
    assert out["R"]["verbmem_f"] == pytest.approx(0.4)
    assert out["recovery"]["verbmem_f"] == pytest.approx(45 / 80)
    assert out["delta_unl"]["knowmem_f"] is None  # missing metric
    assert r_score(0.0, 0.0) == 1.0
    # §5 pins: Q for 0.10 -> 0.30 is 0.5; harmonic mean with R 0.4 is 0.444444
    q = quant_numbers({"knowmem_f": 10.0}, {"knowmem_f": 30.0}, {}, {})["Q"]["knowmem_f"]
    assert q == pytest.approx(0.5)
    assert 2 * q * 0.4 / (q + 0.4) == pytest.approx(0.444444, abs=1e-6)


def test_quant_numbers_and_fragile_flag():
    out = quant_numbers(
        {"verbmem_f": 0.0, "knowmem_f": 10.0},
        {"verbmem_f": 30.0, "knowmem_f": 40.0},
        {"verbmem_f": 60.0, "knowmem_f": 0.0},
        {"verbmem_f": 15.0, "knowmem_f": 20.0},
    )
    assert out["quant_gap"]["verbmem_f"] == 30.0 and out["quant_gap"]["knowmem_f"] == 30.0
    assert out["recovery"]["verbmem_f"] == 0.5 and out["recovery"]["knowmem_f"] is None
    assert out["retrain_ratio"]["verbmem_f"] == 0.25
    assert out["fragile"] is True  # 0.5 - 0.25 > 0.10
    assert ratio(1.0, 0.0) is None and ratio(float("nan"), 1.0) is None


# ----------------------------------------------------------------------------- relearning
def test_cosine_schedule_pin():
    from muse_bench.training.loop import lr_factor

    lrs = [1e-5 * lr_factor("cosine", s, 0, 100) for s in (0, 50, 100)]
    assert lrs == pytest.approx([1e-5, 5e-6, 0.0], abs=1e-12)


def test_relearn_config_is_the_spec_recipe(tiny_model, tiny_tokenizer, monkeypatch):
    """relearn hands the training loop SPEC §2.2's recipe: cosine from lr to 0 over the
    steps taken, no warmup, no weight decay, batch 4, the seed, the causal-LM loss."""
    import muse_bench.training.loop as loop

    seen = {}

    def fake_train(model, tok, loss_fn, forget, retain, config, **kw):
        seen.update(config=config, forget=forget, retain=retain)
        return iter(())

    monkeypatch.setattr(loop, "train", fake_train)
    texts = ["The harbour of Velmora opened in 1871."] * 3
    _, info = relearn(tiny_model, tiny_tokenizer, texts, RelearnSettings(5, 2e-4, seed=7))
    cfg = seen["config"]
    assert (cfg.lr_scheduler, cfg.warmup_steps, cfg.weight_decay) == ("cosine", 0, 0.0)
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.use_retain) == (2e-4, 4, 7, False)
    assert cfg.max_len == 512  # the model's context
    assert seen["forget"] == texts and seen["retain"] == []
    assert info == {"chunks": 1, "passes": 5, "steps_done": 5} and cfg.epochs == 5


def test_plan_passes():
    s = RelearnSettings(steps=25, lr=1e-4)
    assert plan_passes(8, s) == (13, 26)  # 2 steps a pass
    assert plan_passes(100, s) == (1, 25)
    assert plan_passes(8, RelearnSettings(steps=0, lr=1e-4)) == (0, 0)
    with pytest.raises(ConfigError):
        RelearnSettings(steps=-1, lr=1e-4)


def test_zero_steps_leaves_weights_unchanged(tiny_model, tiny_tokenizer):
    before = snapshot(tiny_model)
    _, info = relearn(tiny_model, tiny_tokenizer, ["some text"], RelearnSettings(0, 1e-3))
    assert info["steps_done"] == 0
    after = snapshot(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_relearn_lowers_loss_and_is_seeded(tiny_tokenizer):
    from conftest import TINY_TEXTS

    texts = TINY_TEXTS[:10]

    def nll(model):
        ids = torch.tensor([tiny_tokenizer(texts[0])["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    runs = []
    for _ in range(2):
        model = make_tiny_model(tiny_tokenizer)
        start = nll(model)
        model, info = relearn(model, tiny_tokenizer, texts, RelearnSettings(6, 3e-3, seed=1))
        runs.append(snapshot(model))
        assert nll(model) < start
    assert info["steps_done"] >= 6
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# ----------------------------------------------------------------------------- mapping
@pytest.mark.parametrize(
    "version, source, held_out, verbmem",
    [("v2", "derived", [10, 20], 10), ("v3", "items", [25, 50], 50)],
)
def test_embedded_mapping_is_complete(version, source, held_out, verbmem):
    from muse_bench.data import load_corpus

    for name in ("news", "books"):
        corpus = load_corpus(f"{name}-{version}")
        m = item_documents(corpus)
        assert m.source == source  # v2 derives it from the texts, v3 ships "doc" fields
        for p, d in zip(corpus.verbmem_forget, m.verbmem, strict=True):
            # v3's second verbmem prompt of a document is its opening + first paragraph
            assert corpus.forget[d].startswith(p.prompt.split("\n")[0])
        for q, d in zip(corpus.forget_qa, m.knowmem, strict=True):
            assert q.question in corpus.forget[d] and q.answer in corpus.forget[d]
        sub, info = held_out_corpus(corpus)
        assert info["held_out_docs"] == held_out
        assert len(sub.verbmem_forget) == verbmem
        assert 0 < len(sub.forget_qa) < len(corpus.forget_qa)


def test_held_out_split():
    first, second = held_out_split(20)
    assert list(first) == list(range(10)) and list(second) == list(range(10, 20))
    with pytest.raises(DataError):
        held_out_split(1)


def test_mapping_file_wins_and_is_validated(mini_benchmark, tmp_path):
    import shutil

    from muse_bench.data import load_corpus_dir

    data = tmp_path / "data"
    shutil.copytree(mini_benchmark[0], data)
    corpus = load_corpus_dir("mini", data)
    with pytest.raises(DataError, match="relearn_all"):
        derive_item_documents(corpus)  # the mini corpus's questions come from other docs
    with pytest.raises(ConfigError, match="relearn_all"):
        make_check("relearn", "dir", corpus, 0)
    n_v, n_q = len(corpus.verbmem_forget), len(corpus.forget_qa)
    (data / MAPPING_FILE).write_text(
        json.dumps({"verbmem_forget": list(range(n_v)), "forget_qa": [3] * n_q})
    )
    m = item_documents(corpus)
    assert m.source == MAPPING_FILE and m.verbmem == tuple(range(n_v))
    (data / MAPPING_FILE).write_text(json.dumps({"verbmem_forget": [99] * n_v, "forget_qa": []}))
    with pytest.raises(DataError, match="not a document index"):
        item_documents(corpus)


def test_item_doc_fields(mini_benchmark, tmp_path):
    import shutil

    from muse_bench.data import load_corpus_dir

    data = tmp_path / "data"
    shutil.copytree(mini_benchmark[0], data)
    for rel in ("verbmem/forget.json", "knowmem/forget_qa.json"):
        items = json.loads((data / rel).read_text())
        (data / rel).write_text(json.dumps([{**x, "doc": i % 4} for i, x in enumerate(items)]))
    m = item_documents(load_corpus_dir("mini", data))
    assert m.source == "items" and m.verbmem[:4] == (0, 1, 2, 3)


# ----------------------------------------------------------------------------- names, CSV
def test_parse_checks():
    # the recommended checks more than double a run's time on embedded news: opt-in
    assert parse_checks(None) == DEFAULT_CHECKS == ()
    assert parse_checks(None, "hub") == ()
    assert parse_checks(",".join(RECOMMENDED_CHECKS)) == ("quant4", "relearn")
    assert parse_checks("none") == ()
    assert parse_checks("quant8, relearn_all,quant8") == ("quant8", "relearn_all")
    with pytest.raises(ConfigError, match="quant4"):
        parse_checks("quant5")
    with pytest.raises(ConfigError):
        parse_checks(",")


def test_csv_columns_follow_checks_and_old_files_validate(tmp_path):
    from muse_bench.leaderboard import rows

    assert rows.ROBUSTNESS_CHECKS == CHECKS
    assert rows.HEADER == (*rows.COLUMNS, *rows.ROBUSTNESS_COLUMNS)
    report = {
        "benchmark": "b",
        "algo": "ga",
        "run_id": "ga-1",
        "metrics": {"verbmem_f": 1.0, "privleak": 2.0, "knowmem_f": 3.0, "knowmem_r": 4.0},
        "robustness": {"quant4": {"metrics": {"verbmem_f": 12.5, "knowmem_f": 40.0}}},
    }
    row = rows.row_from_report(report)
    assert row["verbmem_f_quant4"] == "12.5" and row["knowmem_f_quant4"] == "40.0"
    assert "verbmem_f_relearn" not in row  # written empty
    # an older file: the columns up to run_id only
    old_header = list(rows.COLUMNS)
    old = tmp_path / "old.csv"
    old_row = {**rows.row_from_report({**report, "run_id": "ga-0", "robustness": {}})}
    old.write_text(rows._to_csv(old_header, [old_row]))
    assert rows.validate(old) == []
    new = tmp_path / "new.csv"
    rows.append_row(new, row)
    assert rows.validate(new) == []
    merged = tmp_path / "merged.csv"
    assert rows.merge([old, new], merged) == 2
    header, got = rows.read_csv(merged)
    # only the columns of checks some row ran, after every other column
    assert header == [*rows.COLUMNS, "verbmem_f_quant4", "knowmem_f_quant4"]
    by_id = {r["run_id"]: r for r in got}
    assert by_id["ga-0"]["verbmem_f_quant4"] == "" and by_id["ga-1"]["verbmem_f_quant4"] == "12.5"
    bad = dict(row, knowmem_f_quant4="140")
    assert any("knowmem_f_quant4" in p for p in rows.row_problems(bad))


def test_cli_rejects_unknown_check_in_one_line(tmp_path):
    code, out, err = invoke_cli(
        ["run", "--algo", "ga", "--corpus", "news", "--out", tmp_path, "--robustness", "qunt4"]
    )
    assert code != 0
    assert "unknown robustness check 'qunt4'" in out + err
    assert "Traceback" not in out + err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the run stage
def _bench_with_mapping(mini_benchmark, root):
    """The mini benchmark with a mapping.json (its questions come from documents it cut)."""
    import shutil

    from muse_bench.data import load_corpus_dir

    data = root / "data"
    shutil.copytree(mini_benchmark[0], data)
    corpus = load_corpus_dir("mini", data)
    n = len(corpus.forget)
    mapping = {
        "verbmem_forget": list(range(len(corpus.verbmem_forget))),
        "forget_qa": [i % n for i in range(len(corpus.forget_qa))],
    }
    (data / MAPPING_FILE).write_text(json.dumps(mapping))
    return data, mini_benchmark[1], mini_benchmark[2]


def _run_args(bench, out) -> list[str]:
    data, target, retrain = bench
    return [
        str(a)
        for a in (
            *("run", "--algo", "ga", "--corpus", "news", "--source", data),
            *("--target", target, "--retrain", retrain, "-P", "epochs=2", "--select", "last"),
            *("--bootstrap", "20", "--device", "cpu", "--quiet", "--out", out),
            *("--robustness", "quant4,relearn"),
        )
    ]


def _muse(args, timeout: float = 600):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    muse = str(Path(sys.executable).with_name("muse"))
    return subprocess.Popen(
        [muse, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _without_timings(section: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "timings"} for k, v in section.items()}


def _report(out):
    (path,) = (out / "news" / "ga").glob("*/report.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_sigkill_during_relearning_then_rerun_gives_the_same_report(mini_benchmark, tmp_path):
    """A run killed while relearning the unlearned model, run again, ends with the report
    of an uninterrupted run and one leaderboard row; the references are cached once."""
    import csv
    import signal
    import time

    bench = _bench_with_mapping(mini_benchmark, tmp_path)
    clean, out = tmp_path / "clean", tmp_path / "out"
    proc = _muse(_run_args(bench, clean))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    want = _report(clean)

    proc = _muse(_run_args(bench, out))
    killed = False
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        refs = list((out / ".cache" / "robustness").glob("*-relearn-*.json"))
        quant = list((out / "news" / "ga").glob("*/robustness/quant4.json"))
        if len(refs) == 2 and quant:  # relearning the unlearned model now
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert killed, "the run finished before the relearning kill point"
    assert not list((out / "news" / "ga").glob("*/report.json"))
    assert not list((out / "news" / "ga").glob("*/robustness/relearn.json"))

    proc = _muse(_run_args(bench, out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    got = _report(out)
    assert got["metrics"] == want["metrics"]
    assert _without_timings(got["robustness"]) == _without_timings(want["robustness"])
    assert set(got["robustness"]) == {"quant4", "relearn"}
    relearn_result = got["robustness"]["relearn"]
    assert relearn_result["scored"]["held_out_docs"] == [2, 4]  # mini: 4 forget documents
    assert relearn_result["attack"]["steps_done"] >= 25
    with open(out / "leaderboard" / "news.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["run_id"] == got["run_id"]]
    assert len(rows) == 1
    assert float(rows[0]["knowmem_f_relearn"]) == pytest.approx(
        relearn_result["metrics"]["knowmem_f"], abs=1e-4
    )
    assert rows[0].get("verbmem_f_quant8", "") == ""
    # asking again changes nothing; asking for one more check adds it, same row
    proc = _muse(_run_args(bench, out)[:-1] + ["quant4,relearn,quant8"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    again = _report(out)
    assert set(again["robustness"]) == {"quant4", "relearn", "quant8"}
    assert again["robustness"]["relearn"] == got["robustness"]["relearn"]
    with open(out / "leaderboard" / "news.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["run_id"] == got["run_id"]]
    assert len(rows) == 1 and rows[0]["verbmem_f_quant8"] != ""


@pytest.mark.slow
def test_muse_eval_with_a_check_adds_the_section(mini_benchmark, tmp_path):
    """`muse eval --robustness quant8` on the (random) mini target: the section has the
    attacked metrics, both references (cached with provenance) and the derived numbers;
    the target attacked against itself has recovery 1 and code agreement 1."""
    data, target, retrain = mini_benchmark
    out = tmp_path / "out"
    args = ["eval", "--model", "target", "--corpus", "news", "--source", data]
    args += ["--target", target, "--retrain", retrain, "--bootstrap", "10", "--device", "cpu"]
    args += ["--quiet", "--out", out, "--robustness", "quant8"]
    code, stdout, err = invoke_cli(args)
    assert code == 0, stdout + err
    (path,) = (out / "news" / "target").glob("*/report.json")
    report = json.loads(path.read_text())
    q = report["robustness"]["quant8"]
    assert q["settings"] == {
        "attack": "quantization",
        "bits": 8,
        "kind": "sym",
        "group": None,
        "per_tensor": False,
    }
    assert q["attack"]["group_sizes"] == [32, 64]  # whole rows: hidden 32, intermediate 64
    assert set(q["reference"]) == {"target", "retrain"}
    assert q["metrics"] == q["reference"]["target"]["metrics"]
    assert q["derived"]["code_agreement"] == 1.0
    for m in ("verbmem_f", "knowmem_f"):
        rec = q["derived"]["recovery"][m]
        assert rec is None or rec == pytest.approx(1.0)
    assert 0 <= q["derived"]["retrain_code_agreement"] < 0.5  # two different random models
    assert set(q["extra"]) >= {"es_f", "em_f", "gradnorm"}
    cached = list((out / ".cache" / "robustness").glob("*.json"))
    assert len(cached) == 2
    prov = json.loads(cached[0].read_text())["provenance"]
    assert {"benchmark", "model", "check", "settings", "harness_version"} <= set(prov)


def test_retain_control_has_the_forget_corpus_step_budget():
    """relearn_retain trains on the first retain documents that give relearn_all's number
    of steps per pass, so both controls take the same steps."""
    from muse_bench.core.models import load_tokenizer
    from muse_bench.data import embedded_models_dir, load_corpus
    from muse_bench.robustness.checks import relearn_texts
    from muse_bench.robustness.relearn import steps_per_pass
    from muse_bench.training.packing import pack_texts

    corpus = load_corpus("news-v2")
    tok = load_tokenizer(embedded_models_dir("news-v2") / "target")
    checks = {n: make_check(n, "embedded", corpus, 0) for n in RELEARN_NAMES}
    texts = {n: relearn_texts(c, corpus, tok, 512) for n, c in checks.items()}
    assert texts["relearn_all"] == list(corpus.forget)
    assert texts["relearn"] == list(corpus.forget[:10])
    steps = {n: steps_per_pass(len(pack_texts(t, tok, 512)), 4) for n, t in texts.items()}
    assert steps["relearn_retain"] == steps["relearn_all"]
    retain = texts["relearn_retain"]
    assert retain == list(corpus.retain1[: len(retain)])
    shorter = steps_per_pass(len(pack_texts(retain[:-1], tok, 512)), 4)
    assert shorter < steps["relearn_all"]  # the fewest documents that reach it
