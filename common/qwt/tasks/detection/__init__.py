"""QwT on COCO detection with mmdet 3.x: configs, checkpoint conversion, RepQ-ViT layer map, QwT plan, COCO glue.

Importing the package makes ``mmcv.ops`` importable on ``mmcv-lite`` (torchvision NMS / RoIAlign, see
:mod:`.mmcv_ops`), so it must be imported before ``mmdet.models``.
"""
from .mmcv_ops import install_fallback_ops

#: True when mmcv has no compiled ops and the torchvision stand-in serves NMS and RoIAlign.
FALLBACK_OPS: bool = install_fallback_ops()
