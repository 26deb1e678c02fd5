"""The baselines' math, their effect on a tiny model, TV/WHP, and plugin loading."""

from __future__ import annotations

import importlib
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from muse_bench.core.errors import ConfigError
from muse_bench.core.models import save_model
from muse_bench.core.types import ForgetRequest
from muse_bench.training.loop import ReferenceProvider
from muse_bench.training.packing import pack_texts, pad_batch
from muse_bench.unlearners import (
    EMBEDDED,
    GA,
    GA_GDR,
    NPO,
    UNLEARNERS,
    WHP,
    FinetuneNLL,
    GradientUnlearner,
    TaskVector,
    UnlearnContext,
    Unlearner,
    WHPModel,
    get_unlearner_class,
    kl_divergence,
    load_unlearned,
    npo_loss,
    reference_kl,
    sequence_logprob,
    token_nll,
)

FORGET = (
    "The harbour of Velmora opened in 1871. Its first master was Ada Quell.",
    "Kestrel Bank reported a profit of 41 million crowns in the spring.",
    "Question: In which year did the bridge open?\nAnswer: 1902",
)
RETAIN = (
    "The council of Dunmere voted 7 to 2 to close the old mill on the river.",
    "Question: Who founded the Orrin Guild?\nAnswer: Tamsin Vey",
    "The old mill on the river was the oldest building of Dunmere.",
)
REQUEST = ForgetRequest("single", 1, FORGET, RETAIN)
CTX = UnlearnContext(max_len=24)
BUILTINS = ["ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr", "tv", "whp"]
# Methods that train chosen parameters only; tests/test_methods_loss_b.py checks them.
TRAINS_A_SUBSET = {"rmu"}


@pytest.fixture(scope="module")
def target_state(tiny_tokenizer):
    """A tiny model fine-tuned on forget ∪ retain: the 'target' of these tests."""
    model = make_tiny_model(tiny_tokenizer)
    both = ForgetRequest("single", 0, FORGET + RETAIN, ())
    FinetuneNLL(lr=3e-3, epochs=30, batch_size=2).unlearn(model, tiny_tokenizer, both, CTX)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def target(tiny_tokenizer, target_state):
    model = make_tiny_model(tiny_tokenizer)
    model.load_state_dict(target_state)
    return model.eval()


def nll(model, tokenizer, texts) -> float:
    batch = pad_batch(pack_texts(texts, tokenizer, 24), tokenizer.pad_token_id)
    with torch.no_grad():
        return token_nll(model.eval(), batch).item()


# ---------------------------------------------------------------- losses, by hand


class FixedLM(nn.Module):
    """Predicts the same next-token distribution `probs` at every position."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.log_probs = torch.log(torch.tensor(probs))
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, t = input_ids.shape
        return SimpleNamespace(logits=(self.log_probs + self.shift).expand(b, t, -1))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def hand_batch():
    # Sequence 1: BOS, 1, 2 -> scores tokens 1 and 2. Sequence 2: BOS, 2 (+ padding).
    batch = pad_batch([torch.tensor([0, 1, 2]), torch.tensor([0, 2])], pad_id=0)
    batch["index"] = torch.tensor([0, 1])
    return batch


def test_token_nll_and_sequence_logprob_by_hand():
    model, batch = FixedLM([0.5, 0.3, 0.2]), hand_batch()
    expected = [math.log(0.3) + math.log(0.2), math.log(0.2)]
    assert sequence_logprob(model, batch).tolist() == pytest.approx(expected)
    assert token_nll(model, batch).item() == pytest.approx(-sum(expected) / 3)


def test_token_nll_equals_the_hf_causal_lm_loss(tiny_tokenizer, tiny_model):
    batch = pad_batch(pack_texts(FORGET, tiny_tokenizer, 24), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        ours = token_nll(tiny_model, batch)
        hf = tiny_model(**batch).loss
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)


def test_npo_loss_by_hand():
    beta = 0.1
    model, batch = FixedLM([0.5, 0.3, 0.2]), hand_batch()
    # Reference: uniform over 3 tokens, so log p_ref = n_tokens * log(1/3).
    ref_logp = torch.tensor([2 * math.log(1 / 3), math.log(1 / 3)])
    r = [math.log(0.3 * 0.2 * 9), math.log(0.2 * 3)]  # log p_θ(x) − log p_ref(x), by hand
    expected = -(2 / beta) * (log_sigmoid(-beta * r[0]) + log_sigmoid(-beta * r[1])) / 2

    loss = NPO(beta=beta).loss(model, batch, None, ReferenceProvider(forget_logprobs=ref_logp))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    direct = npo_loss(torch.tensor(r), torch.zeros(2), beta)
    assert direct.item() == pytest.approx(expected, rel=1e-6)
    # At r = 0 (the model is the reference) NPO's loss is (2/β)·log 2.
    assert npo_loss(torch.zeros(3), torch.zeros(3), beta).item() == pytest.approx(20 * math.log(2))


def test_kl_is_zero_for_the_reference_and_matches_torch_distributions():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 7)
    cur = ref + 0.7 * torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert kl_divergence(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-6)
    ours = kl_divergence(ref, cur, mask)
    per_token = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=ref), torch.distributions.Categorical(logits=cur)
    )
    assert ours.item() > 0
    assert ours.item() == pytest.approx(per_token[mask].mean().item(), rel=1e-5)
    # Direction: KL(p_ref ‖ p_θ), not KL(p_θ ‖ p_ref).
    assert ours.item() != pytest.approx(kl_divergence(cur, ref, mask).item(), rel=1e-3)


def test_reference_kl_on_a_model_and_its_frozen_copy(tiny_tokenizer, tiny_model):
    chunks = pack_texts(RETAIN, tiny_tokenizer, 24)
    batch = pad_batch(chunks, tiny_tokenizer.pad_token_id)
    ref = ReferenceProvider.build(
        tiny_model,
        chunks,
        tiny_tokenizer.pad_token_id,
        logprobs=False,
        keep_model=True,
        batch_size=4,
    )
    assert reference_kl(tiny_model, batch, ref).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(1.5)
    assert reference_kl(tiny_model, batch, ref).item() > 1e-4


# ---------------------------------------------------------------- training effects


def test_every_gradient_unlearner_changes_every_parameter(tiny_tokenizer, target_state):
    names = [n for n in UNLEARNERS.names() if issubclass(UNLEARNERS.get(n), GradientUnlearner)]
    assert set(names) >= {"ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr"}
    for name in names:
        if name in TRAINS_A_SUBSET:
            continue
        model = make_tiny_model(tiny_tokenizer)
        model.load_state_dict(target_state)
        cls = get_unlearner_class(name)
        # the embedded defaults supply what a method requires (pdu's eps)
        algo = cls(**{**cls.defaults_for(EMBEDDED), "lr": 1e-3, "epochs": 1, "batch_size": 2})
        out = algo.unlearn(model, tiny_tokenizer, REQUEST, CTX)
        for key, value in out.named_parameters():
            assert not torch.equal(value, target_state[key]), f"{name}: {key} has not changed"


def first_epoch_forgetting(cls, model, tokenizer, rise: float) -> tuple[float, float]:
    """(forget NLL rise, retain NLL change) at the first epoch whose forget NLL rose by
    `rise` nats, like MUSE's model selection stops at the first epoch that forgot enough."""
    forget0, retain0 = nll(model, tokenizer, FORGET), nll(model, tokenizer, RETAIN)
    algo = cls(lr=1e-3, epochs=15, batch_size=2)
    for cand in algo.candidates(model, tokenizer, REQUEST, CTX):
        d_forget = nll(cand.model, tokenizer, FORGET) - forget0
        if d_forget >= rise:
            return d_forget, nll(cand.model, tokenizer, RETAIN) - retain0
    raise AssertionError(f"{cls.__name__} did not raise the forget NLL by {rise} in 15 epochs")


def test_ga_raises_forget_nll_and_gdr_keeps_retain_nll(tiny_tokenizer, target, target_state):
    _, ga_retain = first_epoch_forgetting(GA, target, tiny_tokenizer, rise=1.0)
    model = make_tiny_model(tiny_tokenizer)
    model.load_state_dict(target_state)
    _, gdr_retain = first_epoch_forgetting(GA_GDR, model, tiny_tokenizer, rise=1.0)
    # Plain GA drags the retain set along; GDR forgets as much while keeping it.
    assert ga_retain > 0.3
    assert -1.0 < gdr_retain < 0.25
    assert ga_retain > gdr_retain + 0.4


def test_candidates_stop_early_without_error(tiny_tokenizer, target):
    gen = NPO(lr=1e-3, epochs=5, batch_size=2).candidates(target, tiny_tokenizer, REQUEST, CTX)
    first = next(gen)
    assert (first.label, first.step, first.path) == ("epoch_1", 1.0, None)
    gen.close()


# ---------------------------------------------------------------- task vector and WHP


def test_tv_alpha_zero_is_the_target_and_alpha_follows_the_formula(tiny_tokenizer, target):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    algo = TaskVector(alphas=(2.0, 0.0), ft_lr=3e-3, ft_epochs=2, ft_batch_size=2)
    reinforced = algo.reinforce(target, tiny_tokenizer, REQUEST, CTX)
    seen = []
    for cand in algo.candidates(target, tiny_tokenizer, REQUEST, CTX):
        seen.append(cand.label)
        for (key, p), ft in zip(
            cand.model.named_parameters(), reinforced.parameters(), strict=True
        ):
            t = before[key]
            if cand.step == 0.0:
                assert torch.equal(p, t), f"alpha=0 changed {key}"
            else:
                assert torch.allclose(p, t - 2.0 * (ft - t), atol=1e-6)
    assert seen == ["alpha_0", "alpha_2"]  # increasing α
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # untouched
    assert not torch.equal(reinforced.lm_head.weight, before["lm_head.weight"])


def test_whp_logits_follow_the_formula_and_cache_decoding_matches(tiny_tokenizer, target):
    reinforced = make_tiny_model(tiny_tokenizer, seed=7)
    whp = WHPModel(target, reinforced, alpha=3.0).eval()
    ids = pad_batch(pack_texts(FORGET[:1], tiny_tokenizer, 24)[:1], 0)["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        v_base, v_reinf = target(input_ids=ids).logits, reinforced(input_ids=ids).logits
        out = whp(ids, mask, None, None, False)
        assert out.cache is None
        assert torch.allclose(out.logits, v_base - 3.0 * torch.relu(v_reinf - v_base), atol=1e-6)
        assert (out.logits <= v_base + 1e-6).all()
        # Incremental decoding through the pair of caches gives the same last logits.
        n = ids.shape[1]
        pos = torch.arange(n).unsqueeze(0)
        step1 = whp(ids[:, :-1], mask[:, :-1], pos[:, :-1], None, True)
        step2 = whp(ids[:, -1:], mask, pos[:, -1:], step1.cache, True)
        assert isinstance(step2.cache, tuple) and len(step2.cache) == 2
        assert torch.allclose(step2.logits[:, -1], out.logits[:, -1], atol=1e-5)
    assert whp.config is target.config and whp.device == target.device


def test_whp_candidates_and_save_load_roundtrip(tiny_tokenizer, target, tmp_path):
    algo = WHP(alphas=(4.0, 1.0), ft_lr=3e-3, ft_epochs=1, ft_batch_size=2)
    cands = list(algo.candidates(target, tiny_tokenizer, REQUEST, CTX))
    assert [(c.label, c.step) for c in cands] == [("alpha_1", 1.0), ("alpha_4", 4.0)]
    whp = cands[-1].model
    assert isinstance(whp, WHPModel) and whp.alpha == 4.0 and whp.base is target
    path = save_model(whp, tiny_tokenizer, tmp_path / "whp")
    assert {p.name for p in path.iterdir()} >= {"base", "reinforced", "whp.json", "tokenizer.json"}
    loaded, tok = load_unlearned(path)
    assert isinstance(loaded, WHPModel) and loaded.alpha == 4.0
    ids = torch.tensor([tiny_tokenizer("The harbour of Velmora")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, whp(ids).logits, atol=1e-5)
    assert tok("Velmora")["input_ids"] == tiny_tokenizer("Velmora")["input_ids"]


# ---------------------------------------------------------------- registry and plugins


def test_registry_has_the_baselines_with_descriptions():
    assert set(BUILTINS) <= set(UNLEARNERS.names())
    for name in BUILTINS:
        cls = get_unlearner_class(name)
        assert issubclass(cls, Unlearner) and cls.name() == name
        assert cls.description() and "\n" not in cls.description()
    assert get_unlearner_class("npo") is NPO
    with pytest.raises(ConfigError, match="Did you mean: npo"):
        get_unlearner_class("nop")


PLUGIN = '''
"""A third-party unlearner in a plain file."""

from dataclasses import dataclass, field

from muse_bench.unlearners import GradientUnlearner, sequence_logprob
from muse_bench.unlearners.losses import npo_loss


@dataclass(kw_only=True)
class SimNPO(GradientUnlearner):
    """Reference-free NPO with length-normalised likelihood."""

    beta: float = field(default=2.5, metadata={"help": "inverse temperature"})
    gamma: float = field(default=0.0, metadata={"help": "reward margin"})

    def loss(self, model, forget, retain, ref):
        lengths = (forget["labels"][:, 1:] != -100).sum(-1)
        logp = sequence_logprob(model, forget) / lengths + self.gamma / self.beta
        return npo_loss(logp, logp.new_zeros(logp.shape), self.beta)


def not_an_unlearner():
    return 1
'''


def check_plugin(cls, tokenizer, target_state) -> None:
    assert cls.__name__ == "SimNPO" and cls.description().startswith("Reference-free NPO")
    algo = cls(beta=3.0, lr=1e-3, epochs=1, batch_size=2)
    model = make_tiny_model(tokenizer)
    model.load_state_dict(target_state)
    out = algo.unlearn(model, tokenizer, REQUEST, CTX)
    assert not torch.equal(out.lm_head.weight, target_state["lm_head.weight"])


def test_plugin_file_and_module_load_by_path(tiny_tokenizer, target_state, tmp_path, monkeypatch):
    path = tmp_path / "my_simnpo.py"
    path.write_text(textwrap.dedent(PLUGIN))
    check_plugin(get_unlearner_class(f"{path}:SimNPO"), tiny_tokenizer, target_state)

    monkeypatch.syspath_prepend(str(tmp_path))
    check_plugin(get_unlearner_class("my_simnpo:SimNPO"), tiny_tokenizer, target_state)
    with pytest.raises(ConfigError, match="not an Unlearner subclass"):
        get_unlearner_class(f"{path}:not_an_unlearner")
    with pytest.raises(ConfigError, match="has no attribute 'Missing'"):
        get_unlearner_class(f"{path}:Missing")


def test_plugin_from_an_installed_entry_point(tiny_tokenizer, target_state, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fake_muse_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "fake_muse_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-muse-plugin\nVersion: 0.1\n"
    )
    (site / "fake_muse_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[muse_bench.unlearners]\nsimnpo_ep = fake_muse_plugin_mod:SimNPO\n"
    )
    (site / "fake_muse_plugin_mod.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    # Let the registry scan entry points again; monkeypatch restores both afterwards.
    monkeypatch.setattr(UNLEARNERS, "_entry_points_loaded", False)
    monkeypatch.setattr(UNLEARNERS, "_items", dict(UNLEARNERS._items))

    assert "simnpo_ep" in UNLEARNERS.names()
    check_plugin(get_unlearner_class("simnpo_ep"), tiny_tokenizer, target_state)
