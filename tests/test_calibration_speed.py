"""Calibration speed levers keep results bit-identical: each is compared with a plain re-statement of the maths."""
import copy
import math
import platform
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwt
from qwt.quant import QuantLinear, UniformQuantizer, log_sqrt2_fake_quant
from qwt.quant.quantizers import search_log_sqrt2


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that −0 ≠ +0; every NaN as one pattern (torch's own kernels give a NaN different
    payloads in their vectorised and scalar loops, so a payload carries no meaning)."""
    return t.nan_to_num(nan=math.nan, posinf=math.inf, neginf=-math.inf).contiguous().view(torch.int32)


def _plain_log_sqrt2(x: torch.Tensor, delta: torch.Tensor, levels: int, floor: float | None) -> torch.Tensor:
    ratio = x / delta
    if floor is not None:
        ratio = torch.clamp_min(ratio, floor)
    q_int = torch.round(-2.0 * torch.log2(ratio))
    q = torch.clamp(q_int, 0, levels - 1)
    odd = (q % 2) * (math.sqrt(2) - 1) + 1
    return (2 ** (-1 * torch.ceil(q / 2)) * odd * delta).masked_fill(q_int >= levels, 0)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_log_sqrt2_inference_path_matches_the_formula_bit_for_bit(bits):
    """The inference path decodes a table of the L codes and looks elements up: every code (8-bit codes reach
    subnormal outputs), overflow, zero, infinity, negative and NaN inputs give the formula's bits."""
    g = torch.Generator().manual_seed(bits)
    delta = torch.tensor(0.4)
    codes = torch.arange(2**bits + 4, dtype=torch.float32)
    every_code = delta * torch.exp2(-codes / 2) * (1 + 0.2 * (torch.rand(50, codes.numel(), generator=g) - 0.5))
    x = torch.cat([torch.rand(4000, generator=g).pow(4), torch.rand(100, generator=g) * 3,  # codes < 0 too
                   every_code.reshape(-1),
                   torch.tensor([0.0, -0.0, 1e-30, 1e-7, 0.4, 1.0, float("inf"), -0.3, float("nan")])])
    for floor in (None, 1e-6):
        for values in (x, x.flip(0)[3:]):  # each value at other vector-lane positions too
            assert torch.equal(_bits(log_sqrt2_fake_quant(values, delta, 2**bits, floor)),
                               _bits(_plain_log_sqrt2(values, delta, 2**bits, floor)))


def test_log_sqrt2_search_scores_as_the_formula():
    flat = torch.rand(20_000, generator=torch.Generator().manual_seed(1)).pow(3)
    delta = search_log_sqrt2(flat, 4, 1e-6)
    candidates = torch.quantile(flat, torch.tensor([0.999, 0.9999, 0.99999]))
    scores = [(flat - _plain_log_sqrt2(flat, c, 16, 1e-6)).pow(2).mean() for c in candidates]
    assert torch.equal(delta, candidates[min(range(3), key=lambda i: (scores[i], i))])


def _quant_linear(seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear(nn.Linear(12, 7), UniformQuantizer(4), UniformQuantizer(4, channel_axis=0))
    layer.set_quant_state(weight=True, act=True)
    with torch.no_grad():
        layer(torch.randn(16, 12))  # calibrate
    return layer


def _plain(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(layer.input_quantizer(x), layer.weight_quantizer(layer.weight), layer.bias)


def test_cached_weight_is_reused_and_equals_recomputing():
    layer, x = _quant_linear(), torch.randn(5, 12)
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # computed once
        assert torch.equal(layer(x), _plain(layer, x))


def test_weight_cache_follows_weight_and_quantiser_changes():
    layer, x = _quant_linear(), torch.randn(5, 12)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(1.5)  # optimiser-style in-place edit
        assert torch.equal(layer(x), _plain(layer, x)) and not torch.equal(layer(x), before)
        layer.weight_quantizer.reset()  # as reparameterisation does: the next forward re-calibrates
        assert torch.equal(layer(x), _plain(layer, x))
        other = _quant_linear(seed=1)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))
        layer.weight_quantizer.enabled = False
        assert torch.equal(layer(x), F.linear(layer.input_quantizer(x), layer.weight, layer.bias))


def test_gradients_reach_a_trainable_quantised_weight():
    layer, x = _quant_linear(), torch.randn(5, 12)
    with torch.no_grad():
        layer(x)  # fills the cache
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    frozen = _quant_linear()
    frozen.weight.requires_grad_(False)
    x.requires_grad_(True)
    with torch.inference_mode():
        frozen(x.detach())  # an inference-mode cache must not leak into training
    frozen(x).sum().backward()
    assert x.grad is not None


def test_model_outputs_unchanged_by_the_cache():
    torch.manual_seed(0)
    model = qwt.create_model("deit_tiny", smoke=True, num_classes=4)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    qwt.quantize(model, images, qwt.PTQConfig())
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, qwt.quant.QuantModule) and hasattr(module, "weight_quantizer"):
            module.quantized_weight = lambda m=module: m.weight_quantizer(m.weight)
    with torch.no_grad():
        model(images)
        assert torch.equal(model(images), plain(images))


def _plain_design(fit, x, t):
    """The design as first written: unfold (or flatten the tokens), split the groups, concatenate a ones column."""
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
        return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)[None], t.reshape(1, -1, t.shape[-1])
    g, k = fit.groups, fit.kernel_size
    patches = F.unfold(x, k, padding=k // 2, stride=fit.stride)
    b, _, length = patches.shape
    patches = patches.reshape(b, g, -1, length).permute(1, 0, 3, 2).reshape(g, b * length, -1)
    a = torch.cat([patches, torch.ones(g, b * length, 1)], dim=2)
    return a, t.reshape(b, g, -1, length).permute(1, 0, 3, 2).reshape(g, b * length, -1)


def _plain_statistics(fit, batches):
    """The normal-equation statistics as first written: FP32 design cast to FP64, sums with ``+``."""
    gram = cross = None
    t_sq = torch.zeros((), dtype=torch.float64)
    for x, t in batches:
        a, target = _plain_design(fit, x.float(), t.float())
        a64, t64 = a.double(), target.double()
        g, c = a64.transpose(1, 2) @ a64, a64.transpose(1, 2) @ t64
        gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        t_sq = t_sq + t.double().pow(2).sum()
    return gram, cross, t_sq


@pytest.mark.parametrize("form", ["linear", (3, 2), (1, 1), (1, 2)])
def test_streaming_statistics_are_unchanged(form):
    from qwt.compensation import GroupedConvLeastSquares, LinearLeastSquares

    g = torch.Generator().manual_seed(4)
    if form == "linear":
        batches = [(torch.randn(4, 9, 16, generator=g), torch.randn(4, 9, 8, generator=g)) for _ in range(3)]
        fit = LinearLeastSquares()
    else:  # k = 1 takes a strided view instead of unfold; both must give the unfolded patches
        kernel, stride = form
        out = (7 - 1) // stride + 1
        batches = [(torch.randn(2, 8, 7, 7, generator=g), torch.randn(2, 8, out, out, generator=g)) for _ in range(3)]
        fit = GroupedConvLeastSquares(8, 8, kernel, stride, 2)
    for x, t in batches:
        fit.update(x, t)
    gram, cross, t_sq = _plain_statistics(fit, batches)
    assert torch.equal(fit.gram, gram) and torch.equal(fit.cross, cross) and torch.equal(fit.t_sq, t_sq)


def _plain_apply_qwt(model, plan, images, config):
    """apply_qwt's procedure restated with plain lists (all batches' inputs, outputs and next inputs alive)."""
    from qwt.compensation.blockwise import _fitter, _wrap, _zeroed
    from qwt.quant.modules import quant_state, set_quant_state, swap_module

    set_quant_state(model, weight=True, act=True)
    feats, r2 = [plan.stem(b) for b in images.split(4)], []
    for step in plan.steps:
        module = model.get_submodule(step.path)
        outputs, fit = [], None
        for x in feats:
            with quant_state(module, weight=False, act=False):
                y_fp = module(x)
            y_q = module(x)
            if fit is None:
                fit, meta = _fitter(plan.form, x, y_q, config)
            fit.update(x, y_fp - y_q)
            outputs.append(y_q)
        result = fit.solve()
        wrapper = _wrap(plan.form, module, result if result.r2 > 0 else _zeroed(result), meta, config.fp16_eval)
        swap_module(model, step.path, wrapper)
        feats = [wrapper.add_fp32(y, x) for x, y in zip(feats, outputs)]
        r2.append(result.r2)
    return r2


@pytest.mark.parametrize("name, feature_device", [("deit_tiny", "cpu"), ("resnet18", "cpu"), ("deit_tiny", "disk"),
                                                  ("resnet18", "disk")])
def test_apply_qwt_is_bit_identical_to_the_plain_procedure(name, feature_device, tmp_path, monkeypatch):
    """Features kept in memory or spilled to files between blocks: the same arithmetic, and no file left."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    entry = qwt.get_model_entry(name)
    torch.manual_seed(0)
    fp = qwt.create_model(name, smoke=True, num_classes=4)
    g = torch.Generator().manual_seed(6)
    calib, comp = torch.randn(8, 3, 32, 32, generator=g), torch.randn(12, 3, 32, 32, generator=g)
    model = qwt.quantize(fp, calib, qwt.PTQConfig(baseline=entry.family.default_baseline))
    plain = copy.deepcopy(model)
    config = qwt.QwTConfig(feature_device=feature_device, skip_degenerate=False)  # the plain loop fits every block
    with torch.no_grad():
        reports = qwt.apply_qwt(model, comp, config, batch_size=4, progress=False)
        r2 = _plain_apply_qwt(plain, entry.family.plan(plain), comp, config)
        assert [r.r2 for r in reports] == r2
        assert torch.equal(model(comp), plain(comp))
    assert list(tmp_path.iterdir()) == []


def test_spilled_features_hold_no_tensor_and_leave_no_file_when_the_fit_fails(tmp_path, monkeypatch):
    import tempfile

    from qwt.compensation.features import FeatureStores

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with FeatureStores("disk") as stores:
        store = stores.new()
        x = torch.randn(3, 5, dtype=torch.float64)
        store.put(0, x)
        assert not any(isinstance(slot, torch.Tensor) for slot in store._slots)
        fetched = store.get(0, torch.device("cpu"))
        store.put(0, x * 2)  # replaced while the fetched copy is alive: the copy does not change
        assert torch.equal(fetched, x) and torch.equal(store.get(0, torch.device("cpu")), x * 2)
        store.release(0)
        with pytest.raises(KeyError, match="released"):
            store.get(0, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []

    torch.manual_seed(0)
    model = qwt.quantize(qwt.create_model("deit_tiny", smoke=True, num_classes=4), torch.randn(4, 3, 32, 32),
                         qwt.PTQConfig())
    model.blocks[1].mlp.fc2.bias.data.fill_(math.inf)  # the second block's targets are not finite
    with pytest.raises(ValueError, match="non-finite"):
        qwt.apply_qwt(model, torch.randn(8, 3, 32, 32), qwt.QwTConfig(feature_device="disk"), batch_size=4,
                      progress=False)
    assert list(tmp_path.iterdir()) == []


def test_feature_device_is_checked_when_configured():
    with pytest.raises(ValueError, match="feature_device"):
        qwt.QwTConfig(feature_device="dsik")


def test_repq_vit_quantize_equals_a_second_calibration_forward():
    """Re-fitting the reset weight quantisers directly gives what RepQ-ViT's second calibration pass gives."""
    from qwt.ptq import calibrate, quantize_modules, reparameterize_model

    torch.manual_seed(0)
    fp = qwt.create_model("deit_tiny", smoke=True, num_classes=4)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain, family = copy.deepcopy(fp).eval(), qwt.get_model_entry("deit_tiny").family
    quantize_modules(plain, family.layer_rule(plain, qwt.PTQConfig().for_family(family)))
    calibrate(plain, images)
    reparameterize_model(plain, family.norm_linear_pairs)
    calibrate(plain, images)
    model = qwt.quantize(fp, images, qwt.PTQConfig())
    got, expected = model.state_dict(), plain.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))


def _benchmark(*flags: str):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "calibration_speed.py"
    return subprocess.run([sys.executable, str(path), *flags, "--calib-images", "4", "--comp-images", "8",
                           "--batch-size", "4", "--threads", "1"], capture_output=True, text=True)


# vit_fmnist and efficientnet_lite0 register no ``smoke`` build argument (they are small already) and vit_fmnist
# takes 1×28×28 images: --smoke used to build every model with smoke=True on RGB 32×32 images (a traceback).
@pytest.mark.parametrize("flags", [("deit_tiny", "--smoke"), ("vit_fmnist", "--smoke"), ("vit_fmnist",),
                                   ("efficientnet_lite0", "--smoke")])
def test_speed_benchmark_prints_its_figures_as_the_last_json_line(flags):
    """Run as users run it, in its own process (it switches the allocator setting on, process-wide)."""
    import json

    done = _benchmark("--model", *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["model"] == flags[0] + ("-smoke" if "--smoke" in flags else "")
    for key in ("model", "device", "threads", "images", "fp_forward_s", "ptq_s", "qwt_s", "total_s",
                "ratio_to_fp_forward", "qwt_peak_mib"):
        assert key in figures
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert figures["images"] == 12 and figures["device"] == "cpu" and figures["freed_memory_retained"] is glibc
    assert figures["fp_forward_s"] == pytest.approx(sum(figures["fp_forward_runs_s"]) / 2, abs=2e-3)
    assert figures["total_s"] == pytest.approx(figures["ptq_s"] + figures["qwt_s"], abs=2e-3)
    fp = figures["fp_forward_s"]  # rounded to 1 ms, which is a lot for a tiny model: allow for it
    assert figures["ratio_to_fp_forward"] == pytest.approx(figures["total_s"] / fp, rel=0.01 + 0.0005 / fp)


def test_speed_benchmark_refuses_a_language_model_in_one_line():
    done = _benchmark("--model", "hf_causal_lm", "--smoke")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --model hf_causal_lm takes token ids, not images")


def test_retained_freed_memory_is_switched_on_once_and_recorded():
    """In a child process, so this test session's allocator stays as it is."""
    import subprocess
    import sys

    code = ("from qwt.allocator import retain_freed_memory, freed_memory_retained\n"
            "from qwt.environment import environment\n"
            "before = freed_memory_retained()\n"
            "print(before, retain_freed_memory(), retain_freed_memory(), environment()['freed_memory_retained'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out == ["False", str(glibc), str(glibc), str(glibc)]


_REUSE_CODE = """
import resource, sys, torch
from qwt.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    retain_freed_memory()
faults = []
for _ in range(5):  # a batch's large temporary, freed, then the next batch's of the same size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 18)  # 64 MiB of float32, every page touched
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"),
                    reason="the allocator setting exists only with glibc")
def test_retained_memory_is_reused_without_page_faults():
    """With the setting, a freed 64 MiB tensor's pages serve the next one (no page faults); without it, every
    page faults again. mallopt takes a C int: a threshold that overflows it would silently trim everything."""
    import subprocess
    import sys

    pages = (64 << 20) // resource.getpagesize()
    faults = {mode: int(subprocess.run([sys.executable, "-c", _REUSE_CODE, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("retain", "default")}
    assert faults["default"] > 0.9 * pages
    assert faults["retain"] < 0.05 * pages
