"""The held-out guard in the library: which batches the fit holds out (reported once, the same ones it leaves out
of the fit), and the model-level half (qwt.compensation.model_guard) with a fake score and on a real classifier."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwt
from qwt.compensation import (BlockPlan, BlockReport, ChannelAffine, LinearCompensated, Step, fit_compensation,
                              heldout_inputs, model_guard)
from qwt.errors import InputError
from qwt.ptq.baselines import act_quantizer
from qwt.quant.modules import QuantLinear, quant_state
from qwt.quant.rtn import MinMaxWeightQuantizer


# -- which batches are held out --------------------------------------------------------------------------------

def _rows() -> torch.Tensor:
    """16 samples of 24 feature rows: 8 batches of 2 at batch size 2."""
    return torch.randn(16, 24, 16, generator=torch.Generator().manual_seed(5))


def _fit(images, fraction: float, form: str) -> tuple[nn.Module, qwt.compensation.BlockReports]:
    """One block of one quantised Linear, compensated on ``images`` (a tensor of feature rows or a list of
    batches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(QuantLinear(nn.Linear(16, 16), act_quantizer(4), MinMaxWeightQuantizer(4))))
    qwt.calibrate(model, _rows()[:2])
    plan = BlockPlan(stem=lambda b: b, steps=[Step("0")], form="linear", check_inputs=lambda b, what: b)
    config = qwt.QwTConfig(guard_fraction=fraction, fp16_eval=False, compensation=form)
    reports = fit_compensation(model, plan, images, config, batch_size=2, progress=False,
                               residual_branches=lambda m, path: ["0"])
    return model, reports


def _correction(model: nn.Module) -> list[torch.Tensor]:
    """The fitted compensation: the dense map, or the channel-wise gain and bias."""
    if isinstance(model[0], LinearCompensated):
        return [model[0].comp_weight, model[0].comp_bias]
    assert isinstance(model[0][0], ChannelAffine)
    return [model[0][0].gain, model[0][0].shift]


@pytest.mark.parametrize("form", ["dense", "channelwise"])
def test_the_reported_heldout_batches_are_the_ones_left_out_of_the_fit(form):
    """Fitting with the guard on every batch equals fitting without it on the batches it did not report held out,
    bit for bit; the guard's held-out error is the uncompensated error of the reported batches' rows."""
    x = _rows()
    batches = list(x.split(2))
    guarded, reports = _fit(x, 0.25, form)
    assert reports.heldout == (3, 7)  # 8 batches, a quarter held out, spread evenly
    assert torch.equal(heldout_inputs(x, 2, 0.25), torch.cat([batches[3], batches[7]]))
    kept = [b for k, b in enumerate(batches) if k not in reports.heldout]
    plain, unguarded = _fit(torch.cat(kept), 0.0, form)
    assert unguarded.heldout == ()
    assert all(torch.equal(a, b) for a, b in zip(_correction(guarded), _correction(plain), strict=True))
    _, from_a_list = _fit(batches, 0.25, form)  # an iterable of batches: the same batches held out
    assert from_a_list.heldout == reports.heldout
    if form == "dense":
        block = copy.deepcopy(guarded[0].block)
        held = heldout_inputs(x, 2, 0.25)
        with torch.no_grad(), quant_state(block, weight=False, act=False):
            fp = block(held)
        with torch.no_grad():
            error = float((fp - block(held)).double().pow(2).sum())
        assert reports[0].extra["guard"]["heldout_error"] == pytest.approx(error, rel=1e-6)


def test_heldout_inputs_refuses_an_iterable_and_is_empty_without_the_guard():
    x = _rows()
    assert heldout_inputs(x, 2, 0.0).shape == (0, 24, 16)
    with pytest.raises(InputError, match="takes a tensor"):
        heldout_inputs(list(x.split(2)), 2, 0.25)
    with pytest.raises(ValueError, match="needs batches both to fit and to hold out"):
        heldout_inputs(x, 16, 0.25)


# -- the model-level guard, with a fake score -------------------------------------------------------------------

def _compensated(blocks: int) -> tuple[nn.Module, nn.Module, list[BlockReport]]:
    """(base, the base with every block compensated, their reports)."""
    base = nn.Sequential(*(nn.Linear(2, 2) for _ in range(blocks)))
    model = nn.Sequential(*(LinearCompensated(copy.deepcopy(b), torch.ones(2, 2), torch.ones(2), False)
                            for b in base))
    return base, model, [BlockReport(i, str(i), 0.5, True, 0.0) for i in range(blocks)]


def _depth_score(scores: dict[int, float]):
    """A fake score: looked up by how many leading blocks are compensated; records each model scored."""
    seen = []

    def score(model: nn.Module) -> float:
        depth = next((i for i, b in enumerate(model) if not isinstance(b, LinearCompensated)), len(model))
        seen.append(depth)
        return scores[depth]

    return score, seen


def test_model_guard_keeps_every_block_when_the_compensated_model_beats_the_base():
    base, model, reports = _compensated(4)
    score, seen = _depth_score({4: 1.0})
    kept, decision = model_guard(base, model, reports, score, 2.0)
    assert kept is model and seen == [4]
    assert decision == {"heldout_score": 2.0, "heldout_score_by_depth": {"4": 1.0}, "depth": 4, "kept": True}
    assert all(r.applied and "dropped_by_model_guard" not in r.extra for r in reports)


def test_model_guard_cuts_to_the_best_depth_below_the_base():
    base, model, reports = _compensated(4)
    score, seen = _depth_score({4: 3.0, 3: 2.5, 2: 1.5, 1: 1.8})
    kept, decision = model_guard(base, model, reports, score, 2.0)
    assert seen == [4, 3, 2, 1]  # all blocks, then ¾, ½, ¼ of them
    assert kept is model and decision["depth"] == 2 and decision["kept"]
    assert decision["heldout_score_by_depth"] == {"1": 1.8, "2": 1.5, "3": 2.5, "4": 3.0}
    assert [isinstance(b, LinearCompensated) for b in kept] == [True, True, False, False]
    assert [r.applied for r in reports] == [True, True, False, False]
    assert [r.extra.get("dropped_by_model_guard") for r in reports] == [None, None, True, True]


def test_model_guard_returns_the_base_when_no_depth_beats_it():
    base, model, reports = _compensated(4)
    score, _ = _depth_score({4: 3.0, 3: 2.5, 2: 2.0, 1: 2.2})  # a tie with the base is not better
    kept, decision = model_guard(base, model, reports, score, 2.0)
    assert kept is base and decision["depth"] == 0 and not decision["kept"]
    assert not any(r.applied for r in reports) and all(r.extra["dropped_by_model_guard"] for r in reports)


def test_model_guard_tries_the_depths_it_is_given_and_refuses_others():
    base, model, reports = _compensated(4)
    score, seen = _depth_score({4: 3.0, 2: 1.0})
    assert model_guard(base, model, reports, score, 2.0, depths=(0.5,))[1]["depth"] == 2 and seen == [4, 2]
    with pytest.raises(ValueError, match="fractions of the compensated blocks in"):
        model_guard(base, model, reports, score, 2.0, depths=(0.5, 1.0))


# -- a vision caller ---------------------------------------------------------------------------------------------

def test_a_classifier_keeps_no_worse_a_model_than_its_baseline_on_the_heldout_images():
    """The docstring's recipe on the Fashion-MNIST ViT: score = MSE to the FP logits on the held-out images."""
    from qwt.data.fashion_mnist import load_fashion_mnist, normalize

    train, _ = load_fashion_mnist("train")
    fp = qwt.create_model("vit_fmnist")
    base = qwt.quantize(copy.deepcopy(fp), normalize(train[:32]), qwt.PTQConfig(w_bits=4, a_bits=4))
    model, comp = copy.deepcopy(base), normalize(train[32:160])
    config = qwt.QwTConfig(guard_fraction=0.25)
    held = heldout_inputs(comp, 32, config.guard_fraction)
    reports = qwt.apply_qwt(model, comp, config, batch_size=32, progress=False)
    assert reports.heldout == (3,) and torch.equal(held, comp[96:128])

    @torch.no_grad()
    def score(m: nn.Module) -> float:
        return float(F.mse_loss(m(held), fp(held)))

    kept, decision = model_guard(base, model, reports, score, score(base))
    assert score(kept) <= score(base) and decision["heldout_score"] == score(base)
    assert score(kept) == min([score(base)] + list(decision["heldout_score_by_depth"].values()))
    assert sum(r.applied for r in reports) <= decision["depth"]
