"""Size accounting against the authors' published count, and save/load round trips."""
import json

import pytest
import timm
import torch

from qwt import PTQConfig, QwTConfig, apply_qwt, load_quantized, model_size_mb, quantize, save_quantized
from qwt.compensation import LinearCompensated
from qwt.models import ModelEntry, register_model
from qwt.models.vit import VIT
from qwt.models.registry import _REGISTRY
from qwt.models.vit import vit_layer_rule
from qwt.ptq import quantize_modules
from qwt.quant import swap_module


def test_size_matches_the_authors_deit_tiny_count():
    # The authors' count for deit_tiny W4A4 with the QwT layer map counts 3.27184 MB, 4.165792 MB with 12 compensations.
    model = timm.create_model("deit_tiny_patch16_224")
    quantize_modules(model, vit_layer_rule(model, PTQConfig(baseline="repq_vit", w_bits=4, a_bits=4)))
    assert model_size_mb(model) == 3.27184
    for i, block in enumerate(model.blocks):
        swap_module(model, f"blocks.{i}", LinearCompensated.zeros(block, 192, 192))
    assert model_size_mb(model) == 4.165792


def test_size_hand_count_small_linear():
    model = torch.nn.Sequential(torch.nn.Linear(10, 4))
    assert model_size_mb(model) == (44 * 32) // 8 / 1e6
    from qwt.quant import QuantLinear, UniformQuantizer
    model[0] = QuantLinear(model[0], UniformQuantizer(8), UniformQuantizer(3, channel_axis=0))
    assert model_size_mb(model) == (40 * 3 + 4 * 32) // 8 / 1e6


@pytest.fixture
def tiny_entry():
    # qkv without bias: reparameterisation creates one, which the loader must recreate.
    def build(pretrained: bool = True):
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10, qkv_bias=False).eval()

    entry = register_model(ModelEntry("_test_tiny_vit", VIT, build, "test model"))
    yield entry
    _REGISTRY.pop(entry.name)


def test_save_load_round_trip_is_identical(tiny_entry, images, tmp_path):
    config = PTQConfig(w_bits=4, a_bits=4)
    model = quantize(tiny_entry.build(), images, config)
    apply_qwt(model, images, QwTConfig(start_block=1), progress=False)
    expected = model(images)
    out = save_quantized(model, tmp_path / "saved", tiny_entry.name, config, extra={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "qwt.json"]
    meta = json.loads((out / "qwt.json").read_text())
    assert len(meta["compensation"]) == 3 and meta["ptq"]["w_bits"] == 4
    loaded = load_quantized(out)
    assert torch.equal(loaded(images), expected)
    assert model_size_mb(loaded) == model_size_mb(model)
    assert loaded.blocks[0].block.attn.qkv.input_quantizer.channel_axis is None  # reparameterised → per tensor
    assert tiny_entry.build().blocks[0].attn.qkv.bias is None and loaded.blocks[0].block.attn.qkv.bias is not None


def test_load_refuses_missing_or_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_quantized"):
        load_quantized(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "qwt.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_quantized(tmp_path)


def test_save_leaves_nothing_half_written(tiny_entry, images, tmp_path, monkeypatch):
    model = quantize(tiny_entry.build(), images, PTQConfig())
    import qwt.serialization.store as ser

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", boom)
    with pytest.raises(OSError):
        save_quantized(model, tmp_path / "out", tiny_entry.name, PTQConfig())
    assert list(tmp_path.iterdir()) == []
