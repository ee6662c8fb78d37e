"""Detection model glue: mmdet 2.x → 3.x checkpoint conversion and safe loading, the RepQ-ViT layer map over a
whole detector, reparameterisation and the QwT backbone plan (reduced random-init Swin detectors)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qwt

from qwt import QwTConfig, apply_qwt, quantize
from qwt.compensation import LinearCompensated
from qwt.ptq import PTQConfig, attention_matmuls, calibrate, quantize_modules, reparameterize_model
from qwt.quant import (LogSqrt2Quantizer, QuantConv2d, QuantLinear, QuantWindowAttention, Quantizer, quant_state,
                       UniformQuantizer, set_quant_state)
from qwt.tasks.detection.checkpoint import convert_mmdet2_swin, load_detector_weights
from qwt.tasks.detection.configs import MODELS, build_detector, detector_config
from qwt.tasks.detection.plan import (MMDET_SWIN, NORM_LINEAR_PAIRS, detector_forward, detector_layer_rule,
                                      mmdet_swin_plan)


def _detector(name: str = "mask_rcnn_swin_t", seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(name, smoke=True, num_classes=2)


def _batch(h: int = 96, w: int = 128, seed: int = 0) -> dict:
    """One test-pipeline style batch (uint8 BGR image + metadata) for ``model.test_step``."""
    from mmdet.structures import DetDataSample

    g = torch.Generator().manual_seed(seed)
    sample = DetDataSample(metainfo=dict(img_id=1, ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0)))
    return {"inputs": [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)], "data_samples": [sample]}


# -- configs -----------------------------------------------------------------------------------------------------

def test_full_size_configs_match_the_published_architectures():
    cfg = detector_config("cascade_mask_rcnn_swin_b")
    assert (cfg["backbone"]["embed_dims"], cfg["backbone"]["depths"]) == (128, (2, 2, 18, 2))
    assert cfg["neck"]["in_channels"] == [128, 256, 512, 1024]
    heads = cfg["roi_head"]["bbox_head"]
    assert len(heads) == 3 and all(h["num_shared_convs"] == 4 and h["num_shared_fcs"] == 1 for h in heads)
    assert [h["bbox_coder"]["target_stds"][0] for h in heads] == [0.1, 0.05, 0.033]
    for name in MODELS:
        cfg = detector_config(name)
        assert cfg["backbone"]["init_cfg"] is None  # building never downloads
    with pytest.raises(ValueError, match="unknown detector"):
        detector_config("mask_rcnn_r50")


# -- checkpoints -------------------------------------------------------------------------------------------------

#: mmdet 3.x → 2.x renames, written out independently of the converter.
_TO_MMDET2 = (("backbone.stages.", "backbone.layers."), (".attn.w_msa.", ".attn."),
              (".ffn.layers.0.0.", ".mlp.fc1."), (".ffn.layers.1.", ".mlp.fc2."),
              ("backbone.patch_embed.projection.", "backbone.patch_embed.proj."))


def _as_mmdet2(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for new, old in _TO_MMDET2:
            key = key.replace(new, old)
        out[key] = value.clone()
    return out


def _original_patch_merging(x: torch.Tensor, hw: tuple, norm_w, norm_b, reduction_w) -> torch.Tensor:
    """The original Swin patch merging: concat of the (0,0), (1,0), (0,1), (1,1) strided slices, LN, linear."""
    b, _, c = x.shape
    grid = x.view(b, hw[0], hw[1], c)
    merged = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
    merged = F.layer_norm(merged.view(b, -1, 4 * c), (4 * c,), norm_w, norm_b)
    return merged @ reduction_w.t()


def test_key_renames_of_the_converter():
    t = torch.zeros(4)
    converted = convert_mmdet2_swin({k: t for k in (
        "backbone.patch_embed.proj.weight", "backbone.layers.1.blocks.0.attn.qkv.bias",
        "backbone.layers.2.blocks.1.mlp.fc1.weight", "backbone.layers.0.blocks.1.mlp.fc2.bias",
        "backbone.layers.0.blocks.1.attn.relative_position_bias_table", "backbone.norm3.weight",
        "neck.lateral_convs.0.conv.weight", "roi_head.bbox_head.2.shared_convs.0.bn.running_mean")})
    assert sorted(converted) == sorted([
        "backbone.patch_embed.projection.weight", "backbone.stages.1.blocks.0.attn.w_msa.qkv.bias",
        "backbone.stages.2.blocks.1.ffn.layers.0.0.weight", "backbone.stages.0.blocks.1.ffn.layers.1.bias",
        "backbone.stages.0.blocks.1.attn.w_msa.relative_position_bias_table", "backbone.norm3.weight",
        "neck.lateral_convs.0.conv.weight", "roi_head.bbox_head.2.shared_convs.0.bn.running_mean"])


def test_mmdet2_checkpoint_loads_and_patch_merging_matches_the_original(tmp_path):
    source = _detector("cascade_mask_rcnn_swin_t", seed=1)
    torch.manual_seed(2)
    for merging in (s.downsample for s in source.backbone.stages if s.downsample is not None):
        for p in merging.parameters():  # non-trivial LN affine so a wrong permutation shows
            p.data.normal_()
    old = _as_mmdet2(source.state_dict())
    assert any(k.startswith("backbone.layers.0.downsample.reduction") for k in old)
    path = tmp_path / "mmdet2.pth"
    torch.save({"meta": {"epoch": 36, "CLASSES": ("person", "bicycle")}, "state_dict": old}, path)

    target = _detector("cascade_mask_rcnn_swin_t", seed=3)
    assert load_detector_weights(target, path) == "mmdet2-swin"
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        if ".downsample." not in key:
            assert torch.equal(loaded[key], value), key
    x = torch.randn(2, 8 * 6, source.backbone.stages[0].blocks[0].norm1.normalized_shape[0])
    prefix = "backbone.layers.0.downsample."
    expected = _original_patch_merging(x, (8, 6), old[prefix + "norm.weight"], old[prefix + "norm.bias"],
                                       old[prefix + "reduction.weight"])
    got, hw = target.backbone.stages[0].downsample(x, (8, 6))
    assert hw == (4, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # permuted weights: same sums, other order


def test_mmdet3_checkpoint_loads_as_is_and_mismatches_are_reported(tmp_path):
    source = _detector(seed=4)
    path = tmp_path / "mmdet3.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ("person", "bicycle")}}, "state_dict": source.state_dict()},
               path)
    target = _detector(seed=5)
    assert load_detector_weights(target, path) == "mmdet3"
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="does not match"):
        load_detector_weights(_detector("cascade_mask_rcnn_swin_t"), path)


class _Payload:
    """Unpickling this would run code (touch a file); a safe loader must refuse it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_checkpoint_reading_is_weights_only_and_scoped(tmp_path):
    state = torch.nn.Linear(2, 2).state_dict()
    numpy_meta = tmp_path / "numpy_meta.pth"
    torch.save({"meta": {"best": np.float64(0.5), "hist": np.arange(3)}, "state_dict": state}, numpy_meta)
    model = torch.nn.Linear(2, 2)
    assert load_detector_weights(model, numpy_meta) == "mmdet3"
    assert torch.equal(model.weight, state["weight"])
    # numpy was allow-listed for that call only: a plain weights-only load still refuses it.
    assert not any("numpy" in repr(g) for g in torch.serialization.get_safe_globals())
    with pytest.raises(Exception, match="numpy"):
        torch.load(numpy_meta, weights_only=True)

    marker = tmp_path / "executed"
    hostile = tmp_path / "hostile.pth"
    torch.save({"meta": {"x": _Payload(marker)}, "state_dict": state}, hostile)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_detector_weights(model, hostile)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_detector_weights(model, tmp_path / "missing.pth")


# -- quantisation ------------------------------------------------------------------------------------------------

def test_quantised_window_attention_is_mmdet_window_msa_when_off():
    from mmdet.models.backbones.swin import WindowMSA

    torch.manual_seed(0)
    msa = WindowMSA(embed_dims=24, num_heads=3, window_size=(7, 7)).eval()
    torch.nn.init.normal_(msa.relative_position_bias_table)
    x = torch.randn(8, 49, 24)
    mask = torch.zeros(4, 49, 49).masked_fill(torch.rand(4, 49, 49) > 0.7, -100.0)
    expected = [msa(x), msa(x, mask=mask)]
    keys = set(msa.state_dict())
    config = PTQConfig(baseline="repq_vit", w_bits=4, a_bits=4, layer_map="repq_vit")
    quant = QuantWindowAttention(msa, *attention_matmuls(config))
    assert isinstance(quant, QuantWindowAttention)
    assert {k for k in quant.state_dict() if "quantizer" not in k} == keys
    assert isinstance(quant.matmul2.a_quantizer, LogSqrt2Quantizer)
    for got, want in zip([quant(x), quant(x, mask=mask)], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # same maths, other op order: FP32 rounding


def test_whole_detector_is_quantised_with_the_authors_map():
    model = _detector("cascade_mask_rcnn_swin_t")
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = PTQConfig(baseline="repq_vit", w_bits=4, a_bits=6, layer_map="repq_vit")
    quantize_modules(model, detector_layer_rule(model, config))
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], QuantConv2d) for n in convs)
    assert all(isinstance(modules[n], QuantLinear) for n in linears)
    assert any(n.startswith("roi_head.mask_head.2.conv_logits") for n in convs)
    assert any(n.startswith("roi_head.bbox_head.0.shared_convs") for n in convs)
    assert not any(isinstance(m, QuantConv2d) for n, m in model.named_modules() if n.endswith("upsample"))
    embed = modules["backbone.patch_embed.projection"]
    assert (embed.input_quantizer.n_bits, embed.weight_quantizer.n_bits) == (8, 4)
    assert modules["neck.fpn_convs.0.conv"].input_quantizer.n_bits == 6
    per_channel = {n for n, m in model.named_modules()
                   if isinstance(m, QuantLinear) and m.input_quantizer.channel_axis is not None}
    assert per_channel == {n for n in linears if n.endswith(("w_msa.qkv", "ffn.layers.0.0", "reduction"))}
    assert len(per_channel) == 2 * 8 + 3
    assert sum(isinstance(m, QuantWindowAttention) for m in model.modules()) == 8
    # The percentile baseline needs nothing of a family: on the detector its post-norm inputs and softmax
    # outputs get per-tensor uniform quantisers.
    other = _detector()
    quantize_modules(other, detector_layer_rule(other, PTQConfig(baseline="percentile", layer_map="repq_vit")))
    assert not any(isinstance(m, QuantLinear) and m.input_quantizer.channel_axis is not None for m in other.modules())
    softmax = [m.matmul2.a_quantizer for m in other.modules() if isinstance(m, QuantWindowAttention)]
    assert len(softmax) == 8 and all(type(q) is UniformQuantizer for q in softmax)


def test_calibration_covers_the_whole_detector_and_reparam_keeps_the_fp_function():
    model = _detector()
    config = PTQConfig(baseline="repq_vit", w_bits=4, a_bits=4, layer_map="repq_vit")
    quantize_modules(model, detector_layer_rule(model, config))
    batch = _batch()
    calibrate(model, batch, detector_forward)
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    assert quantizers and all(q.calibrated for q in quantizers)
    # 224 px: every stage's grid is a multiple of the window, so no zero padding enters qkv. (Padded tokens are
    # zeros after norm1; reparameterisation moves what that zero means, in the authors' mmdet 2.x Swin as here.)
    images = torch.randn(2, 3, 224, 224)
    with quant_state(model, weight=False, act=False):
        before = model.backbone(images)
    norms = reparameterize_model(model, NORM_LINEAR_PAIRS)
    assert len(norms) == 2 * 8 + 3
    with quant_state(model, weight=False, act=False):
        after = model.backbone(images)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # exact in real arithmetic; FP32 rounding only
    assert all(m.input_quantizer.channel_axis is None for m in model.modules() if isinstance(m, QuantLinear))
    set_quant_state(model, weight=True, act=True)
    with torch.no_grad():
        quantised = model.backbone(images)
    assert not torch.allclose(quantised[0], before[0], atol=1e-3)


def test_qwt_plan_compensates_blocks_not_patch_merging_and_runs_at_other_resolutions():
    model = _detector()
    assert qwt.family_of(model) is MMDET_SWIN
    quantize(model, _batch(), PTQConfig(w_bits=4, a_bits=4, layer_map="repq_vit"), forward=detector_forward)
    plan = mmdet_swin_plan(model)
    assert [s.path for s in plan.steps if not s.compensate] == [f"backbone.stages.{i}.downsample" for i in range(3)]
    reference = copy.deepcopy(model)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reports = apply_qwt(model, [images[:2], images[2:]], QwTConfig(fp16_eval=False), progress=False)
    assert [r.path for r in reports] == [f"backbone.stages.{s}.blocks.{j}" for s in range(4) for j in range(2)]
    assert any(r.applied for r in reports)
    wrapped = [m for m in model.backbone.modules() if isinstance(m, LinearCompensated)]
    assert len(wrapped) == 8 and not any(w.fp16_eval for w in wrapped)
    assert not any(isinstance(s.downsample, LinearCompensated) for s in model.backbone.stages)
    # Token-wise compensation applies unchanged at a test resolution the fit never saw.
    with torch.no_grad():
        test_images = torch.randn(1, 3, 96, 160)
        compensated, plain = model.backbone(test_images), reference.backbone(test_images)
    assert [t.shape for t in compensated] == [t.shape for t in plain]
    assert not torch.allclose(compensated[0], plain[0])
    with pytest.raises(ValueError, match="224"):
        apply_qwt(reference, [images[:, :, :192]], QwTConfig(fp16_eval=False), progress=False)
