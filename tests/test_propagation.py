"""The error-propagating target (QwTConfig.propagation), attention-sink rows (diagnostics, exclude_sinks) and the
relative ridge: each checked against a restatement of its definition."""
import copy
import math

import pytest
import torch

import qwt
from qwt.compensation import LinearLeastSquares, QwTConfig
from qwt.compensation.sinks import SinkEnergy, sink_mask
from qwt.models.decoder_lm import build_from_config, tiny_config
from qwt.models.registry import get_model_entry
from qwt.quant.modules import quant_state
from qwt.tasks.llm.scoring import Scores, perplexity_interval

W4A8 = qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=8)


def _ids(n: int, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def quantised():
    torch.manual_seed(0)
    fp = build_from_config(config=tiny_config("llama"))
    return fp, qwt.quantize(copy.deepcopy(fp), _ids(4), W4A8)


def _restated_fits(model, ids, alpha: float, batch_size: int, ridge: float):
    """Each layer's (weight, bias) refitted from the definition: rows x_q (the compensated quantised stream),
    target α·FP-layer(x_fp) + (1 − α)·FP-layer(x_q) − Q-layer(x_q), x_fp the FP model's own stream."""
    plan = qwt.family_of(model).plan(model)
    batches = list(ids.split(batch_size))
    xq = [plan.stem(b) for b in batches]
    xfp = [x.clone() for x in xq]
    fits = []
    for step in plan.steps:
        layer = model.get_submodule(step.path)
        fit = LinearLeastSquares(ridge)
        outs = []
        for k in range(len(batches)):
            with quant_state(layer, weight=False, act=False):
                y_fp, y_stream = step.run(layer, xq[k]), step.run(layer, xfp[k])
            y_q = step.run(layer, xq[k])
            fit.update(xq[k], alpha * y_stream + (1 - alpha) * y_fp - y_q)
            outs.append((y_q, y_stream))
        result = fit.solve()
        fits.append((result.weight, result.bias))
        xq = [y_q + x @ result.weight + result.bias for (y_q, _), x in zip(outs, xq)]
        xfp = [y for _, y in outs]
    return fits


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_each_layer_fits_the_error_propagating_target(quantised, alpha):
    fp, ptq = quantised
    ids = _ids(16, seed=2)
    model = copy.deepcopy(ptq)
    qwt.apply_qwt(model, ids, QwTConfig(fp16_eval=False, ridge=1.0, propagation=alpha), batch_size=4,
                  progress=False)
    expected = _restated_fits(copy.deepcopy(ptq), ids, alpha, 4, 1.0)
    got = [(model.get_submodule(f"model.layers.{i}").comp_weight, model.get_submodule(f"model.layers.{i}").comp_bias)
           for i in range(2)]
    # The restatement's blend (α·a + (1−α)·b, and the compensation added as y + x@W + b) rounds differently from
    # the library's lerp and FP32 add: features differ by FP32 ulps, and a FP64 solve of a well-posed ridge
    # system moves by about as much relative to its solution.
    for (w, b), (w_ref, b_ref) in zip(got, expected):
        assert torch.allclose(w, w_ref, rtol=1e-3, atol=1e-5) and torch.allclose(b, b_ref, rtol=1e-3, atol=1e-5)
    # the first layer's input is the same on both streams, so only later layers can see α
    authors = copy.deepcopy(ptq)
    qwt.apply_qwt(authors, ids, QwTConfig(fp16_eval=False, ridge=1.0), batch_size=4, progress=False)
    first, second = (authors.get_submodule(f"model.layers.{i}").comp_weight for i in range(2))
    assert torch.allclose(first, got[0][0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(second, got[1][0], rtol=1e-2, atol=1e-4)


def test_alpha_zero_is_the_authors_target_bit_for_bit(quantised):
    _, ptq = quantised
    ids = _ids(8, seed=3)
    a, b = copy.deepcopy(ptq), copy.deepcopy(ptq)
    qwt.apply_qwt(a, ids, QwTConfig(fp16_eval=False, ridge=1.0), batch_size=4, progress=False)
    qwt.apply_qwt(b, ids, QwTConfig(fp16_eval=False, ridge=1.0, propagation=0.0), batch_size=4, progress=False)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_channelwise_form_takes_the_propagated_target_and_reports_sinks(quantised):
    _, ptq = quantised
    ids = _ids(16, seed=4)
    gains = {}
    for alpha in (0.0, 1.0):
        model = copy.deepcopy(ptq)
        reports = qwt.apply_qwt(model, ids, QwTConfig(fp16_eval=False, compensation="channelwise",
                                                      propagation=alpha), batch_size=4, progress=False)
        gains[alpha] = [m.gain for n, m in model.named_modules() if n.endswith("down_proj")]
        for r in reports:
            for share in r.extra["sinks_per_layer"].values():
                assert 0 <= share["position0_share"] <= share["sink_share"] <= 1
    assert torch.equal(gains[0.0][0], gains[1.0][0])  # layer 0: both streams enter it equal
    assert not torch.equal(gains[0.0][1], gains[1.0][1])


def test_sink_rows_are_position_zero_and_norm_outliers():
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    x[1, 5] *= 100
    mask = sink_mask(x, 20.0)
    assert mask[:, 0].all() and mask[1, 5] and int(mask.sum()) == 3
    energy = SinkEnergy(20.0)
    target = torch.ones(2, 10, 3)
    target[0, 0] = 3.0  # energy 27 at a position 0, 3 per other row
    energy.add(target, mask)
    report = energy.report()
    assert report["outlier_rows"] == 1 and report["rows"] == 20
    assert math.isclose(report["position0_share"], (27 + 3) / (27 + 19 * 3))
    assert math.isclose(report["outlier_share"], 3 / (27 + 19 * 3))


def test_excluding_sinks_fits_the_other_rows_only(quantised):
    _, ptq = quantised
    ids = _ids(8, seed=5)
    model = copy.deepcopy(ptq)
    reports = qwt.apply_qwt(model, ids, QwTConfig(fp16_eval=False, ridge=1.0, exclude_sinks=True), batch_size=8,
                            progress=False)
    layer = ptq.get_submodule("model.layers.0")
    plan = qwt.family_of(ptq).plan(ptq)
    x, run = plan.stem(ids), plan.steps[0].run
    with quant_state(layer, weight=False, act=False):
        y_fp = run(layer, x)
    target = y_fp - run(layer, x)
    keep = ~sink_mask(x)
    fit = LinearLeastSquares(1.0)
    fit.update(x[keep], target[keep])
    expected = fit.solve()
    assert torch.equal(model.get_submodule("model.layers.0").comp_weight, expected.weight)
    assert reports[0].extra["sinks"]["rows"] == ids.numel()


def test_sink_options_are_refused_where_they_cannot_apply():
    entry = get_model_entry("vit_fmnist")
    images = torch.rand(8, *entry.reduced_input)
    model = qwt.quantize(entry.build(pretrained=False, **entry.reduced), images[:4], qwt.PTQConfig(w_bits=8, a_bits=8))
    with pytest.raises(ValueError, match="exclude_sinks needs token-sequence features"):
        qwt.apply_qwt(model, images, QwTConfig(exclude_sinks=True), progress=False)
    for bad, match in [({"propagation": 1.5}, "propagation"), ({"propagation": -0.1}, "propagation"),
                       ({"relative_ridge": -1.0}, "relative_ridge"),
                       ({"relative_ridge": 0.1, "solver": "reference"}, "relative_ridge needs a streaming"),
                       ({"sink_norm_multiple": 1.0}, "sink_norm_multiple")]:
        with pytest.raises(ValueError, match=match):
            QwTConfig(**bad)


def test_vision_plans_with_transitions_carry_the_fp_stream():
    """Swin's patch merging runs uncompensated between stages: on the FP stream it must run in FP."""
    entry = get_model_entry("swin_tiny")
    model = entry.build(pretrained=False, **entry.reduced)
    images = torch.rand(8, *entry.reduced_input, generator=torch.Generator().manual_seed(0))
    model = qwt.quantize(model, images[:4], qwt.PTQConfig(w_bits=4, a_bits=4))
    reports = qwt.apply_qwt(model, images, QwTConfig(propagation=0.5, ridge=1.0), batch_size=4, progress=False)
    assert len(reports) > 2 and all(math.isfinite(r.r2) for r in reports if r.applied)
    assert torch.isfinite(model(images)).all()


def test_relative_ridge_is_that_fraction_of_the_mean_gram_diagonal():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 6, generator=g) * 3, torch.randn(64, 4, generator=g)
    relative = LinearLeastSquares(relative_ridge=0.05)
    relative.update(x, t)
    fit = relative.solve()
    lam = 0.05 * float((x.double() ** 2).sum(0).mean())
    absolute = LinearLeastSquares(ridge=lam)
    absolute.update(x, t)
    assert torch.allclose(fit.weight, absolute.solve().weight, rtol=1e-12, atol=1e-12)


def test_the_perplexity_interval_is_the_standard_error_of_the_window_means():
    means = torch.tensor([3.0, 3.2, 2.9, 3.4, 3.1], dtype=torch.float64)
    scores = Scores(float(means.sum() * 10), 50, torch.empty(0), means)
    low, high = perplexity_interval(scores)
    se = float(means.std(unbiased=True)) / math.sqrt(5)
    assert math.isclose(low, math.exp(float(means.mean()) - 1.96 * se), rel_tol=1e-12)
    assert math.isclose(high, math.exp(float(means.mean()) + 1.96 * se), rel_tol=1e-12)
    assert perplexity_interval(Scores(3.0, 10, torch.empty(0), means[:1])) is None
