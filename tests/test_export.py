"""ONNX export: simulation parity with the fake-quant model, integer kernels in the optimised W8A8 graph."""
from __future__ import annotations

import copy
import errno
import importlib
import os
from pathlib import Path

import pytest
import torch
import torchvision

import qwt
from qwt.compensation.modules import compensation_precision
from qwt.errors import InputError
from qwt.data.fashion_mnist import load_fashion_mnist, normalize
from qwt.export import (OutputQuantized, calibrate_w8a8, export_onnx, fold_batchnorm, integer_nodes, qdq_view,
                        resolve_weight_dtype, run, session, weight_dtype_of)
from qwt.export.w8a8 import set_integer_grids
from qwt.compensation.channelwise import ChannelAffine, fold_channelwise
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
            with compensation_precision(model, half=False):  # what the simulation export computes by default
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
    # boundary can land one 4-bit code apart: ≥ 95 % of logits agree to 1e-3, top-1 ≥ 98 %. A model that runs its
    # compensation in FP16 is exported (and compared) with it in FP32: onnxruntime's FP16 product rounds
    # differently from torch's.
    assert (error <= 1e-3).float().mean() >= 0.95
    assert agree >= 0.98


def test_simulation_export_reproduces_percentile_cnn(tmp_path):
    """Random-weight ResNet-18 (per-channel weights, affine activations whose z may lie outside 0..L−1)."""
    model = _resnet18()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    qwt.quantize(model, calib, qwt.PTQConfig(baseline="percentile", w_bits=6, a_bits=6))
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


@pytest.mark.parametrize("weight_dtype", ["uint8", "int8"])
def test_w8a8_integer_conv_computes_the_qdq_view_without_saturating(tmp_path, weight_dtype):
    """Both weight storages, built explicitly on any CPU: the graph stores the weights in that dtype, records it,
    and runs as one QLinearConv. The fused kernel gives the torch QDQ output (equal codes, or one output step apart
    where the requantisation rounds a tie differently) with UINT8 weights on any CPU, and with INT8 weights where
    the CPU has VNNI or AMX (what ``auto`` picks INT8 for). Without them the INT8 kernels saturate: on this
    project's earlier AVX2 CPU not one output matched, and the worst was 46 steps off."""
    onnx = pytest.importorskip("onnx")
    images = torch.empty(8, 16, 12, 12).uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(1))
    model = _saturating_conv(images)
    path = export_onnx(model, images[:1], tmp_path / "w8a8.onnx", mode="w8a8", weight_dtype=weight_dtype)
    optimized = tmp_path / "w8a8.opt.onnx"
    logits = run(session(path, optimized_path=optimized), images)
    assert integer_nodes(optimized)["QLinearConv"] == 1
    weight = next(t for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 4)
    assert weight.data_type == getattr(onnx.TensorProto, weight_dtype.upper())
    assert weight_dtype_of(path) == weight_dtype
    if weight_dtype == "int8" and resolve_weight_dtype("auto") != "int8":
        return  # no VNNI/AMX here: INT8 products saturate, so only the graph is checked
    with torch.no_grad(), qdq_view(model, weight_dtype=weight_dtype):
        reference = model(images)
    step = float(model.output_quantizer.delta)
    error = (logits - reference).abs()
    assert error.max() <= 1.01 * step
    assert (error <= 1e-4 * step).float().mean() >= 0.99


@pytest.mark.parametrize("flags, expected", [("fpu sse avx2 avx512f avx512bw avx512_vnni", "int8"),
                                             ("fpu avx2 avx_vnni", "int8"), ("fpu avx2 amx_tile amx_int8", "int8"),
                                             ("fpu avx2 avx512f avx512bw", "uint8"), (None, "uint8")])
def test_auto_weight_dtype_follows_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    """``auto`` reads /proc/cpuinfo's flags (here a stand-in): INT8 with VNNI or AMX, UINT8 without or when
    unreadable; a named dtype is kept; the export records the dtype it used, never "auto"."""
    import qwt.environment

    monkeypatch.setattr(qwt.environment, "cpuinfo_field", lambda name: flags if name == "flags" else None)
    assert resolve_weight_dtype() == resolve_weight_dtype("auto") == expected
    assert [resolve_weight_dtype(d) for d in ("uint8", "int8")] == ["uint8", "int8"]
    with pytest.raises(ValueError, match="unknown weight_dtype"):
        resolve_weight_dtype("int4")
    images = torch.empty(2, 16, 6, 6).uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(2))
    path = export_onnx(_saturating_conv(images), images[:1], tmp_path / "auto.onnx", mode="w8a8")
    assert weight_dtype_of(path) == expected
    assert weight_dtype_of(export_onnx(_saturating_conv(images), images[:1], tmp_path / "sim.onnx")) is None


def _export_conv(path: Path, **kwargs) -> tuple[Path, torch.Tensor]:
    images = torch.empty(2, 16, 6, 6).uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(2))
    return export_onnx(_saturating_conv(images), images[:1], path, **kwargs), images


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stage", ["trace", "save", "check", "size"])
def test_a_failed_export_leaves_the_previous_file_as_it_was(tmp_path, monkeypatch, stage):
    """The disk fills while the tracer writes (after an external-data file beside the model, as it writes for
    models over 2 GiB), or while the finished graph is saved; the user interrupts; the graph is too large for one
    file. Each time the file exported before is byte-identical and nothing else is left in its folder."""
    onnx = pytest.importorskip("onnx")
    import qwt.export.writer

    path, _ = _export_conv(tmp_path / "m.onnx")
    before = path.read_bytes()
    trace = torch.onnx.export

    def trace_until_full(model, args, f, **kwargs):
        trace(model, args, f, **kwargs)
        Path(f).with_name("onnx__Conv_0").write_bytes(bytes(64))
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise _disk_full()

    def save_until_full(proto, f, *args, **kwargs):
        Path(f).write_bytes(proto.SerializeToString()[:100])
        raise _disk_full()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    failure = {"trace": (torch.onnx, "export", trace_until_full, OSError),
               "save": (onnx, "save", save_until_full, OSError),
               "check": (onnx.checker, "check_model", interrupt, KeyboardInterrupt),
               "size": (qwt.export.writer, "MAX_FILE_BYTES", 100, InputError)}
    target, name, replacement, error = failure[stage]
    monkeypatch.setattr(target, name, replacement)
    with pytest.raises(error) as raised:  # another file than the first: the old code would have left it
        _export_conv(path, mode="w8a8", weight_dtype="uint8")
    if stage == "size":
        assert "larger than the 2 GiB one ONNX file can hold" in str(raised.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_an_export_replaces_the_previous_file_with_a_loadable_one(tmp_path):
    path, images = _export_conv(tmp_path / "m.onnx")
    _export_conv(path, mode="w8a8", weight_dtype="uint8")
    assert weight_dtype_of(path) == "uint8"
    assert run(session(path), images).shape == (2, 8, 6, 6)
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # as a plain open would create it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "plain"]


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


@pytest.mark.parametrize("target", ["model.safetensors", "qwt.json"])
def test_cli_refuses_to_write_over_the_saved_model(tiny_vit, images, tmp_path, target):
    """Before, ``python -m qwt.export SAVED SAVED/model.safetensors`` replaced the saved tensors with the ONNX file
    and exited 0: the saved model was lost."""
    from qwt.export.__main__ import main

    config = qwt.PTQConfig(w_bits=4, a_bits=4)
    qwt.quantize(tiny_vit, images, config)
    saved = qwt.save_quantized(tiny_vit, tmp_path / "saved", "deit_tiny", config,
                               build_kwargs={"smoke": True, "num_classes": 10})
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(InputError, match="is a file of the saved model"):
        main([str(saved), str(saved / ".." / "saved" / target), "--input-shape", "3", "32", "32"])
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_cli_exports_a_saved_language_model_with_its_cache(tmp_path, capsys):
    """A saved decoder LM with rtn weight groups goes to the language-model writer (token ids and a KV cache, no
    --input-shape); its file runs in onnxruntime and computes the saved model."""
    pytest.importorskip("transformers")
    from qwt.export import __main__ as cli
    from qwt.export.lm_runtime import OnnxLM
    from qwt.models.decoder_lm import build_from_config, tiny_config
    from qwt.ptq.baselines import make_baseline

    lm = build_from_config(config=tiny_config())
    config = qwt.PTQConfig(baseline=make_baseline("rtn", {"group_size": 32}), w_bits=4, a_bits=16)
    qwt.quantize(lm, torch.randint(0, 128, (2, 8)), config)
    saved = qwt.save_quantized(lm, tmp_path / "lm", "hf_causal_lm", config, {"config": tiny_config()})
    with pytest.raises(InputError, match="--input-shape is for image models"):
        cli.main([str(saved), str(tmp_path / "lm.onnx"), "--input-shape", "1", "1", "16"])
    assert not (tmp_path / "lm.onnx").exists()
    cli.main([str(saved), str(tmp_path / "lm.onnx")])
    assert "MatMulNBits" in capsys.readouterr().out
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = lm.eval()(input_ids=ids).logits
    assert (OnnxLM(tmp_path / "lm.onnx", 1)(ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()


def test_cli_reports_a_missing_saved_model_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qwt.export", str(tmp_path / "nothing"), str(tmp_path / "m.onnx"),
                           "--input-shape", "3", "32", "32"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_channelwise_compensation_adds_no_node_to_the_w8a8_graph(tmp_path, one_ulp_tie_rate, changes_allowed):
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
    # Each folded conv sits inside its 8-bit output quantiser, which absorbs the fold's rounding (Δ·g against
    # g·dequantised weight, another GEMM order) unless a value lies within that rounding of a tie. So: an image
    # whose codes at those quantisers all agree has bit-identical logits (the rest is the same computation on the
    # same inputs); the images with a moved code are bounded via twice the one-ulp tie rate of those quantisers.
    names = [n for n, m in compensated.named_modules() if isinstance(m, OutputQuantized)
             and isinstance(m.layer, ChannelAffine)]
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    first = [compensated.get_submodule(n).output_quantizer for n in names]
    expected_changes = 2 * one_ulp_tie_rate(compensated, images, first) * len(images)
    codes: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: codes[n].append(o))
             for model in (compensated, folded) for n in names]
    with torch.no_grad():
        expected, got = compensated(images), folded(images)
    for h in hooks:
        h.remove()
    moved = torch.stack([(a != b).flatten(1).any(1) for a, b in codes.values()]).any(0)
    assert int(moved.sum()) <= changes_allowed(expected_changes, len(images))
    assert torch.equal(got[~moved], expected[~moved])


def test_the_exported_view_is_what_the_file_computes(tmp_path):
    """A torch figure printed beside an export (deploy's ``top1 (torch)``) is computed inside ``exported_view``:
    the FP32 compensation product the simulation graph holds, not the model's own FP16 evaluation product."""
    from qwt.compensation.modules import Compensated
    from qwt.export import exported_view

    model = qwt.create_model("vit_fmnist", pretrained=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 1, 28, 28, generator=g)
    qwt.quantize(model, images[:8], qwt.PTQConfig(w_bits=4, a_bits=4))
    qwt.apply_qwt(model, images[8:40], qwt.QwTConfig(), batch_size=8, progress=False)  # FP16 product at eval
    blocks = [m for m in model.modules() if isinstance(m, Compensated)]
    assert blocks and all(m.fp16_eval for m in blocks)
    with torch.no_grad(), exported_view(model, "simulate"):
        assert not any(m.fp16_eval for m in blocks)
        inside = model(images[40:])
    assert all(m.fp16_eval for m in blocks)  # restored
    with torch.no_grad(), compensation_precision(model, False):
        assert torch.equal(inside, model(images[40:]))


def test_a_language_model_export_is_refused_in_one_line(tmp_path):
    pytest.importorskip("transformers")
    from qwt.models.decoder_lm import build_from_config, tiny_config

    lm = build_from_config(config=tiny_config())
    ids = torch.randint(0, 128, (2, 8))
    qwt.quantize(lm, ids, qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=8))
    with pytest.raises(InputError, match="language model .* is exported by qwt.export.export_decoder_lm"):
        export_onnx(lm, ids, tmp_path / "lm.onnx")
    assert list(tmp_path.iterdir()) == []
