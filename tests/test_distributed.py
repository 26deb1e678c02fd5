"""The training loop under DDP and FSDP: two CPU processes (torchrun, gloo) against one.

The same unlearning runs in this process and under `torchrun --nproc_per_node 2` at the same
hyperparameters (the loop keeps the global batch whatever the number of processes), and the
losses and final parameters must agree.

Why not bit-for-bit: with two processes each computes half of a micro-batch and gloo sums
the two gradients, so floating-point additions happen in another order (and matmuls run on
other shapes) than in one process; AdamW then turns those ~1e-7 relative differences into
parameter differences of the same relative size. The data are chosen so that every chunk
has the full length, which makes the per-process weighting exact in real arithmetic for
token-mean losses too (see `muse_bench.core.distributed`); the tolerances below are orders of
magnitude under the change training makes and over float noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_model

from muse_bench.core.models import save_model
from muse_bench.training.packing import pack_texts

HERE = Path(__file__).resolve().parent
SENTENCES = sorted(set(TINY_TEXTS)) + [
    "The old mill on the river was the oldest building of Dunmere.",
    "Ada Quell kept the harbour books for thirty years.",
    "Tamsin Vey sailed from Velmora in the winter of 1880.",
    "The bridge over the river opened in 1902 after ten years of work.",
    "Kestrel Bank lent the council 3 million crowns for the new school.",
    "The Orrin Guild met every spring in the hall by the harbour.",
]
WORLD = 2
PARAM_ATOL = 2e-5  # parameters: training moves them by ~1e-2 (asserted below)
LOSS_RTOL = 1e-5


def fill_to(tokenizer, texts: list[str], n_chunks: int, max_len: int) -> list[str]:
    """`texts` plus a filler text ("the the ...", one token per word) so that they pack
    into exactly `n_chunks` full-length chunks."""
    want = n_chunks * (max_len - 1)
    for words in range(1, 400):
        candidate = [*texts, " ".join(["the"] * words)]
        ids = tokenizer("\n\n".join(candidate), add_special_tokens=False)["input_ids"]
        if len(ids) == want:
            chunks = pack_texts(candidate, tokenizer, max_len)
            assert len(chunks) == n_chunks and all(len(c) == max_len for c in chunks)
            return candidate
    raise AssertionError(f"cannot fill {texts} to {n_chunks} chunks of {max_len}")


def full_chunk_data(tokenizer, max_len: int = 16) -> tuple[list[str], list[str], int]:
    """Forget and retain texts that pack into full-length chunks only, so the two-process
    weighting is exact also for token means (GA, GDR, KL). 9 forget chunks in micro-batches
    of 4 make micro-batches of 4, 4 and 1: one process idles on the last one."""
    forget = fill_to(tokenizer, SENTENCES[:6], 9, max_len)
    retain = fill_to(tokenizer, SENTENCES[6:8], 5, max_len)
    return forget, retain, max_len


CASES = {
    # NPO (sequence mean) + GDR with grad accumulation, checkpoints, then a resumed 3rd epoch.
    "npo_gdr": {"algo": "npo_gdr", "params": {"lr": 3e-3, "epochs": 2, "grad_accum": 2}},
    # Two forwards per backward (GA + KL), the top-k reference cache built in shards,
    # activations recomputed in the backward pass (with FSDP too).
    "ga_klr_topk": {
        "algo": "ga_klr",
        "params": {"lr": 3e-3, "epochs": 1, "ref_topk": 16, "gradient_checkpointing": True},
    },
    # LoRA adapters and gradient checkpointing under DDP, adapters merged when yielded.
    "ga_gdr_lora": {
        "algo": "ga_gdr",
        "params": {"lr": 1e-2, "epochs": 1, "lora_rank": 4, "gradient_checkpointing": True},
    },
}


#: Cases a sharded (FSDP) run repeats: every one but LoRA, which fsdp refuses.
FSDP_CASES = [name for name, case in CASES.items() if "lora_rank" not in case["params"]]


def run_cases(setup_dir: str, out_dir: str, fsdp: bool = False) -> None:
    """Run every case from `setup_dir` (model, tokenizer, data.json) and write the results
    to `out_dir`. Called in-process for one process and by each torchrun process; with
    `fsdp`, the cases of FSDP_CASES with -P fsdp=true."""
    import muse_bench.training.checkpoints as checkpoints
    import muse_bench.training.loop as training
    from muse_bench.core.distributed import Processes
    from muse_bench.core.models import load_model_and_tokenizer
    from muse_bench.core.types import ForgetRequest
    from muse_bench.unlearners import UnlearnContext, get_unlearner_class

    torch.set_num_threads(1)
    setup, out = Path(setup_dir), Path(out_dir)
    data = json.loads((setup / "data.json").read_text())
    request = ForgetRequest("single", 1, tuple(data["forget"]), tuple(data["retain"]))
    saved: list[str] = []
    original = checkpoints.save_model

    def counting_save(model, tokenizer, path):
        saved.append(Path(path).name)
        return original(model, tokenizer, path)

    checkpoints.save_model = counting_save
    units: list[int] = []
    original_sharded = training.FullyShardedModel

    class CountingSharded(original_sharded):
        def __init__(self, model):
            super().__init__(model)
            units.append(self.units)

    training.FullyShardedModel = CountingSharded
    results, finals = {}, {}
    try:
        for name, case in CASES.items():
            if fsdp and name not in FSDP_CASES:
                continue
            params = {**case["params"], **({"fsdp": True} if fsdp else {})}
            algo = get_unlearner_class(case["algo"])(batch_size=4, **params)
            work = out / "work" / name if name == "npo_gdr" else None
            ctx = UnlearnContext(seed=3, work_dir=work, max_len=data["max_len"])
            runs = [algo] + ([type(algo)(batch_size=4, **{**params, "epochs": 3})] if work else [])
            losses = []
            for run in runs:
                model, tok = load_model_and_tokenizer(setup / "model")
                config = run.train_config(model, request, ctx)
                retain = request.retain if run.needs_retain else ()
                for result in training.train(
                    model, tok, run.loss, request.forget, retain, config, replay=False
                ):
                    losses.append([result.epoch, result.loss])
                    final = result.model
            results[name] = losses
            finals[name] = {k: v.detach().clone() for k, v in final.state_dict().items()}
    finally:
        checkpoints.save_model = original
        training.FullyShardedModel = original_sharded
    procs = Processes.current()
    from safetensors.torch import save_file

    for name, state in finals.items():
        save_file(state, str(out / f"{name}.rank{procs.rank}.safetensors"))
    info = {
        "rank": procs.rank,
        "world": procs.world,
        "saved": saved,
        "losses": results,
        "fsdp_units": units,
    }
    (out / f"rank{procs.rank}.json").write_text(json.dumps(info))


def train_sharded(setup_dir: str, out_dir: str, epochs: int) -> None:
    """The npo_gdr case with -P fsdp=true for `epochs` epochs, resuming from the
    checkpoints in `out_dir`/work; every rank saves its final weights."""
    import muse_bench.training.loop as training
    from muse_bench.core.distributed import Processes
    from muse_bench.core.models import load_model_and_tokenizer
    from muse_bench.core.types import ForgetRequest
    from muse_bench.unlearners import UnlearnContext, get_unlearner_class

    torch.set_num_threads(1)
    setup, out = Path(setup_dir), Path(out_dir)
    data = json.loads((setup / "data.json").read_text())
    request = ForgetRequest("single", 1, tuple(data["forget"]), tuple(data["retain"]))
    case = CASES["npo_gdr"]
    params = {**case["params"], "epochs": epochs, "fsdp": True}
    algo = get_unlearner_class(case["algo"])(batch_size=4, **params)
    ctx = UnlearnContext(seed=3, work_dir=out / "work", max_len=data["max_len"])
    model, tok = load_model_and_tokenizer(setup / "model")
    config = algo.train_config(model, request, ctx)
    for result in training.train(
        model, tok, algo.loss, request.forget, request.retain, config, replay=False
    ):
        final = result.model
    from safetensors.torch import save_file

    state = {k: v.detach().clone() for k, v in final.state_dict().items()}
    save_file(state, str(out / f"final.rank{Processes.current().rank}.safetensors"))


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_distributed import run_cases, train_sharded
if sys.argv[3:4] == ["resume"]:
    train_sharded(sys.argv[1], sys.argv[2], int(sys.argv[4]))
else:
    run_cases(sys.argv[1], sys.argv[2], fsdp=sys.argv[3:] == ["fsdp"])
"""


@pytest.fixture(scope="module")
def setup_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    forget, retain, max_len = full_chunk_data(tiny_tokenizer)
    save_model(make_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer, root / "model")
    (root / "data.json").write_text(
        json.dumps({"forget": forget, "retain": retain, "max_len": max_len})
    )
    return root


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def single(setup_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Every case in this process: the results two processes must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run_cases(str(setup_dir), str(out))
    return out, json.loads((out / "rank0.json").read_text())


def torchrun_script(setup_dir: Path, out: Path, *extra: str, world: int = WORLD) -> None:
    """SCRIPT (run_cases, or train_sharded with "resume") under torchrun, `world` processes."""
    out.mkdir(exist_ok=True)
    script = out.parent / "ddp_script.py"
    script.write_text(SCRIPT.format(tests=str(HERE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={world}", str(script), str(setup_dir), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def launch(setup_dir: Path, out: Path, *extra: str) -> list[dict]:
    """run_cases under `torchrun --nproc_per_node WORLD`; every rank's info."""
    torchrun_script(setup_dir, out, *extra)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [WORLD] * WORLD
    return ranks


def assert_trained_like_one(setup_dir: Path, single, double: Path, ranks, cases) -> None:
    """Losses and final weights of the cases equal one process's; only rank 0 saved."""
    single_dir, one = single
    assert one["world"] == 1
    # Only the main process writes checkpoints: 2 epochs, then the resumed 3rd.
    assert ranks[0]["saved"] == one["saved"] == ["epoch_1", "epoch_2", "epoch_3"]
    assert ranks[1]["saved"] == []
    work = double / "work" / "npo_gdr"
    assert sorted(p.name for p in work.iterdir()) == ["epoch_1", "epoch_2", "epoch_3"]
    assert not (work / "epoch_2" / "trainer_state.safetensors").exists()

    target = load(setup_dir / "model" / "model.safetensors")
    for name in cases:
        # Every process reports the same global loss of each epoch, and it matches one process.
        expected = one["losses"][name]
        assert [e for e, _ in expected] == ([1, 2, 3] if name == "npo_gdr" else [1])
        for rank in ranks:
            assert [e for e, _ in rank["losses"][name]] == [e for e, _ in expected]
            for (_, got), (_, want) in zip(rank["losses"][name], expected, strict=True):
                assert got == pytest.approx(want, rel=LOSS_RTOL), name
        # The replicas (DDP) or gathered models (FSDP) are identical, and match one process.
        a = load(double / f"{name}.rank0.safetensors")
        b = load(double / f"{name}.rank1.safetensors")
        ref = load(single_dir / f"{name}.rank0.safetensors")
        assert a.keys() == ref.keys() and not any("lora" in k for k in a)
        moved = max((ref[k] - target[k]).abs().max().item() for k in target)
        assert moved > 100 * PARAM_ATOL, f"{name}: training barely moved the parameters"
        for key in ref:
            assert torch.equal(a[key], b[key]), f"{name}: replicas differ at {key}"
            diff = (a[key] - ref[key]).abs().max().item()
            assert diff <= PARAM_ATOL, f"{name}: {key} differs by {diff:.2e} from one process"
    # The checkpoint of the resumed last epoch is the final model.
    final = load(work / "epoch_3" / "model.safetensors")
    a = load(double / "npo_gdr.rank0.safetensors")
    assert all(torch.equal(final[k], a[k]) for k in final)


def test_two_processes_train_like_one(setup_dir, single, tmp_path):
    ranks = launch(setup_dir, tmp_path / "double")
    assert all(r["fsdp_units"] == [] for r in ranks)
    assert_trained_like_one(setup_dir, single, tmp_path / "double", ranks, CASES)


def test_two_fsdp_processes_train_like_one(setup_dir, single, tmp_path):
    """-P fsdp=true: the model sharded over both processes (one unit per decoder layer and
    the root), AdamW state gathered into the checkpoints and broadcast back on resume."""
    ranks = launch(setup_dir, tmp_path / "fsdp", "fsdp")
    # npo_gdr: 2 epochs, then a resume for the 3rd; ga_klr_topk: 1 epoch. 2 layers each.
    assert all(r["fsdp_units"] == [2, 2, 2] for r in ranks)
    assert_trained_like_one(setup_dir, single, tmp_path / "fsdp", ranks, FSDP_CASES)
    config = json.loads(
        (tmp_path / "fsdp" / "work" / "npo_gdr" / "epoch_3" / "config.json").read_text()
    )
    assert config["architectures"] == ["LlamaForCausalLM"]  # a plain model was saved


def test_a_sharded_run_resumes_on_another_number_of_processes(setup_dir, single, tmp_path):
    """Checkpoints of an FSDP run hold the whole model and AdamW state: two epochs on 2
    processes, the third resumed on 3, end where one process's three epochs end."""
    out = tmp_path / "resume"
    torchrun_script(setup_dir, out, "resume", "2", world=2)
    torchrun_script(setup_dir, out, "resume", "3", world=3)
    assert sorted(p.name for p in (out / "work").iterdir()) == ["epoch_1", "epoch_2", "epoch_3"]
    want = load(single[0] / "npo_gdr.rank0.safetensors")
    for rank in range(3):
        got = load(out / f"final.rank{rank}.safetensors")
        for key in want:
            diff = (got[key] - want[key]).abs().max().item()
            assert diff <= PARAM_ATOL, f"rank {rank}: {key} differs by {diff:.2e}"


def test_shares_cover_a_micro_batch_evenly():
    from muse_bench.core.distributed import Processes

    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            shares = [Processes(r, world).share(n) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
            sizes = [hi - lo for lo, hi in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_batch_smaller_than_the_processes_and_sharded_strategies_are_refused(
    tiny_tokenizer, monkeypatch
):
    import accelerate
    from accelerate.utils import DistributedType

    from muse_bench.core.distributed import Processes
    from muse_bench.core.errors import ConfigError
    from muse_bench.core.types import ForgetRequest
    from muse_bench.training.loop import TrainConfig, _check_config
    from muse_bench.unlearners import GA, UnlearnContext

    with pytest.raises(ConfigError, match="batch_size 2 is smaller than the 4 training processes"):
        _check_config(TrainConfig(lr=1e-3, epochs=1, batch_size=2), Processes(1, 4))
    with pytest.raises(ConfigError, match="fsdp shards the model over several processes"):
        _check_config(TrainConfig(lr=1e-3, epochs=1, fsdp=True), Processes(0, 1))
    with pytest.raises(ConfigError, match="fsdp and lora_rank cannot be combined"):
        _check_config(TrainConfig(lr=1e-3, epochs=1, fsdp=True, lora_rank=4), Processes(0, 2))

    class LaunchedAccelerator:
        kind = DistributedType.DEEPSPEED

        def __init__(self, **kwargs):
            self.distributed_type = self.kind
            self.process_index, self.num_processes = 0, 1

    monkeypatch.setattr(accelerate, "Accelerator", LaunchedAccelerator)
    request = ForgetRequest("single", 1, tuple(SENTENCES[:2]), ())

    def unlearn():
        GA(lr=1e-3, epochs=1).unlearn(
            make_tiny_model(tiny_tokenizer), tiny_tokenizer, request, UnlearnContext(max_len=16)
        )

    with pytest.raises(ConfigError, match=r"does not support DEEPSPEED.*fsdp\.yaml"):
        unlearn()
    # An accelerate FSDP launch turns the loop's own sharding on (here: one process, refused).
    LaunchedAccelerator.kind = DistributedType.FSDP
    with pytest.raises(ConfigError, match="fsdp shards the model over several processes"):
        unlearn()


class SummingProcesses:
    """Rank `rank` of a world whose other ranks' all-reduce contributions are given."""

    def __init__(self, world: int, others: torch.Tensor):
        self.world, self.others = world, others

    def sum(self, tensor):
        return tensor + self.others


@pytest.mark.parametrize("algo", ["ga_gdr", "ga_klr"])
def test_token_means_of_unequal_shares_add_up_to_the_micro_batch(tiny_tokenizer, algo):
    """Two processes' shares with different numbers of tokens: with the token norms the
    loop sets, world x share-weighted losses average to the one-process loss, gradients
    included (exact, not only for equal-length chunks)."""
    from muse_bench.training.loop import _set_token_norms
    from muse_bench.training.packing import pad_batch
    from muse_bench.training.ref_logprobs import ReferenceProvider
    from muse_bench.unlearners import get_unlearner_class

    model = make_tiny_model(tiny_tokenizer, seed=2)
    with torch.no_grad():  # spread the logits, so token losses differ between chunks
        model.model.embed_tokens.weight.mul_(20)
    texts = [TINY_TEXTS[0], TINY_TEXTS[1] * 3, "Kestrel", TINY_TEXTS[2] * 2]
    chunks = [torch.tensor(tiny_tokenizer(t)["input_ids"]) for t in texts]
    retain_chunks = [torch.tensor(tiny_tokenizer(t)["input_ids"]) for t in SENTENCES[-4:]]
    assert len({len(c) for c in chunks}) == 4  # every chunk has its own length
    pad = tiny_tokenizer.pad_token_id
    forget, retain = pad_batch(chunks, pad), pad_batch(retain_chunks, pad)
    unlearner = get_unlearner_class(algo)(lr=1e-3, epochs=1)
    ref = ReferenceProvider.build(
        model, [], pad, logprobs=False, keep_model=unlearner.needs_ref_model, batch_size=4
    )

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = unlearner.loss(model, forget, retain, ref)
    want = grads(whole)

    shares = [(0, 1), (1, 4)]  # 1 and 3 of 4 chunks, so very different token counts
    parts = []
    for lo, hi in shares:
        f, r = pad_batch(chunks[lo:hi], pad), pad_batch(retain_chunks[lo:hi], pad)
        parts.append((hi - lo, f, r))
    counts = [
        torch.stack([(b["labels"][:, 1:] != -100).sum() for b in (f, r)]) for _, f, r in parts
    ]
    total = naive = 0.0
    for i, (n, f, r) in enumerate(parts):
        others = sum(c for j, c in enumerate(counts) if j != i).double()
        share = n / len(chunks)
        with torch.no_grad():  # each share's own token mean (the loop before token norms)
            naive = naive + 2 * share * unlearner.loss(model, f, r, ref) / 2
        _set_token_norms(SummingProcesses(2, others), share, torch.device("cpu"), f, r)
        total = total + 2 * share * unlearner.loss(model, f, r, ref) / 2  # DDP: mean of 2
    assert total.item() == pytest.approx(whole.item(), abs=1e-5)
    assert abs(naive.item() - whole.item()) > 1e-2  # the shares' own means were off
    for g, w in zip(grads(total), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
