"""RMU, PDU, IdkNLL and IdkDPO: the spec's pinned numbers (SPEC-methods §2, §10, §3, §4),
their training on a tiny model, and exact resume of their per-run state (u, λ, draws)."""

# ruff: noqa: F811 (pytest fixtures imported from test_unlearners are redefined as arguments)
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, snapshot
from test_unlearners import CTX, REQUEST, target_state  # noqa: F401 (a fixture)
from torch import nn

from muse_bench.core.distributed import Processes
from muse_bench.core.errors import ConfigError
from muse_bench.training.checkpoints import STATE_TENSORS, completed_epochs, epoch_dir
from muse_bench.training.packing import pad_batch
from muse_bench.training.ref_logprobs import ReferenceProvider
from muse_bench.unlearners import (
    EMBEDDED,
    PDU,
    RMU,
    IdkDPO,
    IdkNLL,
    UnlearnContext,
    get_unlearner_class,
)
from muse_bench.unlearners.idk import (
    IDK_RESPONSES,
    RefusalDraws,
    idk_nll_loss,
    load_responses,
    prompt_length,
    response_batch,
    split_forget_batch,
)
from muse_bench.unlearners.losses import (
    activation_mse,
    block_output,
    dpo_loss,
    logit_margin_flatness,
)
from muse_bench.unlearners.pdu import DualVariable, dual_ascent, pdu_lagrangian
from muse_bench.unlearners.rmu import control_vector, steering_vector

ONE = Processes()
METHODS = {
    # tiny-model settings: the test model has 2 decoder blocks
    "rmu": dict(layer=1, steering_coeff=5.0, trainable_params=r"layers\.[01]\.mlp\.down_proj"),
    "pdu": dict(eps=0.0, dual_warmup_epochs=0, retain_weight=1.0),
    "idknll": dict(prompt_tokens=4),
    "idkdpo": dict(prompt_tokens=4, beta=0.5),
}


# ---------------------------------------------------------------- RMU (§2)


class Lookup(nn.Module):
    """A 'model' whose single block outputs a fixed vector per token id."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(torch.tensor(table))
        self.layers = nn.ModuleList([nn.Identity()])

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.layers[0](self.embed(input_ids))


def test_rmu_pinned_numbers():
    u = steering_vector(torch.tensor([1.0, 1.0]), 2.0)
    assert u.tolist() == pytest.approx([1.41421356, 1.41421356])
    assert u.norm().item() == pytest.approx(2.0)
    forget_h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert activation_mse(forget_h, u, torch.ones(1, 2)).item() == pytest.approx(1.0857864)
    retain = activation_mse(
        torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 3.0]]]), torch.ones(1, 1)
    )
    assert retain.item() == pytest.approx(2.0)


def test_rmu_loss_reads_block_outputs_and_the_reference():
    # token 0 -> (1,0), token 1 -> (0,1), token 2 -> (1,1); the reference maps 2 -> (1,3)
    model = Lookup([[1, 0], [0, 1], [1, 1]])
    ref = ReferenceProvider(model=Lookup([[1, 0], [0, 1], [1, 3]]))
    forget = pad_batch([torch.tensor([0, 1])], pad_id=2)
    retain = pad_batch([torch.tensor([2])], pad_id=2)
    algo = RMU(steering_coeff=2.0, retain_weight=1.0, layer=0)
    hooks = algo.train_hooks()
    hooks.u = torch.tensor([1.0, 1.0]) * math.sqrt(2)
    assert algo.loss(model, forget, retain, ref).item() == pytest.approx(3.0857864)
    # padding is not a token: a padded forget row scores the same
    padded = pad_batch([torch.tensor([0, 1]), torch.tensor([0])], pad_id=2)
    both = activation_mse(block_output(model, padded, 0), hooks.u, padded["attention_mask"])
    assert both.item() == pytest.approx(1.0857864)  # a padding (1,1) would give 0.1716


def test_rmu_control_vector_is_seeded_nonnegative_and_of_norm_c():
    u = control_vector(64, 6.5, seed=3)
    assert u.norm().item() == pytest.approx(6.5)
    assert (u >= 0).all()
    assert torch.equal(u, control_vector(64, 6.5, seed=3))
    assert not torch.equal(u, control_vector(64, 6.5, seed=4))


def test_block_output_is_hf_hidden_state_of_that_block(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)  # 2 blocks
    batch = pad_batch([torch.tensor([0, 5, 6, 7])], pad_id=0)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        assert torch.allclose(block_output(model, batch, 0), full[1], atol=1e-6)
        # HF's last hidden state is the last block's output after the final norm
        last = model.model.norm(block_output(model, batch, 1))
        assert torch.allclose(last, full[2], atol=1e-6)


def test_rmu_layer_is_checked_against_the_model(tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"^layer must be in \[0, 3\] for this 4-layer model"):
        RMU(layer=999).check_model({"num_hidden_layers": 4})
    RMU(layer=3).check_model({"num_hidden_layers": 4})
    algo = RMU(**{**METHODS["rmu"], "layer": 2, "epochs": 1})
    with pytest.raises(ConfigError, match=r"layer must be in \[0, 1\] for this 2-layer model"):
        algo.unlearn(make_tiny_model(tiny_tokenizer), tiny_tokenizer, REQUEST, CTX)
    for bad, message in [
        (dict(steering_coeff=0), "steering_coeff must be > 0"),
        (dict(layer=-1), "layer must be >= 0"),
        (dict(trainable_params="("), "trainable_params is not a regular expression"),
        (dict(lora_rank=4), "lora_rank must be 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RMU(**bad)


def test_rmu_cli_rejects_a_missing_layer_before_any_work(tmp_path):
    from conftest import invoke_cli

    code, _, err = invoke_cli(
        ["run", "--algo", "rmu", "--corpus", "news", "--out", tmp_path, "-P", "layer=999"]
    )
    assert code != 0
    assert err.strip() == "error: layer must be in [0, 3] for this 4-layer model, got 999."
    assert not any(tmp_path.iterdir())  # nothing written, nothing evaluated


def test_embedded_rmu_layer_exists_in_the_embedded_models():
    from muse_bench.data import embedded_models_dir
    from muse_bench.unlearners import read_model_config

    for corpus in ("news", "books"):
        config = read_model_config(embedded_models_dir(corpus) / "target")
        RMU(**RMU.defaults_for(f"embedded-{corpus}")).check_model(config)


# ---------------------------------------------------------------- PDU (§10)


def test_pdu_pinned_numbers():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]])
    forget = logit_margin_flatness(logits, torch.ones(1, 2, dtype=torch.bool))
    assert forget.item() == pytest.approx(2.5)
    assert pdu_lagrangian(forget, torch.tensor(2.0), 50.0, 1.5).item() == pytest.approx(27.5)
    assert dual_ascent(50.0, 2.0, 1.5, 1.0) == pytest.approx(50.5)
    assert pdu_lagrangian(forget, torch.tensor(1.0), 50.0, 1.5).item() == pytest.approx(-22.5)
    assert dual_ascent(50.0, 1.0, 1.5, 1.0) == pytest.approx(49.5)
    assert dual_ascent(0.2, 1.0, 1.5, 1.0) == 0.0


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        class Out:
            pass

        out = Out()
        out.logits = self.logits.expand(input_ids.shape[0], -1, -1)
        return out


def test_pdu_forget_loss_uses_shifted_scored_positions():
    # positions 0 and 1 predict tokens 1 and 2; position 2 predicts nothing: its huge
    # margin must not count (OU's unshifted mask would count it).
    logits = torch.tensor([[[2.0, 1.0, 0.0], [3.0, 0.0, 0.0], [90.0, 0.0, 0.0]]])
    model = FixedLogits(logits)
    forget = pad_batch([torch.tensor([0, 1, 2])], pad_id=0)
    retain = pad_batch([torch.tensor([0, 1, 2])], pad_id=0)
    algo = PDU(eps=1.5, retain_weight=50.0)
    dual = algo.train_hooks()
    retain_nll = -torch.log_softmax(logits[0, :2], -1)[[0, 1], [1, 2]].mean()
    want = 2.5 + 50.0 * (retain_nll - 1.5)
    assert algo.loss(model, forget, retain, None).item() == pytest.approx(want.item(), rel=1e-6)
    assert dual._step_losses == [pytest.approx(retain_nll.item())]


def test_pdu_dual_variable_steps_after_warmup_with_the_step_mean():
    dual = DualVariable(initial=50.0, eps=1.5, eta=1.0, warmup_epochs=1, every="step")
    dual.start_epoch(1)
    dual.record(torch.tensor(2.0))
    dual.after_step(ONE)
    assert dual.value == 50.0  # still in warm-up
    dual.start_epoch(2)
    for value in (2.0, 3.0):  # two micro-batches of one step (grad_accum 2)
        dual.record(torch.tensor(value))
    dual.after_step(ONE)
    assert dual.value == pytest.approx(51.0)  # 50 + (2.5 - 1.5)
    dual.record(torch.tensor(0.0))
    dual.after_step(ONE)
    assert dual.value == pytest.approx(49.5)
    per_epoch = DualVariable(initial=1.0, eps=1.0, eta=2.0, warmup_epochs=0, every="epoch")
    per_epoch.start_epoch(1)
    for value in (1.0, 2.0, 3.0):
        per_epoch.record(torch.tensor(value))
        per_epoch.after_step(ONE)
    assert per_epoch.value == 1.0
    per_epoch.end_epoch(1, ONE)
    assert per_epoch.value == pytest.approx(3.0)  # 1 + 2·(2 − 1)


def test_pdu_validation():
    with pytest.raises(ConfigError, match=r"^pdu needs eps"):
        PDU()
    assert PDU.defaults_for("embedded-news-v2")["eps"] > 0
    assert PDU.defaults_for("hub-muse-bench/MUSE-News@main")["eps"] == 1.5
    assert PDU.defaults_for("hub-muse-bench/MUSE-Books@main")["eps"] == 0.1
    for bad, message in [
        (dict(eps=-1.0), "eps must be >= 0"),
        (dict(eps=1.0, dual_lr=-1.0), "dual_lr must be >= 0"),
        (dict(eps=1.0, dual_update="batch"), "dual_update must be one of step, epoch"),
        (dict(eps=1.0, dual_warmup_epochs=-1), "dual_warmup_epochs must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PDU(**bad)


# ---------------------------------------------------------------- IdkNLL (§3), DPO (§4)


def test_idknll_pinned_numbers():
    idk = torch.tensor([[-0.5, -1.5]])
    retain = torch.tensor([[-1.0, -1.0, -4.0]])
    ones = [torch.ones_like(idk, dtype=torch.bool), torch.ones_like(retain, dtype=torch.bool)]
    assert idk_nll_loss(idk, ones[0], retain, ones[1], 1.0).item() == pytest.approx(3.0)
    concat = idk_nll_loss(idk, ones[0], retain, ones[1], 1.0, concat_mean=True)
    assert concat.item() == pytest.approx(1.6)


def test_dpo_pinned_numbers():
    def loss(w, rw, lo, rl, scaled=True):
        return dpo_loss(*(torch.tensor([v]) for v in (w, rw, lo, rl)), 0.1, scaled).item()

    assert loss(-5.0, -6.0, -3.0, -2.0) == pytest.approx(11.962777, rel=1e-6)
    assert loss(-5.0, -6.0, -3.0, -2.0, scaled=False) == pytest.approx(0.598139, rel=1e-5)
    assert loss(-3.0, -2.0, -5.0, -6.0) == pytest.approx(20 * math.log1p(math.exp(0.2)))
    assert loss(-3.0, -2.0, -5.0, -6.0) == pytest.approx(15.96277, rel=1e-6)


def test_prompt_response_split_of_raw_chunks():
    assert [prompt_length(n, 4) for n in (40, 6, 5, 2)] == [5, 5, 4, 1]
    forget = pad_batch([torch.arange(10, 20), torch.arange(30, 34)], pad_id=0)
    prompts, rest = split_forget_batch(forget, prompt_tokens=4)
    assert [p.tolist() for p in prompts] == [list(range(10, 15)), [30, 31, 32]]
    # the rejected answer: scored from the first response token on, padding unscored
    assert rest["labels"][0].tolist() == [-100] * 5 + list(range(15, 20))
    assert rest["labels"][1].tolist() == [-100] * 3 + [33] + [-100] * 6
    assert torch.equal(rest["input_ids"], forget["input_ids"])
    idk = response_batch(prompts, [torch.tensor([7, 8, 1]), torch.tensor([9, 1])], pad_id=0)
    assert idk["input_ids"][1].tolist() == [30, 31, 32, 9, 1, 0, 0, 0]
    assert idk["labels"][0].tolist() == [-100] * 5 + [7, 8, 1]
    assert idk["labels"][1].tolist() == [-100] * 3 + [9, 1] + [-100] * 3


def test_refusals_ship_with_the_package_and_draws_follow_the_seed(tiny_tokenizer):
    responses = load_responses()
    assert len(responses) >= 20 and all(not r.startswith("#") for r in responses)
    assert IDK_RESPONSES.name == "idk_responses.txt"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"muse_bench.unlearners" = ["data/*.txt"]' in pyproject

    def draws(seed, epoch, index):
        hooks = RefusalDraws(responses)
        hooks.setup(None, tiny_tokenizer, seed)
        hooks.start_epoch(epoch)
        return [hooks.choice(i) for i in index]

    one = draws(0, 1, range(40))
    assert one == draws(0, 1, range(40))
    assert draws(0, 1, [7, 3]) == [one[7], one[3]]  # per chunk, not per batch position
    assert one != draws(1, 1, range(40)) and one != draws(0, 2, range(40))
    assert len(set(one)) > 10
    hooks = RefusalDraws(["I don't know."])
    hooks.setup(None, tiny_tokenizer, 0)
    assert hooks.tokens[0][-1].item() == tiny_tokenizer.eos_token_id


def test_idk_validation(tmp_path):
    empty = tmp_path / "none.txt"
    empty.write_text("# only a comment\n")
    for cls in (IdkNLL, IdkDPO):
        with pytest.raises(ConfigError, match="prompt_tokens must be >= 1"):
            cls(prompt_tokens=0)
        with pytest.raises(ConfigError, match="holds no refusal response"):
            cls(responses_file=str(empty))
        with pytest.raises(ConfigError, match="cannot read the refusal responses"):
            cls(responses_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="beta must be > 0"):
        IdkDPO(beta=0)
    with pytest.raises(ConfigError, match="loss_form must be one of ou, standard"):
        IdkDPO(loss_form="tofu")


def test_idkdpo_at_the_start_is_log2_and_trains_against_the_reference(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    algo = IdkDPO(beta=0.1, prompt_tokens=3, retain_weight=0.0)
    hooks = algo.train_hooks()
    hooks.setup(model, tiny_tokenizer, 0)
    hooks.start_epoch(1)
    forget = pad_batch([torch.arange(3, 12), torch.arange(5, 10)], pad_id=2)
    forget["index"] = torch.tensor([0, 1])
    ref = ReferenceProvider.build(model, [], 2, logprobs=False, keep_model=True, batch_size=2)
    # the model is its own reference: r_w = r_l = 0, so L = (2/β)·log 2
    value = algo.loss(model, forget, forget, ref).item()
    assert value == pytest.approx(20 * math.log(2), rel=1e-5)


# ---------------------------------------------------------------- training, resume


def make_algo(name, **extra):
    cls = get_unlearner_class(name)
    params = {**cls.defaults_for(EMBEDDED), **METHODS[name], "lr": 1e-3, "batch_size": 2}
    return cls(**{**params, **extra})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_changes_the_trainable_parameters_with_finite_losses(
    name,
    tiny_tokenizer,
    target_state,
):
    model = make_tiny_model(tiny_tokenizer)
    model.load_state_dict(target_state)
    algo = make_algo(name, epochs=2)
    losses = []
    original = algo.loss

    def spy(*args):
        value = original(*args)
        losses.append(value.item())
        return value

    algo.loss = spy
    out = algo.unlearn(model, tiny_tokenizer, REQUEST, CTX)
    assert losses and all(math.isfinite(v) for v in losses)
    pattern = getattr(algo, "trainable_params", "")
    for key, value in out.named_parameters():
        changed = not torch.equal(value, target_state[key])
        assert changed == bool(re.search(pattern, key)), f"{name}: {key} changed={changed}"
        assert value.requires_grad  # the loop gives back what it froze


def run_epochs(algo, tokenizer, state, work, stop_after=None):
    model = make_tiny_model(tokenizer)
    model.load_state_dict(state)
    gen = algo.candidates(model, tokenizer, REQUEST, UnlearnContext(max_len=24, work_dir=work))
    states = []
    for cand in gen:
        states.append(snapshot(cand.model))
        if len(states) == stop_after:
            gen.close()
            break
    return states


def hook_state(work, epoch) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved = load_file(str(epoch_dir(work, epoch) / STATE_TENSORS))
    return {k: v for k, v in saved.items() if k.startswith("hooks.")}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_resumed_run_equals_an_uninterrupted_one(
    name,
    tiny_tokenizer,
    target_state,
    tmp_path,
):
    straight = run_epochs(make_algo(name, epochs=3), tiny_tokenizer, target_state, tmp_path / "a")
    run_epochs(make_algo(name, epochs=3), tiny_tokenizer, target_state, tmp_path / "b", 1)
    assert completed_epochs(tmp_path / "b") == [1]
    resumed_algo = make_algo(name, epochs=3)
    resumed = run_epochs(resumed_algo, tiny_tokenizer, target_state, tmp_path / "b")
    for want, got in zip(straight, resumed, strict=True):
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert hook_state(tmp_path / "a", 3).keys() == hook_state(tmp_path / "b", 3).keys()
    for key, value in hook_state(tmp_path / "a", 3).items():
        assert torch.equal(value, hook_state(tmp_path / "b", 3)[key])


def tamper_and_resume(name, key, change, tokenizer, state, work):
    """Stop after epoch 1, change the saved hook state `key`, resume: the final weights."""
    from safetensors.torch import load_file, save_file

    run_epochs(make_algo(name, epochs=2), tokenizer, state, work, 1)
    path = epoch_dir(work, 1) / STATE_TENSORS
    saved = load_file(str(path))
    saved[f"hooks.{key}"] = change(saved[f"hooks.{key}"])
    save_file(saved, str(path))
    algo = make_algo(name, epochs=2)
    return algo, run_epochs(algo, tokenizer, state, work)[-1]


def test_rmu_saves_u_and_a_resume_reads_it_back(tiny_tokenizer, target_state, tmp_path):
    straight = run_epochs(make_algo("rmu", epochs=2), tiny_tokenizer, target_state, tmp_path / "a")
    saved = hook_state(tmp_path / "a", 2)["hooks.u"]
    assert torch.equal(saved, control_vector(32, 5.0, seed=0))  # the run's seed (0)
    algo, last = tamper_and_resume(
        "rmu", "u", lambda u: u.flip(0), tiny_tokenizer, target_state, tmp_path / "b"
    )
    assert torch.equal(algo._state.u, control_vector(32, 5.0, seed=0).flip(0))
    assert not all(torch.equal(straight[-1][k], last[k]) for k in last)


def test_pdu_saves_the_dual_variable_and_a_resume_reads_it_back(
    tiny_tokenizer,
    target_state,
    tmp_path,
):
    straight_algo = make_algo("pdu", epochs=2)
    straight = run_epochs(straight_algo, tiny_tokenizer, target_state, tmp_path / "a")
    lam = hook_state(tmp_path / "a", 2)["hooks.dual"].item()
    assert lam == straight_algo._dual.value > 1.0  # eps 0: λ grows by L_r every step
    algo, last = tamper_and_resume(
        "pdu", "dual", lambda d: d + 100.0, tiny_tokenizer, target_state, tmp_path / "b"
    )
    assert algo._dual.value > 100.0
    assert not all(torch.equal(straight[-1][k], last[k]) for k in last)
