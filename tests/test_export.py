"""ONNX export: simulation parity with the fake-quant model, integer kernels in the optimised W8A8 graph."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torchvision

import qwt
from qwt.data.fashion_mnist import load_fashion_mnist, normalize
from qwt.export import (OutputQuantized, calibrate_w8a8, export_onnx, fold_batchnorm, integer_nodes, qdq_view, run,
                        session)
from qwt.export.w8a8 import set_integer_grids
from qwt.compensation.channelwise import fold_channelwise
from qwt.ptq import calibrate
from qwt.ptq import act_quantizer, weight_quantizer
from qwt.quant.modules import QuantConv2d
from qwt.quant.quantizers import search_uniform

pytest.importorskip("onnxruntime")


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _compare(model: torch.nn.Module, images: torch.Tensor, tmp_path, mode: str = "simulate"):
    path = export_onnx(model, images[:1], tmp_path / f"{mode}.onnx", mode=mode)
    optimized = tmp_path / f"{mode}.opt.onnx"
    logits = run(session(path, optimized_path=optimized), images)
    with torch.no_grad():
        if mode == "w8a8":
            with qdq_view(model):
                reference = model(images)
        else:
            reference = model(images)
    return logits, reference, optimized


@pytest.fixture(scope="module")
def fmnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """32 calibration images, 128 compensation images (train) and 500 test images of Fashion-MNIST."""
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    return normalize(train[:32]), normalize(train[32:160]), normalize(test[:500])


@pytest.mark.parametrize("compensation", [None, "fp32", "fp16"])
def test_simulation_export_reproduces_repq_vit_w4a4(fmnist, tmp_path, compensation):
    """Trained vit_fmnist, RepQ-ViT W4A4: log-√2 softmax, fractional zero points, with or without QwT."""
    calib, comp, test = fmnist
    model = qwt.create_model("vit_fmnist")
    qwt.quantize(model, calib, qwt.PTQConfig(w_bits=4, a_bits=4))
    if compensation:
        qwt.apply_qwt(model, comp, qwt.QwTConfig(fp16_eval=compensation == "fp16"), progress=False)
    logits, reference, _ = _compare(model, test, tmp_path)
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean()
    error = (logits - reference).abs()
    # The stated tolerances. FP op order differs between torch and onnxruntime, so a value on a rounding
    # boundary can land one 4-bit code apart: ≥ 95 % of logits agree to 1e-3. onnxruntime's FP16 MatMul rounds
    # differently from torch's: with FP16 compensation, mean |Δ| ≤ 5 % of the logits' spread. Top-1: ≥ 98 %.
    if compensation == "fp16":
        assert error.mean() <= 0.05 * reference.std()
    else:
        assert (error <= 1e-3).float().mean() >= 0.95
    assert agree >= 0.98


def test_simulation_export_reproduces_percentile_cnn(tmp_path):
    """Random-weight ResNet-18 (per-channel weights, affine activations whose z may lie outside 0..L−1)."""
    model = _resnet18()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    qwt.quantize(model, calib, qwt.PTQConfig(method="percentile", w_bits=6, a_bits=6))
    logits, reference, _ = _compare(model, calib, tmp_path)
    assert ((logits - reference).abs() <= 1e-3).float().mean() >= 0.9


def test_w8a8_vit_runs_on_integer_matmuls(fmnist, tmp_path):
    calib, comp, test = fmnist
    model = calibrate_w8a8(qwt.create_model("vit_fmnist"), calib)
    qwt.apply_qwt(model, comp, qwt.QwTConfig(), progress=False)
    logits, reference, optimized = _compare(model, test, tmp_path, "w8a8")
    nodes = integer_nodes(optimized)
    # qkv, proj, fc1, fc2 and the two attention products of all 6 blocks run on integers.
    assert sum(nodes.values()) >= 6 * 6, nodes
    # Integer kernels accumulate exactly but requantise differently: agreement, not bit-identity.
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.97


def test_w8a8_cnn_runs_on_integer_convs(tmp_path):
    fp = _resnet18()
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = calibrate_w8a8(fp, calib)
    logits, reference, optimized = _compare(model, calib, tmp_path, "w8a8")
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    # Every conv but the stem (its output goes through MaxPool before any quantiser) is a QLinearConv.
    assert integer_nodes(optimized)["QLinearConv"] >= convs - 1
    assert (logits - reference).abs().mean() <= 0.05 * reference.std()


def _saturating_conv(images: torch.Tensor) -> OutputQuantized:
    """One quantised 3×3 conv (16 → 8 channels) whose activation codes (128..255) and weight codes (64..127) are
    both large and positive: each pair of products exceeds 32767, the 16-bit limit of the UINT8×INT8 kernels'
    pair sums on x86 without VNNI."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    conv.weight.data.uniform_(0.5, 1.0)
    model = OutputQuantized(QuantConv2d(conv, act_quantizer(8), weight_quantizer(8)), act_quantizer(8)).eval()
    set_integer_grids(model)
    with torch.no_grad():
        calibrate(model, images)
    return model


def test_w8a8_integer_conv_computes_the_qdq_view_without_saturating(tmp_path):
    """onnxruntime's fused QLinearConv gives the torch QDQ output: equal codes, or one output step apart where
    the requantisation rounds a tie differently. With INT8 weights on this project's AVX2 CPU (no VNNI) not one
    output matched, and the worst was 46 steps off."""
    images = torch.empty(8, 16, 12, 12).uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(1))
    model = _saturating_conv(images)
    logits, reference, optimized = _compare(model, images, tmp_path, "w8a8")
    assert integer_nodes(optimized)["QLinearConv"] == 1
    step = float(model.output_quantizer.delta)
    error = (logits - reference).abs()
    assert error.max() <= 1.01 * step
    assert (error <= 1e-4 * step).float().mean() >= 0.99
    onnx = pytest.importorskip("onnx")
    weight = next(t for t in onnx.load(str(tmp_path / "w8a8.onnx")).graph.initializer if len(t.dims) == 4)
    assert weight.data_type == onnx.TensorProto.UINT8


def test_weight_dtype_changes_storage_not_values():
    images = torch.empty(4, 16, 6, 6).uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(2))
    model = _saturating_conv(images)
    with torch.no_grad():
        outputs = []
        for dtype in ("uint8", "int8"):
            with qdq_view(model, weight_dtype=dtype):
                outputs.append(model(images))
        assert torch.equal(*outputs)
        with pytest.raises(ValueError, match="unknown weight_dtype"), qdq_view(model, weight_dtype="int4"):
            pass


def test_w8a8_export_refuses_simulation_only_quantizers(tiny_vit, images, tmp_path):
    qwt.quantize(tiny_vit, images, qwt.PTQConfig(w_bits=8, a_bits=8))  # log-√2, fractional z
    before = copy.deepcopy(tiny_vit.state_dict())
    with pytest.raises(ValueError, match="calibrate_w8a8"):
        export_onnx(tiny_vit, images[:1], tmp_path / "x.onnx", mode="w8a8")
    after = tiny_vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # quantisers restored
    assert "input_quantizer" in dict(tiny_vit.blocks[0].attn.qkv.named_children())


def test_fold_batchnorm_keeps_the_function():
    model = _resnet18()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm(model) == 20
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_integer_grids():
    rows = torch.randn(5, 300) + torch.arange(5.0)[:, None]  # some rows entirely positive
    delta, zero = search_uniform(rows, 8, "symmetric")
    assert torch.equal(zero, torch.full_like(zero, 128.0))
    delta, zero = search_uniform(rows, 8, "zero_included")
    assert ((zero >= 0) & (zero <= 255) & (zero == zero.round())).all()
    with pytest.raises(ValueError, match="unknown grid"):
        qwt.quant.UniformQuantizer(8, grid="log")


def test_missing_onnxruntime_names_the_pip_package(monkeypatch, tmp_path):
    real = importlib.import_module

    def fake(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        session(tmp_path / "none.onnx")


def test_cli_exports_a_saved_model(tiny_vit, images, tmp_path):
    from qwt.export.__main__ import main

    config = qwt.PTQConfig(w_bits=4, a_bits=4)
    qwt.quantize(tiny_vit, images, config)
    qwt.save_quantized(tiny_vit, tmp_path / "saved", "deit_tiny", config,
                       build_kwargs={"smoke": True, "num_classes": 10})
    main([str(tmp_path / "saved"), str(tmp_path / "m.onnx"), "--input-shape", "3", "32", "32"])
    logits = run(session(tmp_path / "m.onnx"), images[:4])
    with torch.no_grad():
        assert logits.shape == tiny_vit(images[:4]).shape


def test_cli_reports_a_missing_saved_model_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qwt.export", str(tmp_path / "nothing"), str(tmp_path / "m.onnx"),
                           "--input-shape", "3", "32", "32"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_channelwise_compensation_adds_no_node_to_the_w8a8_graph(tmp_path):
    fp = _resnet18()
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    plain = calibrate_w8a8(fp, calib)
    compensated = copy.deepcopy(plain)
    qwt.apply_qwt(compensated, calib, qwt.QwTConfig(compensation="channelwise"), progress=False)
    onnx = pytest.importorskip("onnx")
    graphs = [onnx.load(str(export_onnx(m, calib[:1], tmp_path / f"{i}.onnx", mode="w8a8"))).graph
              for i, m in enumerate((plain, compensated))]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    folded = copy.deepcopy(compensated)
    assert fold_channelwise(folded) == 8  # one conv per BasicBlock (conv2, inside its output quantiser)
    with torch.no_grad():
        torch.testing.assert_close(folded(calib), compensated(calib), rtol=1e-5, atol=1e-5)
