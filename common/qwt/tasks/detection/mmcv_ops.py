"""mmcv's compiled ops for ``mmcv-lite``: NMS and RoIAlign from torchvision.

``mmcv.ops`` imports its compiled extension ``mmcv._ext`` at import time, so on ``mmcv-lite`` (no compiled ops)
importing mmdet's models fails. Inference of Mask R-CNN / Cascade Mask R-CNN only calls two of those kernels:
``nms`` (offset 0) and ``roi_align_forward`` (average pooling). ``torchvision.ops`` implements both with the same
arithmetic, on CPU and CUDA; on CPU the results equal mmcv 2.1.0's compiled kernels bit for bit (checked against
them, ties in NMS scores included). :func:`install_fallback_ops` registers a stand-in ``mmcv._ext`` with
those two; every other op raises a clear error when called. A real compiled extension is never replaced.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable

import torch
import torchvision.ops

EXTENSION = "mmcv._ext"
_FULL_MMCV = "install the full mmcv 2.1.0 (QwT-det-RepQ-ViT/README.md, section 'GPU: full mmcv 2.1.0')"


def nms(bboxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Indices kept by greedy NMS, highest score first (mmcv's ``nms`` kernel contract).

    Boxes are visited in the order of mmcv's kernel, ``scores.sort(descending=True)`` (not stable), so boxes with
    exactly equal scores are also resolved as mmcv resolves them; torchvision's own sort is stable.
    """
    if offset != 0:
        raise NotImplementedError(f"NMS with offset={offset} (legacy +1 box widths) needs mmcv's kernel: {_FULL_MMCV}")
    order = scores.sort(0, descending=True).indices
    return order[torchvision.ops.nms(bboxes[order], scores[order], float(iou_threshold))]


def roi_align_forward(features: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                      sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """Fill ``output`` with RoIAlign of ``features`` over ``rois`` (batch index, x1, y1, x2, y2); average mode only."""
    if pool_mode != 1:
        raise NotImplementedError(f"RoIAlign max pooling needs mmcv's kernel: {_FULL_MMCV}")
    output.copy_(torchvision.ops.roi_align(features, rois, (aligned_height, aligned_width), spatial_scale,
                                           sampling_ratio, aligned))


class FallbackExtension(types.ModuleType):
    """Stand-in for ``mmcv._ext``: the two inference ops above; any other op exists (mmcv checks names at import)
    but raises when called."""

    def __init__(self) -> None:
        super().__init__(EXTENSION, __doc__)
        self.__spec__ = importlib.machinery.ModuleSpec(EXTENSION, loader=None)
        self.nms = nms
        self.roi_align_forward = roi_align_forward

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args: object, **kwargs: object) -> None:
            raise NotImplementedError(f"mmcv op {name!r} has no torchvision fallback: {_FULL_MMCV}")

        return unavailable


def compiled_ops_available() -> bool:
    """True when a compiled ``mmcv._ext`` (full mmcv) is importable, i.e. not our stand-in."""
    loaded = sys.modules.get(EXTENSION)
    if loaded is not None:
        return not isinstance(loaded, FallbackExtension)
    try:
        return importlib.util.find_spec(EXTENSION) is not None
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("mmcv is not installed; detection needs "
                                  "`pip install -r requirements-det.txt`") from err


def install_fallback_ops() -> bool:
    """Register the stand-in as ``mmcv._ext`` unless compiled ops exist; returns whether the fallback is active.

    Must run before ``mmcv.ops`` (hence ``mmdet.models``) is first imported.
    """
    if compiled_ops_available():
        return False
    sys.modules.setdefault(EXTENSION, FallbackExtension())
    return True
