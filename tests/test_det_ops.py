"""mmcv-lite path: NMS and RoIAlign through mmcv's own API, served by the torchvision stand-in."""
import subprocess
import sys

import pytest
import torch

import qwt.tasks.detection as qwt_det  # installs the stand-in before mmcv.ops is imported
from qwt.tasks.detection import mmcv_ops


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp_min(0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp_min(0)
    inter = w * h
    area = lambda t: (t[2] - t[0]) * (t[3] - t[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    keep: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if all(_iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


def test_fallback_is_active_on_mmcv_lite():
    assert not mmcv_ops.compiled_ops_available()
    assert qwt_det.FALLBACK_OPS
    assert isinstance(sys.modules["mmcv._ext"], mmcv_ops.FallbackExtension)


@pytest.mark.parametrize("ties", [False, True])
def test_mmcv_nms_matches_greedy_reference(ties):
    """Greedy NMS visiting boxes in mmcv's kernel order (unstable descending sort, which decides exact ties)."""
    from mmcv.ops import batched_nms, nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], dim=1)
    scores = torch.rand(200, generator=g)
    if ties:
        scores = (scores * 8).round() / 8
    dets, keep = nms(boxes, scores, 0.5)
    expected = _greedy_nms(boxes, scores, 0.5)
    assert keep.tolist() == expected
    assert torch.equal(dets[:, 4], scores[keep])
    labels = torch.randint(0, 3, (200,), generator=g)
    _, kept = batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.5))
    per_class = sorted(i for c in range(3) for i in (labels == c).nonzero().flatten()[
        _greedy_nms(boxes[labels == c], scores[labels == c], 0.5)].tolist())
    assert sorted(kept.tolist()) == per_class


@pytest.mark.parametrize("aligned", [True, False])
def test_mmcv_roi_align_is_exact_on_a_linear_map(aligned):
    """Bilinear sampling reproduces a linear map exactly, so each bin is the map at the bin centre."""
    from mmcv.ops import RoIAlign

    h, w, scale = 40, 50, 0.5
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    features = torch.stack([0.3 * xs - 0.2 * ys + 1, 2 * ys]).unsqueeze(0).float()
    rois = torch.tensor([[0, 20.0, 16.0, 60.0, 50.0], [0, 30.0, 30.0, 44.0, 70.0]])
    out = RoIAlign((3, 4), spatial_scale=scale, sampling_ratio=0, aligned=aligned)(features, rois)
    offset = 0.5 if aligned else 0.0
    for r, (_, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x0, y0 = x1 * scale - offset, y1 * scale - offset
        bw, bh = (x2 - x1) * scale / 4, (y2 - y1) * scale / 3
        cx = x0 + (torch.arange(4, dtype=torch.float64) + 0.5) * bw
        cy = y0 + (torch.arange(3, dtype=torch.float64) + 0.5) * bh
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        expected = torch.stack([0.3 * gx - 0.2 * gy + 1, 2 * gy]).float()
        torch.testing.assert_close(out[r], expected, atol=1e-4, rtol=0)


def test_unsupported_ops_fail_loudly():
    from mmcv.ops import RoIAlign, nms

    with pytest.raises(NotImplementedError, match="full mmcv"):
        RoIAlign((2, 2), pool_mode="max")(torch.rand(1, 1, 8, 8), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]))
    with pytest.raises(NotImplementedError, match="offset"):
        nms(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([1.0]), 0.5, offset=1)
    with pytest.raises(NotImplementedError, match="deform_conv_forward"):
        sys.modules["mmcv._ext"].deform_conv_forward()


def test_a_compiled_extension_is_left_alone():
    """Where mmcv._ext can be found (full mmcv), nothing is installed and the real module is what mmcv loads."""
    script = """
import importlib.machinery, sys
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "mmcv._ext":
            return importlib.machinery.ModuleSpec(name, loader=None)
sys.meta_path.insert(0, Finder())
import qwt.tasks.detection as qwt_det
assert qwt_det.FALLBACK_OPS is False
assert "mmcv._ext" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
