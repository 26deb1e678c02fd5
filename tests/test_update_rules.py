"""Update rules of the training loop: zeroth-order (MeZO), SAM and SURE (SPEC-methods §11,
§13, §14). The pinned numbers are the spec's, computed by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import TRAIN_FORGET, TRAIN_RETAIN, assert_same_params, make_tiny_model, snapshot
from torch import nn

from muse_bench.core.errors import ConfigError
from muse_bench.core.types import ForgetRequest
from muse_bench.training.checkpoints import STATE_TENSORS, completed_epochs
from muse_bench.training.packing import pack_texts
from muse_bench.training.ref_logprobs import ReferenceProvider
from muse_bench.training.update_rules import (
    UpdateConfig,
    check_update,
    linear_quantile,
    row_norms,
    saliency_masks,
    sam_perturbation,
)
from muse_bench.training.zeroth_order import ZerothOrder, perturbation_seed
from muse_bench.unlearners import GA, GA_GDR, NPO, NPO_GDR, UnlearnContext
from muse_bench.unlearners.base import UNLEARNERS, GradientUnlearner

FORGET, RETAIN = TRAIN_FORGET, TRAIN_RETAIN
REQUEST = ForgetRequest("single", 1, FORGET, RETAIN)


def zo_with_direction(theta: torch.Tensor, z: torch.Tensor, eps: float) -> ZerothOrder:
    """A ZerothOrder whose every seed regenerates `z` (a chosen direction, for the pins)."""
    zo = ZerothOrder([theta], [False], eps)
    zo.noise = lambda seed: iter([(0, z.clone())])
    return zo


# -- zeroth-order (§11)


@pytest.mark.parametrize(
    ("z", "g", "after"),
    [((1.0, 0.0), 1.0, (0.9, 2.0)), ((0.6, 0.8), 2.2, (0.868, 1.824))],
)
def test_zo_on_a_quadratic_gives_the_exact_directional_derivative(z, g, after):
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    zo = zo_with_direction(theta, torch.tensor(z, dtype=torch.float64), eps=1e-3)
    estimate, plus, minus = zo.directional_derivative(0, lambda: 0.5 * (theta**2).sum())
    assert estimate.item() == pytest.approx(g, abs=1e-9)
    assert plus.item() > minus.item()
    start = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(theta, start, rtol=0, atol=1e-12)  # restored (in place)
    zo.update([0], [estimate.item()], lr=0.1)
    torch.testing.assert_close(theta, torch.tensor(after, dtype=torch.float64), rtol=0, atol=1e-9)


def test_zo_step_with_lr_0_restores_fp32_weights_within_1e6(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    before = snapshot(model)
    params = list(model.parameters())
    zo = ZerothOrder(params, [p.ndim >= 2 for p in params], eps=1e-3)
    assert all(m is None for m in zo.masters)  # fp32: perturbed in place, no master copy
    batch = {"input_ids": torch.randint(0, 300, (2, 9))}
    loss = lambda: model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss  # noqa: E731
    for k in range(3):
        g, _, _ = zo.directional_derivative(perturbation_seed(0, k, 0), loss)
        zo.update([perturbation_seed(0, k, 0)], [g.item()], lr=0.0)
    for key, value in model.state_dict().items():
        rel = (value - before[key]).abs().max() / before[key].abs().max().clamp(min=1e-12)
        assert rel <= 1e-6, key


def test_zo_bf16_weights_restore_exactly_through_fp32_masters():
    w = torch.linspace(-1, 1, 64, dtype=torch.bfloat16).reshape(8, 8)
    original = w.clone()
    zo = ZerothOrder([w], [True], eps=1e-3)
    assert zo.masters[0].dtype == torch.float32
    zo.directional_derivative(7, lambda: w.float().sum())
    assert torch.equal(w, original)  # bit for bit
    # An update far below a bf16 step still accumulates in the master.
    for _ in range(10):
        zo.update([7], [1.0], lr=1e-5)
    z = next(zo.noise(7))[1]
    torch.testing.assert_close(zo.masters[0], original.float() - 1e-4 * z, rtol=0, atol=1e-6)
    assert torch.equal(w, zo.masters[0].to(torch.bfloat16))


def test_the_same_seed_regenerates_the_same_perturbation():
    params = [torch.zeros(3, 4), torch.zeros(5)]
    zo = ZerothOrder(params, [True, False], eps=1e-3)
    first = [z.clone() for _, z in zo.noise(123)]
    other = [z.clone() for _, z in zo.noise(124)]
    again = [z.clone() for _, z in zo.noise(123)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert perturbation_seed(1, 2, 3) == perturbation_seed(1, 2, 3)
    assert len({perturbation_seed(0, t, k) for t in range(50) for k in range(3)}) == 150


def test_zo_weight_decay_skips_the_no_decay_tensors():
    w, b = torch.ones(2, 2), torch.ones(2)
    zo = ZerothOrder([w, b], [True, False], eps=1e-3)
    zo.update([0], [0.0], lr=0.1, weight_decay=0.5)
    assert torch.allclose(w, torch.full((2, 2), 0.95)) and torch.equal(b, torch.ones(2))


def test_one_zo_step_on_a_two_parameter_model_is_deterministic():
    def step() -> torch.Tensor:
        theta = torch.tensor([1.0, -2.0])
        zo = ZerothOrder([theta], [False], eps=1e-3)
        seed = perturbation_seed(5, 0, 0)
        g, _, _ = zo.directional_derivative(seed, lambda: (theta**2).sum() + theta[0])
        zo.update([seed], [g.item()], lr=0.1)
        return theta

    a, b = step(), step()
    assert torch.equal(a, b) and not torch.equal(a, torch.tensor([1.0, -2.0]))


# -- SAM (§14) and SURE (§13)


def test_sam_perturbed_gradient_equals_the_hand_computed_one():
    theta = torch.tensor([3.0, 4.0], requires_grad=True)
    forget = lambda t: 0.5 * (t**2).sum()  # noqa: E731
    (g,) = torch.autograd.grad(forget(theta), [theta])
    (eps,) = sam_perturbation([g], rho=0.5)
    torch.testing.assert_close(eps, torch.tensor([0.3, 0.4]))
    shifted = (theta.detach() + eps).requires_grad_()
    (g_sam,) = torch.autograd.grad(forget(shifted), [shifted])
    torch.testing.assert_close(g_sam, torch.tensor([3.3, 4.4]))
    assert sam_perturbation([torch.zeros(2)], 0.5)[0].abs().sum() == 0


def test_sure_mask_is_the_hand_computed_one():
    # Row norms (3, 1) and (2, 0.5): quantile 0.5 of {3, 1, 2, 0.5} = 1.5.
    a = torch.tensor([[3.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 2.0, 0.0], [0.3, 0.0, 0.4]])
    torch.testing.assert_close(row_norms(a), torch.tensor([3.0, 1.0]))
    assert linear_quantile(torch.tensor([3.0, 1.0, 2.0, 0.5]), 0.5).item() == pytest.approx(1.5)
    ma, mb = saliency_masks([a, b], 0.5)
    assert ma.shape == (2, 1) and mb.shape == (2, 1)
    assert ma.flatten().tolist() == [1.0, 0.0] and mb.flatten().tolist() == [1.0, 0.0]
    # 1-D tensors: one "row" per element.
    (m1,) = saliency_masks([torch.tensor([-4.0, 1.0, 2.0, 3.0])], 0.75)  # quantile 3.25
    assert m1.tolist() == [1.0, 0.0, 0.0, 0.0]


def loop_forget_gradient(algo, tokenizer, seed=0):
    """(model, params, forget batch, retain batch, ref) as the loop would build them."""
    from muse_bench.training.loop import collate, epoch_plan

    model = make_tiny_model(tokenizer, seed=seed)
    hooks = algo.train_hooks()  # the state a method keeps between steps (idk draws, RMU's u)
    if hooks is not None:
        hooks.setup(model, tokenizer, seed)
        hooks.start_epoch(1)
    forget_chunks = pack_texts(FORGET, tokenizer, 12)
    retain_chunks = pack_texts(RETAIN, tokenizer, 12)
    f_idx, r_idx = epoch_plan(len(forget_chunks), len(retain_chunks), 1, 0, 2)[0]
    forget, retain = collate(forget_chunks, retain_chunks, f_idx, r_idx, tokenizer.pad_token_id)
    ref = ReferenceProvider.build(
        model,
        forget_chunks,
        tokenizer.pad_token_id,
        logprobs=algo.needs_ref_logprobs,
        keep_model=algo.needs_ref_model,
        batch_size=2,
        retain_chunks=retain_chunks,
    )
    return model, forget, retain if algo.needs_retain else None, ref


@pytest.mark.parametrize(
    "name",
    sorted(n for n in UNLEARNERS.names() if issubclass(UNLEARNERS.get(n), GradientUnlearner)),
)
def test_loss_terms_add_up_to_the_loss(name, tiny_tokenizer):
    """SAM and SURE rely on loss = forget term + regularizer, for every gradient method."""
    cls = UNLEARNERS.get(name)
    params = cls.defaults_for("embedded")  # PDU has no MUSE default for eps
    if "layer" in params:  # RMU: a layer the 2-layer test model has
        params["layer"] = 1
    algo = cls(**params)
    model, forget, retain, ref = loop_forget_gradient(algo, tiny_tokenizer)
    terms = algo.loss_terms()
    total = algo.loss(model, forget, retain, ref)
    parts = terms.forget(model, forget, retain, ref)
    if terms.regularizer is not None:
        parts = parts + terms.regularizer(model, forget, retain, ref)
        assert algo.needs_retain
    torch.testing.assert_close(parts, total)


class Quadratic(nn.Module):
    """theta in R^2 as a 'model': the forget loss 0.5*||theta||^2 of the SAM pin."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([3.0, 4.0]))


def test_the_sam_rule_steps_on_the_perturbed_forget_plus_unperturbed_regularizer_gradient():
    from muse_bench.core.distributed import Processes
    from muse_bench.training.update_rules import FirstOrderRule, LossTerms

    model = Quadratic()
    forget = lambda m, f, r, ref: 0.5 * (m.theta**2).sum()  # noqa: E731
    reg = lambda m, f, r, ref: (m.theta * torch.tensor([1.0, -1.0])).sum()  # noqa: E731
    total = lambda m, f, r, ref: forget(m, f, r, ref) + reg(m, f, r, ref)  # noqa: E731
    rule = FirstOrderRule(
        UpdateConfig(sam_rho=0.5, sure_quantile=0.5),
        model,
        [model.theta],
        Processes(),
        total,
        LossTerms(forget, reg),
        lambda loss: loss.backward(),
    )
    value = rule.accumulate(model, {}, None, None, weight=1.0, micro_batches=1, autocast=_null)
    assert value.item() == pytest.approx(12.5 + 3.0 - 4.0)
    torch.testing.assert_close(model.theta.detach(), torch.tensor([3.0, 4.0]))  # restored
    torch.testing.assert_close(model.theta.grad, torch.tensor([3.3 + 1.0, 4.4 - 1.0]))
    rule.before_step()  # SURE on the forget gradient (3, 4): quantile 0.5 = 3.5 keeps row 2
    torch.testing.assert_close(model.theta.grad, torch.tensor([0.0, 3.4]))


def _null():
    import contextlib

    return contextlib.nullcontext()


# -- validation


def test_combinations_that_cannot_run_are_refused_before_any_work(monkeypatch):
    with pytest.raises(ConfigError, match="sam_rho perturbs along the forget gradient"):
        NPO(optimizer="zo", sam_rho=0.01)
    with pytest.raises(ConfigError, match="sure_quantile masks rows"):
        NPO(optimizer="zo", sure_quantile=0.9)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="optimizer=zo perturbs whole weight tensors"):
        NPO(optimizer="zo", fsdp=True)
    with pytest.raises(ConfigError, match="sam_rho and sure_quantile need the whole"):
        NPO_GDR(sam_rho=0.01, fsdp=True)
    monkeypatch.delenv("WORLD_SIZE")
    for bad in (
        {"optimizer": "sgd"},
        {"optimizer": "zo", "zo_eps": 0.0},
        {"optimizer": "zo", "zo_samples": 0},
        {"sam_rho": -0.1},
        {"sure_quantile": 1.0},
        {"sure_quantile": 0.0},
    ):
        with pytest.raises(ConfigError):
            GA(**bad)
    assert NPO(optimizer="zo", lora_rank=4).update_config().zeroth_order  # ZO trains adapters
    check_update(UpdateConfig())  # the default is plain AdamW


def test_cli_refuses_zo_with_sam_in_one_line(tmp_path):
    from conftest import invoke_cli

    code, _, err = invoke_cli(
        ["run", "--algo", "npo_gdr", "--corpus", "news", "--out", tmp_path,
         "-P", "optimizer=zo", "-P", "sam_rho=0.01"]
    )  # fmt: skip
    assert code != 0
    assert err.strip().count("\n") == 0 and "sam_rho perturbs along the forget gradient" in err
    assert not any(tmp_path.iterdir())  # stopped before any work


# -- through the training loop


def run(algo, tokenizer, work_dir=None, stop_after=None, seed=0, dtype=torch.float32):
    """Train a fresh tiny model; snapshots of every yielded epoch."""
    model = make_tiny_model(tokenizer, seed=3).to(dtype)
    ctx = UnlearnContext(seed=seed, work_dir=work_dir, max_len=12)
    seen = []
    gen = algo.candidates(model, tokenizer, REQUEST, ctx)
    for cand in gen:
        seen.append(snapshot(cand.model))
        if stop_after is not None and len(seen) == stop_after:
            gen.close()
            break
    return seen


ALGOS = {
    "zo": lambda: NPO_GDR(
        optimizer="zo", lr=1e-3, epochs=2, batch_size=2, grad_accum=2, zo_samples=2,
        weight_decay=0.1,
    ),
    "sam": lambda: NPO_GDR(lr=3e-3, epochs=2, batch_size=2, grad_accum=2, sam_rho=0.05),
    "sure": lambda: GA_GDR(lr=3e-3, epochs=2, batch_size=2, sure_quantile=0.8),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(ALGOS))
def test_determinism_and_resume_equal_to_uninterrupted(kind, tiny_tokenizer, tmp_path):
    straight = run(ALGOS[kind](), tiny_tokenizer, tmp_path / "a")
    # Determinism: a second run with the same seed stops after epoch 1 ...
    (first,) = run(ALGOS[kind](), tiny_tokenizer, tmp_path / "b", stop_after=1)
    assert_same_params(first, straight[0])
    assert completed_epochs(tmp_path / "b") == [1]
    # ... and resumes to the same epoch 2 as the uninterrupted run.
    resumed = run(ALGOS[kind](), tiny_tokenizer, tmp_path / "b")
    for a, b in zip(straight, resumed, strict=True):
        assert_same_params(a, b)
    # It trained, and not as plain AdamW does.
    assert not torch.equal(straight[0]["model.norm.weight"], straight[1]["model.norm.weight"])
    off = {"optimizer": "adamw", "sam_rho": 0.0, "sure_quantile": None, "epochs": 1}
    (plain,) = run(dataclasses.replace(ALGOS[kind](), **off), tiny_tokenizer)
    assert not torch.equal(straight[0]["lm_head.weight"], plain["lm_head.weight"])
    if kind == "zo":  # the perturbations come from the run's seed
        (other,) = run(dataclasses.replace(ALGOS[kind](), epochs=1), tiny_tokenizer, seed=1)
        assert not torch.equal(straight[0]["lm_head.weight"], other["lm_head.weight"])


@pytest.mark.slow  # bf16 matmuls are slow on CPU (~40 s)
def test_zo_on_bf16_weights_resumes_from_its_fp32_masters(tiny_tokenizer, tmp_path):
    from safetensors import safe_open

    def algo():
        return NPO(optimizer="zo", lr=1e-3, epochs=2, batch_size=2, zo_eps=1e-2)

    bf16 = torch.bfloat16
    straight = run(algo(), tiny_tokenizer, tmp_path / "a", dtype=bf16)
    run(algo(), tiny_tokenizer, tmp_path / "b", stop_after=1, dtype=bf16)
    with safe_open(str(tmp_path / "b" / "epoch_1" / STATE_TENSORS), framework="pt") as fh:
        masters = [fh.get_tensor(k) for k in fh.keys() if k.startswith("zo.master.")]  # noqa: SIM118
    assert masters and all(m.dtype == torch.float32 for m in masters)
    # The masters hold more than the bf16 weights: updates below a bf16 step.
    assert any(not torch.equal(m, m.to(bf16).float()) for m in masters)
    resumed = run(algo(), tiny_tokenizer, tmp_path / "b", dtype=bf16)
    for a, b in zip(straight, resumed, strict=True):
        assert_same_params(a, b)
    assert not torch.equal(straight[0]["model.norm.weight"], straight[1]["model.norm.weight"])


def test_zo_leaves_adamw_without_state_and_matches_a_hand_run(tiny_tokenizer, tmp_path):
    """One ZO epoch through the loop equals MeZO steps written out by hand."""
    from muse_bench.training.loop import collate, epoch_plan
    from muse_bench.unlearners.losses import token_nll

    algo = GA(optimizer="zo", lr=1e-2, epochs=1, batch_size=1, zo_eps=1e-3, max_grad_norm=1.0)
    (trained,) = run(algo, tiny_tokenizer, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "epoch_1" / STATE_TENSORS), framework="pt") as fh:
        assert not [k for k in fh.keys() if k.startswith("optim.")]  # noqa: SIM118

    model = make_tiny_model(tiny_tokenizer, seed=3).train()
    chunks = pack_texts(FORGET, tiny_tokenizer, 12)
    params = [p for p in model.parameters() if p.ndim >= 2] + [
        p for p in model.parameters() if p.ndim < 2
    ]
    zo = ZerothOrder(params, [p.ndim >= 2 for p in params], eps=1e-3)
    for step, (idx, _) in enumerate(epoch_plan(len(chunks), 0, 1, 0, 1)):
        batch, _ = collate(chunks, [], idx, [], tiny_tokenizer.pad_token_id)
        seed = perturbation_seed(0, step, 0)
        g, _, _ = zo.directional_derivative(seed, lambda b=batch: -token_nll(model, b))
        zo.update([seed], [g.item()], lr=1e-2)
    assert_same_params(trained, snapshot(model))
    assert math.isfinite(float(trained["lm_head.weight"].sum()))


# -- two processes (DDP over gloo) against one

DDP_CASES = {
    "zo": ("npo_gdr", {"optimizer": "zo", "lr": 1e-3, "zo_samples": 2, "epochs": 2}),
    "sam": ("npo_gdr", {"sam_rho": 0.05, "lr": 3e-3, "epochs": 2, "grad_accum": 2}),
    "sure": ("ga_gdr", {"sure_quantile": 0.8, "lr": 3e-3, "epochs": 2}),
}


def run_ddp_cases(setup_dir: str, out_dir: str) -> None:
    """Every DDP case from `setup_dir` (model, data.json); final weights to `out_dir`.
    Called in-process for one process and by each torchrun process."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from muse_bench.core.distributed import Processes
    from muse_bench.core.models import load_model_and_tokenizer
    from muse_bench.unlearners import get_unlearner_class

    torch.set_num_threads(1)
    setup, out = Path(setup_dir), Path(out_dir)
    data = json.loads((setup / "data.json").read_text())
    request = ForgetRequest("single", 1, tuple(data["forget"]), tuple(data["retain"]))
    for name, (algo_name, params) in DDP_CASES.items():
        algo = get_unlearner_class(algo_name)(batch_size=4, **params)
        model, tok = load_model_and_tokenizer(setup / "model")
        ctx = UnlearnContext(seed=3, max_len=data["max_len"])
        final = algo.unlearn(model, tok, request, ctx)
        state = {k: v.detach().clone() for k, v in final.state_dict().items()}
        rank = Processes.current().rank  # the process group exists once training started
        save_file(state, str(out / f"{name}.rank{rank}.safetensors"))


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_update_rules import run_ddp_cases
run_ddp_cases(sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow  # two torchrun processes: ~1 min
def test_two_processes_apply_the_update_rules_like_one(tiny_tokenizer, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from test_distributed import PARAM_ATOL, full_chunk_data

    from muse_bench.core.models import save_model

    forget, retain, max_len = full_chunk_data(tiny_tokenizer)
    save_model(make_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "model")
    data = {"forget": forget, "retain": retain, "max_len": max_len}
    (tmp_path / "data.json").write_text(json.dumps(data))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_ddp_cases(str(tmp_path), str(one))
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path), str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    target = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name in DDP_CASES:
        ref = load_file(str(one / f"{name}.rank0.safetensors"))
        a = load_file(str(two / f"{name}.rank0.safetensors"))
        b = load_file(str(two / f"{name}.rank1.safetensors"))
        moved = max((ref[k] - target[k]).abs().max().item() for k in target)
        assert moved > 100 * PARAM_ATOL, f"{name}: training barely moved the parameters"
        # ZO's central difference (L+ - L-)/(2 eps) scales the float noise of the two
        # processes' summation order by L/eps (~1e4): compare relative to the change. SURE
        # zeroes most of the gradient, and AdamW's division by sqrt(v) makes the small
        # entries left more sensitive to that noise (2.8e-5 seen, the change is ~1e-2).
        atol = {"zo": 1e-3 * moved, "sure": 1e-4}.get(name, PARAM_ATOL)
        for key in ref:
            assert torch.equal(a[key], b[key]), f"{name}: replicas differ at {key}"
            diff = (a[key] - ref[key]).abs().max().item()
            assert diff <= atol, f"{name}: {key} differs by {diff:.2e} from one process"
