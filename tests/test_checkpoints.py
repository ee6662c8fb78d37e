"""Checkpoint loading: original key layouts converted, wrappers unwrapped, pickles refused."""
import re

import pytest
import torch
from safetensors.torch import save_file

import qwt
from qwt.models.checkpoint import read_state_dict


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_swin_original_layout_is_converted(tmp_path):
    """Swin-Transformer release layout: PatchMerging at the end of stages, head without .fc."""
    ref = qwt.create_model("swin_tiny", smoke=True, num_classes=4)
    original = {}
    for k, v in ref.state_dict().items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        original[k.replace("head.fc.", "head.")] = v
    assert "layers.0.downsample.reduction.weight" in original and "head.weight" in original
    torch.save({"model": original}, tmp_path / "swin_original.pth")
    loaded = qwt.create_model("swin_tiny", smoke=True, num_classes=4, checkpoint=tmp_path / "swin_original.pth")
    assert torch.equal(loaded(_images()), ref(_images()))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_deit_checkpoint_formats(tmp_path, suffix):
    ref = qwt.create_model("deit_small_distilled", smoke=True, num_classes=4)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = qwt.create_model("deit_small_distilled", smoke=True, num_classes=4, checkpoint=path)
    assert torch.equal(loaded(_images()), ref(_images()))


def test_brecq_resnet_layout_with_module_prefix(tmp_path):
    ref = qwt.create_model("resnet18", smoke=True)
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 90},
               tmp_path / "resnet18_imagenet.pth.tar")
    loaded = qwt.create_model("resnet18", checkpoint=tmp_path / "resnet18_imagenet.pth.tar")
    assert torch.equal(loaded(_images()), ref(_images()))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weights": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pth")


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not match"):
        qwt.create_model("resnet18", checkpoint=tmp_path / "wrong.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        qwt.create_model("resnet50", checkpoint=tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="resnet50_imagenet.pth.tar"):
        qwt.create_model("resnet50")
