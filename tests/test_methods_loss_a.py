"""SimNPO, UNDIAL, WGA, SatImp and CE-U (SPEC-methods §1, §6-§9): the spec's hand-computed
numbers, input validation, and the standard training checks on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import invoke_cli, make_tiny_model, snapshot
from test_training import assert_same_params
from test_unlearners import CTX, FORGET, REQUEST, nll, target_state  # noqa: F401 (fixture)
from torch import nn

from muse_bench.core.errors import ConfigError
from muse_bench.training.loop import STATE_JSON, ReferenceProvider, completed_epochs
from muse_bench.training.packing import pad_batch
from muse_bench.unlearners import (
    CEU,
    UNDIAL,
    WGA,
    GradientUnlearner,
    SatImp,
    SimNPO,
    UnlearnContext,
    get_unlearner_class,
)
from muse_bench.unlearners.losses import (
    ceu_target_logits,
    simnpo_loss,
    soft_cross_entropy,
    undial_target_logits,
)

NAMES = ["simnpo", "undial", "wga", "satimp", "ce_u"]


class ScriptedLM(nn.Module):
    """Returns the same logits `[B, T, V]` for any input of that size (cut to the input's)."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits[:b, :t])


def batch_of(*lengths: int) -> dict[str, torch.Tensor]:
    """Sequences of token 0 with these lengths, right-padded: length n scores n-1 tokens,
    each label 0 (so position t's logit row scores its entry 0)."""
    batch = pad_batch([torch.zeros(n, dtype=torch.long) for n in lengths], pad_id=0)
    batch["index"] = torch.arange(len(lengths))
    return batch


def row(logp: float) -> list[float]:
    """A 2-token logit row whose log-softmax gives token 0 the log-prob `logp`."""
    return [logp, math.log1p(-math.exp(logp))]


#: The logit row of a position whose prediction is not scored (the last one, or padding).
UNSCORED = [0.0, 0.0]


def probs_row(p: float) -> list[float]:
    return row(math.log(p))


# ---------------------------------------------------------------- SimNPO (§1)


def simnpo_forget(model, batch, **params) -> float:
    algo = SimNPO(retain_weight=0.0, **params)
    return algo.loss(model, batch, batch, ReferenceProvider()).item()


def test_simnpo_pins_the_spec_numbers():
    one = ScriptedLM([[row(-1), row(-3), UNSCORED]])  # scored log-probs (-1, -3): mean NLL 2
    assert simnpo_forget(one, batch_of(3), beta=2.5, delta=0) == pytest.approx(0.0053723, abs=5e-8)
    assert simnpo_forget(one, batch_of(3), beta=2.5, delta=1) == pytest.approx(0.0631118, abs=5e-8)
    # A second sequence with the single log-prob -4: a mean over sequences (SM, not TM).
    two = ScriptedLM([[row(-1), row(-3), UNSCORED], [row(-4), row(-0.5), UNSCORED]])
    assert simnpo_forget(two, batch_of(3, 2), beta=2.5, delta=0) == pytest.approx(
        0.0027043, abs=5e-8
    )
    # dL/d(mean NLL) = -2σ(-β·NLL̄) for one sequence; S(x) = -2·NLL̄ with |y| = 2.
    mean_nll = torch.tensor(2.0, requires_grad=True)
    simnpo_loss((-2 * mean_nll).reshape(1), torch.tensor([2]), 2.5, 0.0).backward()
    assert mean_nll.grad.item() == pytest.approx(-0.0133857, abs=5e-8)


def test_simnpo_adds_the_weighted_forget_and_retain_terms():
    model = ScriptedLM([[row(-1), row(-3), UNSCORED]])
    batch = batch_of(3)  # as the retain batch too: its NLL_TM is (1 + 3) / 2 = 2
    algo = SimNPO(beta=2.5, forget_weight=2.0, retain_weight=0.5)
    expected = 2.0 * 0.0053723 + 0.5 * 2.0
    assert algo.loss(model, batch, batch, ReferenceProvider()).item() == pytest.approx(
        expected, abs=2e-7
    )


# ---------------------------------------------------------------- WGA and SatImp (§7, §8)


def forget_term(cls, model, batch, **params) -> torch.Tensor:
    return cls(retain_weight=0.0, **params).loss(model, batch, batch, ReferenceProvider())


def test_wga_pins_the_spec_numbers_with_detached_weights():
    def model():
        return ScriptedLM([[probs_row(0.8), probs_row(0.1), UNSCORED]])  # p = (0.8, 0.1)

    assert forget_term(WGA, model(), batch_of(3), beta=1).item() == pytest.approx(
        -0.2043867, abs=5e-8
    )
    assert forget_term(WGA, model(), batch_of(3), beta=2).item() == pytest.approx(
        -0.0829189, abs=5e-8
    )
    ga = -(math.log(1 / 0.8) + math.log(10)) / 2
    assert ga == pytest.approx(-1.2628643, abs=5e-8)
    assert forget_term(WGA, model(), batch_of(3), beta=0).item() == pytest.approx(ga, abs=5e-8)
    # sg[p]: d/dz_0 of (p_0·log p_0)/2 is p_0·(1 - p_0)/2 = 0.08; an undetached weight
    # would give (log p_0 + 1)·p_0·(1 - p_0)/2 = 0.0621.
    lm = model()
    forget_term(WGA, lm, batch_of(3), beta=1).backward()
    assert lm.logits.grad[0, 0, 0].item() == pytest.approx(0.08, abs=1e-6)


def test_satimp_pins_the_spec_numbers():
    algo = SatImp(beta1=5, beta2=1, retain_weight=0.0)
    weights = algo.token_weight(torch.tensor([0.8, 0.1], dtype=torch.float64))
    assert weights.tolist() == pytest.approx([0.065536, 9e-6], abs=1e-12)
    model = ScriptedLM([[probs_row(0.8), probs_row(0.1), UNSCORED]])
    assert forget_term(SatImp, model, batch_of(3), beta1=5, beta2=1).item() == pytest.approx(
        -0.0073223, abs=5e-8
    )


# ---------------------------------------------------------------- UNDIAL (§6)


def test_undial_target_and_loss_pin_the_spec_numbers():
    z = torch.tensor([[[2.0, 1.0, 0.0]]])
    y = torch.tensor([[0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    q = torch.softmax(undial_target_logits(z, y, beta=1.0), -1)
    assert q[0, 0].tolist() == pytest.approx([0.422319, 0.422319, 0.155362], abs=5e-7)
    loss = soft_cross_entropy(undial_target_logits(z, y, 1.0), z, mask).item()
    entropy = -(q * q.log()).sum().item()
    assert loss == pytest.approx(1.140650, abs=5e-6)
    assert entropy == pytest.approx(1.017357, abs=5e-7)
    assert loss - entropy == pytest.approx(0.123292, abs=5e-6)  # the KL part
    # β = 0: distillation onto itself, the cross-entropy is H(p) and the KL is 0.
    p = torch.softmax(z, -1)
    h_p = -(p * p.log()).sum().item()
    assert soft_cross_entropy(undial_target_logits(z, y, 0.0), z, mask).item() == pytest.approx(
        h_p, abs=1e-6
    )


def test_undial_reads_the_reference_and_masks_padding():
    # Every scored position has logits (2, 1, 0) and label 0; the padded position of the
    # short sequence has other logits, which would move the mean if it were counted.
    teacher = [[2.0, 1.0, 0.0]] * 3
    student = ScriptedLM([teacher, [[2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]])
    reference = ScriptedLM([teacher, teacher])
    ref = ReferenceProvider(model=reference)
    loss = UNDIAL(beta=1.0).loss(student, batch_of(3, 2), None, ref)
    assert loss.item() == pytest.approx(1.140650, abs=5e-6)
    # The target comes from the reference, not the student: moving the student raises the CE.
    with torch.no_grad():
        student.logits[:, :, 0] += 3.0
    assert UNDIAL(beta=1.0).loss(student, batch_of(3, 2), None, ref).item() > 1.5


# ---------------------------------------------------------------- CE-U (§9)


def test_ceu_pins_the_spec_numbers_and_gradient():
    z = torch.tensor([[[2.0, 1.0, 0.0]]])
    q = torch.softmax(ceu_target_logits(z, torch.tensor([[0]])), -1)
    assert q[0, 0].tolist() == pytest.approx([0.0, 0.731059, 0.268941], abs=5e-7)
    model = ScriptedLM([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    loss = CEU().loss(model, batch_of(2), None, ReferenceProvider())
    assert loss.item() == pytest.approx(1.676547, abs=5e-7)
    loss.backward()
    grad = model.logits.grad[0, 0]
    assert grad.tolist() == pytest.approx([0.665241, -0.486330, -0.178911], abs=5e-7)
    assert grad.sum().item() == pytest.approx(0.0, abs=1e-7)
    assert model.logits.grad[0, 1].abs().max().item() == 0.0  # the unscored last position


# ---------------------------------------------------------------- registry and validation


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_description_paper_and_valid_defaults(name):
    cls = get_unlearner_class(name)
    assert issubclass(cls, GradientUnlearner) and cls.name() == name
    assert cls.description() and "\n" not in cls.description()
    assert cls.paper_url.startswith("https://arxiv.org/abs/")
    for benchmark in ("embedded-news-v2", "embedded-books-v2", "hub-muse-bench/MUSE-News@x"):
        cls(**cls.defaults_for(benchmark)).validate()
    assert cls.defaults_for("embedded-news-v2"), "no calibrated embedded defaults"


BAD = [
    ("simnpo", "beta", -1.0, r"beta must be > 0, got -1\.0\."),
    ("simnpo", "delta", -0.5, r"delta must be >= 0, got -0\.5\."),
    ("simnpo", "forget_weight", -1.0, r"forget_weight must be >= 0, got -1\.0\."),
    ("simnpo", "retain_weight", -1.0, r"retain_weight must be >= 0, got -1\.0\."),
    ("wga", "beta", -1.0, r"beta must be >= 0, got -1\.0\."),
    ("satimp", "beta1", -1.0, r"beta1 must be >= 0, got -1\.0\."),
    ("satimp", "beta2", -2.0, r"beta2 must be >= 0, got -2\.0\."),
    ("undial", "beta", 0.0, r"beta must be > 0, got 0\.0\."),
    ("ce_u", "lr", -1.0, r"lr must be > 0, got -1\.0\."),
]


@pytest.mark.parametrize(("name", "key", "value", "message"), BAD)
def test_bad_values_are_refused_in_one_line(name, key, value, message):
    with pytest.raises(ConfigError, match=message):
        get_unlearner_class(name)(**{key: value})


@pytest.mark.parametrize("name", ["simnpo", "undial"])
def test_a_bad_value_stops_muse_run_before_any_work(name, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = invoke_cli(
        ["run", "--algo", name, "--corpus", "news", "--out", out, "-P", "beta=-1", "--quiet"]
    )
    assert code != 0
    assert stderr.strip() == "error: beta must be > 0, got -1.0."
    assert not out.exists()


# ---------------------------------------------------------------- training on a tiny model


def train_epochs(name, tokenizer, state, work_dir, stop_after=None):
    """Two epochs of `name` from `state` with checkpoints in `work_dir`: a snapshot of each
    epoch's model (fewer when stopped after `stop_after` epochs, like an interrupted run)."""
    model = make_tiny_model(tokenizer)
    model.load_state_dict(state)
    algo = get_unlearner_class(name)(lr=3e-3, epochs=2, batch_size=2)
    ctx = UnlearnContext(seed=1, work_dir=work_dir, max_len=CTX.max_len)
    seen = []
    gen = algo.candidates(model, tokenizer, REQUEST, ctx)
    for cand in gen:
        seen.append((cand.path, snapshot(cand.model), nll(cand.model, tokenizer, FORGET)))
        if len(seen) == stop_after:
            gen.close()
            break
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_trains_forgets_and_resumes_like_a_straight_run(
    name,
    tiny_tokenizer,
    target_state,  # noqa: F811 (the fixture)
    tmp_path,
):
    start = make_tiny_model(tiny_tokenizer)
    start.load_state_dict(target_state)
    forget0 = nll(start, tiny_tokenizer, FORGET)

    straight = train_epochs(name, tiny_tokenizer, target_state, tmp_path / "a")
    for path, _, _ in straight:
        assert math.isfinite(json.loads((path / STATE_JSON).read_text())["loss"])
    for key, value in straight[0][1].items():
        if key in dict(start.named_parameters()):
            assert not torch.equal(value, target_state[key]), f"{name}: {key} has not changed"
    assert straight[1][2] > forget0 + 0.1, "the forget NLL did not rise"

    first = train_epochs(name, tiny_tokenizer, target_state, tmp_path / "b", stop_after=1)
    assert completed_epochs(tmp_path / "b") == [1]
    resumed = train_epochs(name, tiny_tokenizer, target_state, tmp_path / "b")
    assert_same_params(first[0][1], straight[0][1])
    for (_, a, _), (_, b, _) in zip(straight, resumed, strict=True):
        assert_same_params(a, b)


def test_undial_reference_is_the_model_before_training(tiny_tokenizer, target_state):  # noqa: F811
    """At the first step the student is the reference, so the loss is exactly CE(q, p_ref)."""
    model = make_tiny_model(tiny_tokenizer)
    model.load_state_dict(target_state)
    batch = pad_batch(
        [torch.tensor(tiny_tokenizer(FORGET[0])["input_ids"])], tiny_tokenizer.pad_token_id
    )
    ref = ReferenceProvider(model=copy.deepcopy(model).eval())
    with torch.no_grad():
        got = UNDIAL(beta=3.0).loss(model.eval(), batch, None, ref).item()
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    shifted = logits.clone()
    shifted[torch.arange(len(labels)), labels] -= 3.0
    q = torch.softmax(shifted, -1)
    expected = -(q * torch.log_softmax(logits, -1)).sum(-1).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)
