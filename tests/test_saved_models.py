"""Saved models describe themselves: a config that disagrees with the model, and tampered or damaged files,
are refused with a message naming the file, instead of loading into a model that gives wrong logits."""
import hashlib
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from qwt import PTQConfig, QwTConfig, apply_qwt, load_quantized, quantize, save_quantized
from qwt.errors import InputError
from qwt.models import ModelEntry, register_model
from qwt.models.registry import _REGISTRY
from qwt.models.vit import VIT


@pytest.fixture(scope="module")
def entry():
    def build(pretrained: bool = True, depth: int = 2):
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=10).eval()

    entry = register_model(ModelEntry("_test_saved_vit", VIT, build, "test model"))
    yield entry
    _REGISTRY.pop(entry.name)


@pytest.fixture(scope="module")
def w6a6(entry):
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = quantize(entry.build(), images, PTQConfig(w_bits=6, a_bits=6))
    apply_qwt(model, images, QwTConfig(), progress=False)
    return model, images


@pytest.fixture
def saved(entry, w6a6, tmp_path):
    return save_quantized(w6a6[0], tmp_path / "m", entry.name, PTQConfig(w_bits=6, a_bits=6))


def test_description_comes_from_the_model(saved, w6a6):
    meta = json.loads((saved / "qwt.json").read_text())
    bits = {spec["n_bits"] for name, spec in meta["quantizers"].items() if "blocks" in name}
    floors = {spec["floor"] for name, spec in meta["quantizers"].items() if spec["kind"] == "log_sqrt2"}
    assert bits == {6} and floors == {1e-6}
    assert torch.equal(load_quantized(saved)(w6a6[1]), w6a6[0](w6a6[1]))


def test_a_config_that_disagrees_with_the_model_is_refused(entry, w6a6, tmp_path):
    # Before: a W6A6 model saved with a W4A4 config reloaded silently with logits off by up to 2.8.
    with pytest.raises(InputError, match="6 bits, the config to 4"):
        save_quantized(w6a6[0], tmp_path / "m", entry.name, PTQConfig(w_bits=4, a_bits=4))
    with pytest.raises(InputError, match="log floor"):
        save_quantized(w6a6[0], tmp_path / "m", entry.name, PTQConfig(w_bits=6, a_bits=6, log_floor=None))
    assert not (tmp_path / "m").exists()


def test_a_model_name_that_does_not_match_the_structure_is_refused(entry, w6a6, tmp_path):
    with pytest.raises(InputError, match="does not describe a buildable model"):
        save_quantized(w6a6[0], tmp_path / "m", entry.name, PTQConfig(w_bits=6, a_bits=6), {"depth": 1})


def test_an_edited_description_is_refused(saved):
    # Before: swapping the bit widths in qwt.json loaded and gave ~11 % top-1.
    meta = json.loads((saved / "qwt.json").read_text())
    for spec in meta["quantizers"].values():
        spec["n_bits"] = 4
    (saved / "qwt.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(InputError, match="qwt.json is not the description saved with"):
        load_quantized(saved)


def resign(saved, state=None, edit=None):
    """Rewrite a save as a forger who knows the format would: tensors and description changed, every checksum
    and the description's hash recomputed, so only the checks of the contents themselves can refuse it."""
    from qwt.serialization import _HASH_KEY, tensor_sha256

    state = load_file(str(saved / "model.safetensors")) if state is None else state
    meta = json.loads((saved / "qwt.json").read_text())
    meta["tensors"] = {k: tensor_sha256(v) for k, v in state.items()}
    if edit is not None:
        edit(meta)
    text = json.dumps(meta, indent=2)
    (saved / "qwt.json").write_text(text)
    save_file(state, str(saved / "model.safetensors"),
              metadata={"format": "pt", _HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})


@pytest.mark.parametrize("tamper,message", [
    (lambda s: s.update({"blocks.0.block.mlp.fc1.weight": s["blocks.0.block.mlp.fc1.weight"] * float("nan")}), "NaN"),
    (lambda s: s.update({"blocks.0.block.mlp.fc1.weight_quantizer.delta":
                         s["blocks.0.block.mlp.fc1.weight_quantizer.delta"].to(torch.int32)}), "int32, expected"),
    (lambda s: s.update({"blocks.0.block.mlp.fc1.weight_quantizer.delta": torch.ones(3)}), "shape"),
])
def test_tampered_tensors_are_refused(saved, tamper, message):
    state = load_file(str(saved / "model.safetensors"))
    tamper(state)
    resign(saved, state)
    with pytest.raises(InputError, match=message):
        load_quantized(saved)


def test_damaged_files_are_named(saved):
    tensors = saved / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(InputError, match="model.safetensors cannot be read"):
        load_quantized(saved)
    (saved / "qwt.json").write_text('{"format_version": 2, "model": ')
    with pytest.raises(InputError, match="qwt.json is not valid JSON"):
        load_quantized(saved)
