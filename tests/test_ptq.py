"""RepQ-ViT and percentile PTQ on random-init models: layer map, reparameterisation, calibration."""
import copy

import pytest
import torch
import torchvision

from qwt import PTQConfig, quantize, set_quant_state
from qwt.ptq import calibrate, layernorm_linear_pairs, reparameterize_model
from qwt.models.resnet import resnet_layer_rule
from qwt.models.vit import VIT, vit_layer_rule
from qwt.ptq import quantize_modules
from qwt.quant import LogSqrt2Quantizer, QuantConv2d, QuantLinear, UniformQuantizer


def _quantizers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer))}


def test_vit_layer_map_qwt(tiny_vit):
    quantize_modules(tiny_vit, vit_layer_rule(tiny_vit, PTQConfig(baseline="repq_vit", w_bits=4, a_bits=4)))
    attn = tiny_vit.blocks[0].attn
    assert isinstance(attn.qkv, QuantLinear) and attn.qkv.input_quantizer.channel_axis == -1
    assert tiny_vit.blocks[0].mlp.fc1.input_quantizer.channel_axis == -1
    assert tiny_vit.blocks[0].mlp.fc2.input_quantizer.channel_axis is None
    assert isinstance(attn.matmul2.a_quantizer, LogSqrt2Quantizer)
    pe = tiny_vit.patch_embed.proj
    assert isinstance(pe, QuantConv2d) and (pe.input_quantizer.n_bits, pe.weight_quantizer.n_bits) == (8, 8)
    assert (tiny_vit.head.input_quantizer.n_bits, tiny_vit.head.weight_quantizer.n_bits) == (8, 8)
    assert attn.proj.weight_quantizer.n_bits == 4 and attn.proj.weight_quantizer.channel_axis == 0


def test_vit_layer_map_repq_original(tiny_vit):
    config = PTQConfig(baseline="repq_vit", w_bits=4, a_bits=6, layer_map="repq_vit")
    quantize_modules(tiny_vit, vit_layer_rule(tiny_vit, config))
    pe = tiny_vit.patch_embed.proj
    assert (pe.input_quantizer.n_bits, pe.weight_quantizer.n_bits) == (8, 4)
    assert (tiny_vit.head.input_quantizer.n_bits, tiny_vit.head.weight_quantizer.n_bits) == (6, 4)


def test_percentile_vit_map_is_layerwise_and_uniform(tiny_vit):
    quantize_modules(tiny_vit, vit_layer_rule(tiny_vit, PTQConfig(baseline="percentile")))
    qs = _quantizers(tiny_vit)
    assert not any(isinstance(q, LogSqrt2Quantizer) for q in qs.values())
    assert all(q.channel_axis is None for n, q in qs.items() if "input" in n or "matmul" in n)


def test_reparameterization_keeps_fp_function(tiny_vit, images):
    # Give LayerNorms non-trivial affines so the fold is exercised.
    for m in tiny_vit.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    reference = tiny_vit(images)
    quantize_modules(tiny_vit, vit_layer_rule(tiny_vit, PTQConfig(baseline="repq_vit")))
    calibrate(tiny_vit, images)
    touched = reparameterize_model(tiny_vit, VIT.norm_linear_pairs)
    assert len(touched) == 2 * len(tiny_vit.blocks)
    set_quant_state(tiny_vit, weight=False, act=False)
    out = tiny_vit(images)
    assert (out - reference).norm() / reference.norm() <= 1e-5  # folded affines: other FP32 sums (≈ √K·u)
    # Post-reparameterisation quantisers: per tensor, fractional mean zero-point allowed; weights reset.
    qkv = tiny_vit.blocks[0].attn.qkv
    assert qkv.input_quantizer.delta.dim() == 0 and qkv.input_quantizer.channel_axis is None
    assert not qkv.weight_quantizer.calibrated
    assert list(layernorm_linear_pairs(tiny_vit, VIT.norm_linear_pairs)) == []  # nothing left to reparameterise


def test_repq_pipeline_recalibrates_only_reset_weights(tiny_vit, images):
    quantize_modules(tiny_vit, vit_layer_rule(tiny_vit, PTQConfig(baseline="repq_vit")))
    calibrate(tiny_vit, images)
    before = {n: q.delta.clone() for n, q in _quantizers(tiny_vit).items()}
    reparameterize_model(tiny_vit, VIT.norm_linear_pairs)
    calibrate(tiny_vit, images)
    after = _quantizers(tiny_vit)
    for name, delta in before.items():
        changed = not torch.equal(after[name].delta, delta)
        refit = name.endswith(("qkv.weight_quantizer", "fc1.weight_quantizer", "qkv.input_quantizer",
                               "fc1.input_quantizer"))
        assert changed == refit, name


def test_quantize_end_to_end_and_error_is_bounded(tiny_vit, images):
    fp = tiny_vit(images)
    model = quantize(copy.deepcopy(tiny_vit), images, PTQConfig(w_bits=6, a_bits=6))
    q6 = model(images)
    model4 = quantize(copy.deepcopy(tiny_vit), images, PTQConfig(w_bits=4, a_bits=4))
    q4 = model4(images)
    assert all(q.calibrated for q in _quantizers(model).values())
    assert torch.isfinite(q6).all()
    assert (q6 - fp).norm() < (q4 - fp).norm() < fp.norm()


def test_cnn_map_stem_and_head_w8a8_and_conv_act_bits():
    model = torchvision.models.resnet18(num_classes=10).eval()
    quantize_modules(model, resnet_layer_rule(model, PTQConfig(baseline="percentile", w_bits=4, a_bits=4)))
    assert (model.conv1.input_quantizer.n_bits, model.conv1.weight_quantizer.n_bits) == (8, 8)
    assert (model.fc.input_quantizer.n_bits, model.fc.weight_quantizer.n_bits) == (8, 8)
    assert (model.layer1[0].conv1.input_quantizer.n_bits, model.layer1[0].conv1.weight_quantizer.n_bits) == (4, 4)
    legacy = torchvision.models.resnet18(num_classes=10).eval()
    config = PTQConfig(baseline="percentile", w_bits=4, a_bits=4, conv_act_bits=8)
    quantize_modules(legacy, resnet_layer_rule(legacy, config))
    assert legacy.layer1[0].conv1.input_quantizer.n_bits == 8
    assert isinstance(legacy.layer2[0].downsample[0], QuantConv2d)


def test_cnn_refuses_repq_and_bad_configs():
    with pytest.raises(ValueError, match="percentile"):
        quantize(torchvision.models.resnet18(), torch.zeros(1, 3, 32, 32), PTQConfig(baseline="repq_vit"))
    with pytest.raises(ValueError, match="2..8"):
        PTQConfig(w_bits=9)
    with pytest.raises(ValueError, match="2..8"):
        PTQConfig(a_bits=1)
    with pytest.raises(ValueError, match="method"):
        PTQConfig(baseline="no_such_method")
