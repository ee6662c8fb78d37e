"""Channel-wise affine compensation: closed-form fit, and folding into the layers with an identical output."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import qwt
from qwt.compensation.channelwise import ChannelAffine, _AffineFit, fold_channelwise
from qwt.data.fashion_mnist import load_fashion_mnist, normalize
from qwt.errors import InputError


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


def test_folding_gives_the_same_output_and_no_extra_parameters(vit_w4a4):
    model, comp, test = vit_w4a4
    plain = copy.deepcopy(model)
    model = copy.deepcopy(model)
    qwt.apply_qwt(model, comp, qwt.QwTConfig(compensation="channelwise"), progress=False)
    with torch.no_grad():
        before = model(test)
        assert fold_channelwise(model) == 12
        after = model(test)
    assert not any(isinstance(m, ChannelAffine) for m in model.modules())
    # Same integer codes, scale and bias multiplied by g: equal up to FP rounding of g·Δ.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


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


def test_saving_channelwise_compensation_is_refused(vit_w4a4, tmp_path):
    model, comp, _ = vit_w4a4
    model = copy.deepcopy(model)
    qwt.apply_qwt(model, comp, qwt.QwTConfig(compensation="channelwise"), progress=False)
    with pytest.raises(InputError, match="channel-wise compensation.*export"):
        qwt.save_quantized(model, tmp_path / "saved", "vit_fmnist", qwt.PTQConfig(w_bits=4, a_bits=4))
    assert not (tmp_path / "saved").exists()
