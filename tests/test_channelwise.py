"""Channel-wise affine compensation: closed-form fit, and folding into the layers (same codes, the same output up
to rounding)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import qwt
from qwt.compensation.channelwise import ChannelAffine, _AffineFit, fold_channelwise
from qwt.data.fashion_mnist import load_fashion_mnist, normalize


@pytest.fixture(scope="module")
def vit_w4a4() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    train, _ = load_fashion_mnist("train")
    calib, comp = normalize(train[:32]), normalize(train[32:160])
    model = qwt.create_model("vit_fmnist")
    qwt.quantize(model, calib, qwt.PTQConfig(w_bits=4, a_bits=4))
    return model, comp, normalize(train[1000:1200])


def test_affine_fit_recovers_gain_and_bias():
    torch.manual_seed(0)
    q = torch.randn(500, 8)
    gain, bias = torch.rand(8) + 0.5, torch.randn(8)
    fit = _AffineFit(-1)
    for chunk in range(5):  # streamed in batches
        rows = slice(100 * chunk, 100 * (chunk + 1))
        fit.update(q[rows], q[rows] * gain + bias)
    g, b, r2 = fit.solve()
    torch.testing.assert_close(g, gain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, bias, rtol=1e-5, atol=1e-5)
    assert r2 == pytest.approx(1.0)


def test_channelwise_targets_residual_branch_layers_and_reduces_their_error(vit_w4a4):
    model, comp, _ = vit_w4a4
    model = copy.deepcopy(model)
    reports = qwt.apply_qwt(model, comp, qwt.QwTConfig(compensation="channelwise"), progress=False)
    assert len(reports) == 6
    for report in reports:
        assert set(report.extra["r2_per_layer"]) == {"attn.proj", "mlp.fc2"}
        assert all(r2 > 0 for r2 in report.extra["r2_per_layer"].values())  # least squares beats no correction
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ChannelAffine)]
    assert wrapped and all(n.endswith(("attn.proj", "mlp.fc2")) for n in wrapped)
    assert not any(isinstance(m, qwt.compensation.Compensated) for m in model.modules())


def test_channelwise_with_features_on_disk_is_identical(vit_w4a4, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, comp, test = vit_w4a4
    in_memory, on_disk = copy.deepcopy(model), copy.deepcopy(model)
    r_mem = qwt.apply_qwt(in_memory, comp, qwt.QwTConfig(compensation="channelwise"), progress=False)
    r_disk = qwt.apply_qwt(on_disk, comp, qwt.QwTConfig(compensation="channelwise", feature_device="disk"),
                           progress=False)
    assert [r.extra for r in r_mem] == [r.extra for r in r_disk]
    a, b = in_memory.state_dict(), on_disk.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == []


def test_folding_gives_the_same_output_and_no_extra_parameters(vit_w4a4, agree_up_to_code_ties):
    """What folding guarantees, on any CPU: the same weight codes, and each folded layer equal to layer·g + b up to
    the rounding of its GEMM. Not bit-identical logits: Δ·g and g·(dequantised weight) round differently, and a
    downstream 4-bit activation whose input sits within that rounding of a tie takes the neighbouring code (on
    AVX2 and AVX-512 kernels 1-3 of 200 images move by up to 0.08)."""
    model, comp, test = vit_w4a4
    plain = copy.deepcopy(model)
    model = copy.deepcopy(model)
    qwt.apply_qwt(model, comp, qwt.QwTConfig(compensation="channelwise"), progress=False)
    affines = {n: m for n, m in model.named_modules() if isinstance(m, ChannelAffine)}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [a.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n, a in affines.items()]
    with torch.no_grad():
        before = model(test)
        for h in hooks:
            h.remove()
        folded = copy.deepcopy(model)
        assert fold_channelwise(folded) == 12
        after = folded(test)
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        for name, affine in affines.items():
            layer, original = folded.get_submodule(name), affine.layer
            q, q0 = layer.weight_quantizer, original.weight_quantizer
            # Codes: W·g / (Δ·g) is W/Δ up to three roundings (≤ 2u·|W/Δ| ≤ 2u·8 code units at 4 bits), which
            # move a code only that close to a tie: a code one step off is a ~1e-6 event; allow 1e-3 of them.
            moved = torch.round(layer.weight / q.delta) - torch.round(original.weight / q0.delta)
            assert moved.abs().max() <= 1 and (moved != 0).float().mean() <= 1e-3, name
            x, expected = seen[name]
            # Same codes and inputs; the GEMM sums K products in another order: |error| ≤ 2·γ_K·Σ|x||w|·|g| +
            # rounding of the bias terms (γ_K ≈ K·u), the standard bound, with a factor 2 for the two computations.
            xq, wq = original.input_quantizer(x), original.quantized_weight()
            k = wq.shape[1]
            bound = 4 * k * 2.0**-24 * ((xq.abs() @ wq.abs().T) * affine.gain.abs() + affine.shift.abs()
                                 + (original.bias.abs() * affine.gain.abs() if original.bias is not None else 0))
            assert ((layer(x) - expected).abs() <= bound + 1e-30).all(), name
    # End to end, a statistical statement (see the fixture): the fold moves activations by about an ulp (the bound
    # above), and a downstream code moves only where its input lies that close to a tie. The one-ulp estimate here
    # is ≈ 0.06 codes per image; observed on AVX2 / AVX-512 kernels: 3 / 1 of 200 images changed.
    agree_up_to_code_ties(folded, test[:8], after, before)


def test_config_rejects_unknown_compensation():
    with pytest.raises(ValueError, match="channelwise"):
        qwt.QwTConfig(compensation="diagonal")


def test_channelwise_needs_the_family_residual_branches(vit_w4a4):
    model, comp, _ = vit_w4a4
    model = copy.deepcopy(model)
    silent = dataclasses.replace(qwt.family_of(model), residual_branches=None)
    with pytest.raises(ValueError, match="residual branches"):
        qwt.apply_qwt(model, comp, qwt.QwTConfig(compensation="channelwise"), family=silent, progress=False)
    with pytest.raises(ValueError, match="residual_branches"):
        qwt.compensation.fit_compensation(model, qwt.family_of(model).plan(model), comp,
                                          qwt.QwTConfig(compensation="channelwise"), progress=False)
    assert not any(isinstance(m, ChannelAffine) for m in model.modules())
