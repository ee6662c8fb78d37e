"""The paper's five detectors as mmdet 3.x model configs, composed in Python.

Mask R-CNN and Cascade Mask R-CNN with Swin-T/S/B, as the Swin-Transformer-Object-Detection 3x release trained
them (the cascade heads are its "4conv1f" ConvFC heads with class-specific regression). Only what inference needs
is set; every ``init_cfg`` is None so building never downloads anything. ``smoke=True`` shrinks every width and
depth (same module types and names) so a random-init detector runs on CPU in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

Config = dict[str, Any]

#: Normalisation of the authors' test pipeline (RGB mean/std on 0..255 images), padding to multiples of 32.
DATA_PREPROCESSOR: Config = dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                                 std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32)


@dataclass(frozen=True)
class Widths:
    """Backbone and head sizes; ``FULL`` is the paper's, ``SMOKE`` a reduced copy for CI."""

    neck: int
    fc: int
    mask_conv: int


FULL = Widths(neck=256, fc=1024, mask_conv=256)
SMOKE = Widths(neck=32, fc=64, mask_conv=16)
WINDOW = 7

#: Swin variants: (embed dims, depths, heads).
SWIN: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
SMOKE_SWIN = (24, (2, 2, 2, 2), (1, 2, 4, 8))

#: Model name → (detector type, Swin variant). Names are the ones results and paper.json use.
MODELS: dict[str, tuple[str, str]] = {
    "mask_rcnn_swin_t": ("mask_rcnn", "swin_t"),
    "mask_rcnn_swin_s": ("mask_rcnn", "swin_s"),
    "cascade_mask_rcnn_swin_t": ("cascade_mask_rcnn", "swin_t"),
    "cascade_mask_rcnn_swin_s": ("cascade_mask_rcnn", "swin_s"),
    "cascade_mask_rcnn_swin_b": ("cascade_mask_rcnn", "swin_b"),
}

#: Box-regression target stds of the three cascade stages; the first is also Mask R-CNN's.
STAGE_STDS = ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])


def _backbone(variant: tuple[int, tuple[int, ...], tuple[int, ...]]) -> Config:
    embed, depths, heads = variant
    return dict(type="SwinTransformer", embed_dims=embed, depths=depths, num_heads=heads, window_size=WINDOW,
                mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=False, init_cfg=None)


def _box_coder(stds: list[float]) -> Config:
    return dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds)


def _roi_extractor(size: int, channels: int) -> Config:
    return dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=size, sampling_ratio=0),
                out_channels=channels, featmap_strides=[4, 8, 16, 32])


def _mask_head(w: Widths, num_classes: int) -> Config:
    return dict(type="FCNMaskHead", num_convs=4, in_channels=w.neck, conv_out_channels=w.mask_conv,
                num_classes=num_classes)


def _box_head(w: Widths, num_classes: int, stds: list[float], cascade: bool) -> Config:
    head = dict(in_channels=w.neck, fc_out_channels=w.fc, roi_feat_size=7, num_classes=num_classes,
                bbox_coder=_box_coder(stds), reg_class_agnostic=False)
    if not cascade:
        return dict(type="Shared2FCBBoxHead", **head)
    # "4conv1f": four 3×3 conv + BN (SyncBN in training; identical at inference), one FC; decoded-box regression.
    return dict(type="ConvFCBBoxHead", num_shared_convs=4, num_shared_fcs=1, conv_out_channels=w.neck,
                norm_cfg=dict(type="BN", requires_grad=True), reg_decoded_bbox=True, **head)


def detector_config(name: str, smoke: bool = False, num_classes: int = 80) -> Config:
    """The mmdet 3.x model config of ``name`` (a key of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(MODELS)}")
    kind, swin = MODELS[name]
    w = SMOKE if smoke else FULL
    variant = SMOKE_SWIN if smoke else SWIN[swin]
    embed, depths, _ = variant
    cascade = kind == "cascade_mask_rcnn"
    roi_head: Config = dict(bbox_roi_extractor=_roi_extractor(7, w.neck), mask_roi_extractor=_roi_extractor(14, w.neck))
    if cascade:
        roi_head.update(type="CascadeRoIHead", num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
                        bbox_head=[_box_head(w, num_classes, stds, True) for stds in STAGE_STDS],
                        mask_head=[_mask_head(w, num_classes) for _ in STAGE_STDS])
    else:
        roi_head.update(type="StandardRoIHead", bbox_head=_box_head(w, num_classes, STAGE_STDS[0], False),
                        mask_head=_mask_head(w, num_classes))
    return dict(
        type="CascadeRCNN" if cascade else "MaskRCNN",
        data_preprocessor=DATA_PREPROCESSOR,
        backbone=_backbone(variant),
        neck=dict(type="FPN", in_channels=[embed * 2**i for i in range(len(depths))], out_channels=w.neck,
                  num_outs=5),
        rpn_head=dict(type="RPNHead", in_channels=w.neck, feat_channels=w.neck,
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=[4, 8, 16, 32, 64]),
                      bbox_coder=_box_coder([1.0, 1.0, 1.0, 1.0])),
        roi_head=roi_head,
        train_cfg=None,
        test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                               min_bbox_size=-1),  # mmdet 2.x: no size filter (3.x at 0 drops empty boxes)
                      rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                                mask_thr_binary=0.5)),
    )


def use_mmdet_registry() -> None:
    """Register mmdet's modules and make ``mmdet`` the default scope: configs here name mmdet types."""
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def build_detector(name: str, smoke: bool = False, num_classes: int = 80) -> nn.Module:
    """Build ``name`` with mmdet (random init, eval mode)."""
    from mmengine.config import ConfigDict
    from mmdet.registry import MODELS as REGISTRY

    use_mmdet_registry()
    return REGISTRY.build(ConfigDict(detector_config(name, smoke, num_classes))).eval()
