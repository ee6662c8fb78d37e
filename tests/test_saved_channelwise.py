"""Channel-wise compensation (a per-channel gain and shift after each residual branch's last layer) is saved and
loaded bit-identically, and a consistently forged channel-wise entry (see the ``resign`` fixture) is refused."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import qwt
from qwt.compensation import ChannelAffine, fit_compensation
from qwt.errors import InputError
from qwt.models.decoder_lm import build_from_config, tiny_config

VIT_CONFIG = qwt.PTQConfig(w_bits=4, a_bits=4)
LM_CONFIG = qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=8)
CHANNELWISE = qwt.QwTConfig(fp16_eval=False, compensation="channelwise")
PROJ = "blocks.0.attn.proj"


def _fmnist(n: int, start: int = 0) -> torch.Tensor:
    from qwt.data.fashion_mnist import load_fashion_mnist, normalize

    return normalize(load_fashion_mnist("train")[0][start:start + n])


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


def _corrected(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.gain.numel() for name, m in model.named_modules() if isinstance(m, ChannelAffine)}


@pytest.fixture(scope="module")
def vit():
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _fmnist(32), VIT_CONFIG)
    qwt.apply_qwt(model, _fmnist(64, 32), qwt.QwTConfig(compensation="channelwise"), progress=False)
    return model


@pytest.fixture
def saved_vit(vit, tmp_path):
    return qwt.save_quantized(vit, tmp_path / "m", "vit_fmnist", VIT_CONFIG)


def test_a_channelwise_vit_round_trips_bit_identically(vit, saved_vit):
    # Before: save_quantized refused any model carrying a ChannelAffine.
    meta = json.loads((saved_vit / "qwt.json").read_text())
    assert {e["path"]: (e["form"], e["after"], e["channels"]) for e in meta["compensation"]} == \
        {name: ("channelwise", "linear", 64) for name in _corrected(vit)}
    loaded = qwt.load_quantized(saved_vit)
    assert _corrected(loaded) == _corrected(vit) and len(_corrected(vit)) == 12
    with torch.no_grad():
        assert torch.equal(loaded(_fmnist(16, 500)), vit(_fmnist(16, 500)))


@pytest.mark.parametrize("model_type,after", [("llama", "linear"), ("gemma3_text", "norm")])
def test_a_channelwise_language_model_round_trips_bit_identically(tmp_path, model_type, after):
    # Gemma 3's corrections follow its post-branch norms, not a Linear: described as such and rebuilt there.
    torch.manual_seed(0)
    model = qwt.quantize(build_from_config(config=tiny_config(model_type)), _ids(4, 1), LM_CONFIG)
    qwt.apply_qwt(model, _ids(16, 2), CHANNELWISE, batch_size=4, progress=False)
    saved = qwt.save_quantized(model, tmp_path / "lm", "hf_causal_lm", LM_CONFIG, {"config": tiny_config(model_type)})
    meta = json.loads((saved / "qwt.json").read_text())
    assert {e["after"] for e in meta["compensation"]} == {after} and len(meta["compensation"]) == 4
    loaded = qwt.load_quantized(saved)
    assert _corrected(loaded) == _corrected(model)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(4, 3)).logits, model(_ids(4, 3)).logits)


def test_channelwise_corrections_inside_dense_compensated_blocks_round_trip(tmp_path):
    # Dense wrappers around blocks holding channel-wise corrections (built with the library's fit directly:
    # qwt.apply_qwt refuses a second fit): each correction's path runs through the dense wrapper, which the
    # structure must get first.
    torch.manual_seed(0)
    model = qwt.quantize(build_from_config(config=tiny_config("llama")), _ids(4, 1), LM_CONFIG)
    qwt.apply_qwt(model, _ids(16, 2), CHANNELWISE, batch_size=4, progress=False)
    fit_compensation(model, qwt.family_of(model).plan(model), _ids(16, 2), qwt.QwTConfig(fp16_eval=False),
                     batch_size=4, progress=False)
    saved = qwt.save_quantized(model, tmp_path / "lm", "hf_causal_lm", LM_CONFIG, {"config": tiny_config("llama")})
    forms = [(e["path"], e["form"]) for e in json.loads((saved / "qwt.json").read_text())["compensation"]][:2]
    assert forms == [("model.layers.0", "linear"), ("model.layers.0.block.self_attn.o_proj", "channelwise")]
    with torch.no_grad():
        assert torch.equal(qwt.load_quantized(saved)(_ids(4, 3)).logits, model(_ids(4, 3)).logits)


def _entry(meta: dict, path: str = PROJ) -> dict:
    return next(e for e in meta["compensation"] if e["path"] == path)


def _narrowed(saved) -> dict[str, torch.Tensor]:
    """The tensors with PROJ's gain and shift cut to 32 channels, as a forger would to match a narrower entry."""
    state = load_file(str(saved / "model.safetensors"))
    for leaf in ("gain", "shift"):
        state[f"{PROJ}.{leaf}"] = state[f"{PROJ}.{leaf}"][:32].clone()
    return state


@pytest.mark.parametrize("edit,narrow,message", [
    (lambda meta: _entry(meta).update(channels=32), True,
     f"{PROJ} is a linear layer of 64 output channels, not the linear layer of 32"),
    (lambda meta: _entry(meta).update(after="conv"), False,
     f"{PROJ} is a linear layer of 64 output channels, not the conv layer of 64"),
    (lambda meta: _entry(meta).update(path="blocks.0.mlp.fc1"), False,
     "blocks.0.mlp.fc1 is a linear layer of 128 output channels, not the linear layer of 64"),
    (lambda meta: _entry(meta).update(path="blocks.0.attn"), False,
     "blocks.0.attn: a channel-wise correction follows a QuantAttention, which has no per-channel output"),
    (lambda meta: _entry(meta).update(path="blocks.9.attn.proj"), False, "does not describe a buildable model"),
    (lambda meta: meta["compensation"].remove(_entry(meta)), False,
     f"{PROJ}.layer.input_quantizer: the config does not quantise it"),
], ids=["narrower", "another-kind", "another-layer", "not-a-layer", "no-such-path", "entry-dropped"])
def test_a_forged_channelwise_entry_is_refused(saved_vit, resign, edit, narrow, message):
    resign(saved_vit, _narrowed(saved_vit) if narrow else None, edit=edit)
    with pytest.raises(InputError, match=message):
        qwt.load_quantized(saved_vit)


@pytest.mark.parametrize("edit,message", [
    (lambda meta: _entry(meta).update(channels=0), "channels an integer in 1..100000"),
    (lambda meta: _entry(meta).update(after="embedding"), "after is one of linear, conv, norm"),
    (lambda meta: _entry(meta).update(form="diagonal"), "its form is linear, lowrank, conv or channelwise"),
], ids=["no-channels", "unknown-layer-kind", "unknown-form"])
def test_a_malformed_channelwise_entry_is_refused_before_it_is_built(saved_vit, resign, edit, message):
    resign(saved_vit, edit=edit)
    with pytest.raises(InputError, match=f"declares what no saved model needs: .*{message}"):
        qwt.load_quantized(saved_vit)


@pytest.mark.parametrize("value,message", [
    (-1.0, f"{PROJ}.gain holds a negative gain, which the channel-wise fit never gives"),
    (float("inf"), f"{PROJ}.gain holds NaN or Inf"),
], ids=["negative", "infinite"])
def test_a_gain_the_fit_cannot_give_is_refused(saved_vit, resign, value, message):
    state = load_file(str(saved_vit / "model.safetensors"))
    state[f"{PROJ}.gain"] = state[f"{PROJ}.gain"].clone()
    state[f"{PROJ}.gain"][0] = value
    resign(saved_vit, state)
    with pytest.raises(InputError, match=message):
        qwt.load_quantized(saved_vit)


def test_a_model_whose_correction_does_not_fit_its_layer_is_not_saved(vit, tmp_path):
    model = copy.deepcopy(vit)
    affine = model.get_submodule(PROJ)
    affine.gain, affine.shift = affine.gain[:32].clone(), affine.shift[:32].clone()
    with pytest.raises(InputError, match="not the linear layer of 32"):
        qwt.save_quantized(model, tmp_path / "m", "vit_fmnist", VIT_CONFIG)
    assert not (tmp_path / "m").exists()
