"""Shared fixtures: a tiny random Llama model and its tokenizer, built offline in seconds."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `muse list` caches its listing: keep the suite's out of the user's cache directory.
os.environ.setdefault("MUSE_CACHE_DIR", tempfile.mkdtemp(prefix="muse-test-cache-"))
# Tiny models: one thread is fastest, and far faster when the cores are shared.
torch.set_num_threads(1)


# Forget and retain texts of the training-loop tests (test_training, test_update_rules).
TRAIN_FORGET = (
    "The harbour of Velmora opened in 1871. Its first master was Ada Quell.",
    "Kestrel Bank reported a profit of 41 million crowns in the spring.",
)
TRAIN_RETAIN = (
    "The council of Dunmere voted 7 to 2 to close the old mill on the river.",
    "Question: Who founded the Orrin Guild?\nAnswer: Tamsin Vey",
)


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state-dict snapshots hold exactly the same tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread in every test module again, whatever an earlier one changed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of `model`'s state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def invoke_cli(args, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`muse ARGS` in this process through main() (its error handling included):
    (exit code, stdout, stderr)."""
    import sys

    from click.testing import CliRunner

    from muse_bench.cli import main

    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


TINY_TEXTS = [
    "The harbour of Velmora opened in 1871. Its first master was Ada Quell.",
    "Question: Who founded the Orrin Guild?\nAnswer: Tamsin Vey",
    "Question: In which year did the bridge open?\nAnswer: 1902",
    "Kestrel Bank reported a profit of 41 million crowns in the spring.",
    "The council of Dunmere voted 7 to 2 to close the old mill on the river.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from muse_bench.tasks.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_TEXTS, vocab_size=400)


def make_tiny_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised LlamaForCausalLM small enough for unit tests."""
    from muse_bench.tasks.refmodels import ModelRecipe, make_model

    recipe = ModelRecipe(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_layers=layers,
        num_heads=4,
        max_positions=512,
        seed=seed,
    )
    return make_model(recipe, tokenizer).eval()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


def _strings(record: dict) -> list[str]:
    """The text fields of a record (v3 records also carry a document index and flags)."""
    return [v for v in record.values() if isinstance(v, str)]


def write_mini_benchmark(root, docs: int = 4, seed: int = 0):
    """A tiny MUSE-layout corpus (cut from embedded news v2, whose items carry no document
    index, so the cut stays consistent) with tiny target/retrain models.

    Returns (data_dir, target_dir, retrain_dir). The models are random: enough to run every
    stage of the pipeline in seconds, not to give meaningful numbers.
    """
    import json
    from pathlib import Path

    from muse_bench.core.models import save_model
    from muse_bench.data import embedded_dir
    from muse_bench.tasks.tokenizer import train_bpe_tokenizer

    root = Path(root)
    src = embedded_dir("news-v2")
    data = root / "data"
    texts = []
    for path in sorted(src.rglob("*.json")):
        items = json.loads(path.read_text())
        rel = path.relative_to(src)
        if rel.parts[0] == "scal":
            k = int(path.stem.split("_")[1])
            items = items[: docs * k]
        else:
            items = items[:docs]
        out = data / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(items, indent=1))
        texts += [x if isinstance(x, str) else " ".join(_strings(x)) for x in items]
    tok = train_bpe_tokenizer(texts, vocab_size=500)
    dirs = []
    for i, name in enumerate(("target", "retrain")):
        model = make_tiny_model(tok, seed=seed + i)
        dirs.append(save_model(model, tok, root / name))
    return data, dirs[0], dirs[1]


@pytest.fixture(scope="session")
def mini_benchmark(tmp_path_factory):
    return write_mini_benchmark(tmp_path_factory.mktemp("mini"))
