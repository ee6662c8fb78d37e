"""The block-wise QwT procedure on random-init ViT and CNN: error reduction, gate, FP16 path, determinism."""
import copy

import pytest
import timm
import torch

from qwt import PTQConfig, QwTConfig, apply_qwt, quantize
from qwt.compensation import BlockPlan, Compensated, ConvCompensated, LinearCompensated, Step
from qwt.models import efficientnet_plan, vit_plan
from qwt.quant import quant_state


def _block_errors(model, fp_model, plan_fn, images):
    """Per block: ‖FP block(x) − model block(x)‖ on the model's own input stream."""
    plan = plan_fn(model)
    errs = []
    x = plan.stem(images)
    for step in plan.steps:
        block = model.get_submodule(step.path)
        with quant_state(block, weight=False, act=False):
            target = (block.block if isinstance(block, Compensated) else block)(x)
        y = block(x)
        errs.append((target - y).pow(2).mean().item())
        x = y
    return errs


@pytest.fixture
def quantized_vit(tiny_vit, images):
    return quantize(copy.deepcopy(tiny_vit), images, PTQConfig(w_bits=4, a_bits=4))


def test_compensation_reduces_block_error_on_calibration_data(quantized_vit, tiny_vit):
    comp = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    before = copy.deepcopy(quantized_vit)
    reports = apply_qwt(quantized_vit, comp, QwTConfig(fp16_eval=False), progress=False)
    assert [r.path for r in reports] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(r.applied and r.r2 > 0 for r in reports)
    assert isinstance(quantized_vit.blocks[0], LinearCompensated)
    # First block sees the same input in both models: its error must drop.
    e_before = _block_errors(before, tiny_vit, vit_plan, comp)
    e_after = _block_errors(quantized_vit, tiny_vit, vit_plan, comp)
    assert e_after[0] < e_before[0]
    assert all(a < b for a, b in zip(e_after, e_before))


def test_gate_zeroes_blocks_below_threshold_or_start_block(quantized_vit, images):
    reference = quantized_vit(images)
    gated = copy.deepcopy(quantized_vit)
    reports = apply_qwt(gated, images, QwTConfig(r2_threshold=1.0), progress=False)
    assert not any(r.applied for r in reports)
    assert all(torch.count_nonzero(b.comp_weight) == 0 for b in gated.blocks)
    assert torch.equal(gated(images), reference)  # zero compensation leaves the model's function unchanged
    partial = copy.deepcopy(quantized_vit)
    reports = apply_qwt(partial, images, QwTConfig(start_block=2), progress=False)
    assert [r.applied for r in reports] == [False, False, True]
    assert torch.count_nonzero(partial.blocks[2].comp_weight) > 0


def test_rerun_with_same_seed_is_identical(tiny_vit, images):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = quantize(copy.deepcopy(tiny_vit), images, PTQConfig())
        apply_qwt(model, images, QwTConfig(), progress=False)
        outs.append(model(images))
    assert torch.equal(outs[0], outs[1])


def test_reference_solver_agrees_with_streaming(quantized_vit, images):
    comp = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    a, b = copy.deepcopy(quantized_vit), copy.deepcopy(quantized_vit)
    ra = apply_qwt(a, comp, QwTConfig(fp16_eval=False), progress=False)
    rb = apply_qwt(b, comp, QwTConfig(fp16_eval=False, solver="reference"), progress=False)
    for x, y in zip(ra, rb):
        assert x.r2 == pytest.approx(y.r2, abs=1e-3)
    # FP32 explicit inverse against FP64 Cholesky: compensation weights differ by ~1e-9 here, far below what moves
    # a 4-bit code downstream except at a tie (outputs were equal on default, AVX2 and AVX-512 kernels).
    assert torch.allclose(a(images), b(images), atol=1e-3, rtol=1e-3)


def test_transition_steps_are_applied_but_not_compensated(quantized_vit, images):
    plan = vit_plan(quantized_vit)
    plan = BlockPlan(plan.stem, [plan.steps[0], Step("blocks.1", compensate=False), plan.steps[2]], "linear")
    reports = apply_qwt(quantized_vit, images, plan=plan, progress=False)
    assert [r.path for r in reports] == ["blocks.0", "blocks.2"]
    assert not isinstance(quantized_vit.blocks[1], Compensated)


def test_cnn_grouped_conv_compensation_on_efficientnet():
    torch.manual_seed(0)
    fp = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    comp = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = quantize(copy.deepcopy(fp), calib, PTQConfig(baseline="percentile", w_bits=4, a_bits=4))
    before = copy.deepcopy(model)
    reports = apply_qwt(model, comp, batch_size=16, progress=False)
    assert len(reports) == sum(len(s) for s in fp.blocks)
    strided = [r for r in reports if r.extra["stride"] == 2]
    assert strided and all(r.extra["kernel_size"] == 1 for r in reports)
    first = model.blocks[0][0]
    assert isinstance(first, ConvCompensated) and first.comp_weight.shape[:2] == (16, 32)  # 32 → 16 channels
    e_before = _block_errors(before, fp, efficientnet_plan, comp)
    e_after = _block_errors(model, fp, efficientnet_plan, comp)
    assert e_after[0] < e_before[0]


def test_no_images_is_refused(quantized_vit):
    with pytest.raises(ValueError, match="no compensation images"):
        apply_qwt(quantized_vit, [], progress=False)


def test_nan_features_are_refused(quantized_vit, images):
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        apply_qwt(quantized_vit, bad, progress=False)


def test_underdetermined_compensation_is_left_out_and_reported(quantized_vit, images):
    # 2 images × 17 tokens = 34 rows for 49 unknowns: any fit is exact on its rows (R² = 1), a pure overfit.
    reference = quantized_vit(images)
    fitted = copy.deepcopy(quantized_vit)
    with pytest.warns(RuntimeWarning, match="34 rows for 49 unknowns"):
        reports = apply_qwt(fitted, images[:2], progress=False)
    assert not any(r.applied for r in reports)
    assert all("34 rows for 49 unknowns" in r.extra["skipped"] for r in reports)
    assert all(r.to_dict()["r2"] is None for r in reports)
    assert torch.equal(fitted(images), reference)
    # The authors' behaviour (fit anyway) reports a near-perfect in-sample fit.
    overfit = apply_qwt(copy.deepcopy(quantized_vit), images[:2], QwTConfig(skip_degenerate=False), progress=False)
    assert overfit[0].applied and overfit[0].r2 > 0.9


def test_constant_images_interpolated_exactly_are_left_out(quantized_vit, images):
    constant = torch.full((64, 3, 32, 32), 0.5)  # every image the same: at most 17 distinct rows of 49 unknowns
    fitted = copy.deepcopy(quantized_vit)
    with pytest.warns(RuntimeWarning, match="rank-deficient features .* fitted exactly"):
        reports = apply_qwt(fitted, constant, progress=False)
    assert not any(r.applied for r in reports)
    assert torch.equal(fitted(images), quantized_vit(images))
    # Fitted anyway, the pseudo-inverse interpolates the duplicated rows: R² = 1 in-sample.
    overfit = apply_qwt(copy.deepcopy(quantized_vit), constant, QwTConfig(skip_degenerate=False), progress=False)
    assert all(r.applied and r.r2 > 0.999 for r in overfit)
