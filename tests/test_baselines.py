"""PTQ baselines as types: a baseline defined here, outside the library, goes through every path by name."""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace

import pytest
import torch

import qwt
from qwt.ptq import Baseline, PTQConfig, list_baselines, register_baseline
from qwt.ptq.baselines import make_baseline
from qwt.quant.modules import quant_modules


@register_baseline
@dataclass(frozen=True)
class ClippedRTN(Baseline):
    """Round-to-nearest weights on a symmetric grid clipped at ``ratio`` × max|w| per output channel; the
    activations keep the default (per-tensor uniform percentile) quantisers."""

    name = "test_clipped_rtn"
    ratio: float = 0.8

    def after_calibration(self, model, data, forward, pairs, on_phase):
        for _, module in quant_modules(model):
            for q in module.weight_quantizers():
                hi = module.weight.detach().flatten(1).abs().amax(1) * self.ratio
                shape = (-1,) + (1,) * (module.weight.dim() - 1)
                delta = (2 * hi / (q.levels - 1)).reshape(shape)
                q.set_params(delta, torch.full_like(delta, q.levels // 2))
        return []


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _fmnist(start: int, n: int, split: str = "train") -> torch.Tensor:
    from qwt.data.fashion_mnist import load_fashion_mnist, normalize

    return normalize(load_fashion_mnist(split)[0][start:start + n])


def test_a_baseline_defined_outside_the_library_runs_every_path(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # noqa: F841  (the export check runs the ONNX file)
    from qwt.export import export_onnx, run, session

    assert "test_clipped_rtn" in list_baselines()
    config = PTQConfig(baseline=ClippedRTN(ratio=0.7), w_bits=4, a_bits=4)
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _fmnist(0, 32), config)
    qkv = model.blocks[0].attn.qkv
    expected = qkv.weight.abs().amax(1) * 0.7 * 2 / 15
    assert torch.equal(qkv.weight_quantizer.delta.reshape(-1), expected)  # the hook set the grid
    assert qkv.input_quantizer.channel_axis is None  # default activation hooks: nothing channel-wise
    qwt.apply_qwt(model, _fmnist(32, 128), qwt.QwTConfig(fp16_eval=False), batch_size=32, progress=False)
    test = _fmnist(0, 500, "test")
    with torch.no_grad():
        logits = model(test)

    saved = qwt.save_quantized(model, tmp_path / "toy", "vit_fmnist", config)
    assert '"baseline": "test_clipped_rtn"' in (saved / "qwt.json").read_text()
    reloaded = qwt.load_quantized(saved)
    with torch.no_grad():
        assert torch.equal(reloaded(test), logits)

    path = export_onnx(reloaded, test[:1], tmp_path / "toy.onnx")
    exported = run(session(path), test)
    # onnxruntime's softmax differs from torch's in the last bits, and this baseline's post-softmax quantiser is
    # uniform (as percentile's): attention probabilities near a code boundary land one code apart in most
    # images (percentile W4A4 behaves the same). So, as tests/test_export.py does where rounding differs
    # everywhere: mean |Δ| ≤ 5 % of the logits' spread, and the prediction kept for ≥ 98 % of the images.
    assert (exported - logits).abs().mean() <= 0.05 * logits.std()
    assert (exported.argmax(1) == logits.argmax(1)).float().mean() >= 0.98


def test_options_round_trip_and_unknown_names_are_refused():
    config = PTQConfig(baseline=ClippedRTN(ratio=0.5))
    assert config.to_dict()["baseline_options"] == {"ratio": 0.5}
    assert PTQConfig.from_dict(config.to_dict()) == config
    assert PTQConfig.from_dict({"w_bits": 4}).baseline is None  # no baseline: the family's default, resolved later
    assert "baseline_options" not in PTQConfig(baseline="percentile").to_dict()  # saved JSON of a built-in unchanged
    with pytest.raises(ValueError, match="no option"):
        PTQConfig.from_dict({**config.to_dict(), "baseline_options": {"ratio": 0.5, "bogus": 1}})
    with pytest.raises(ValueError, match="unknown PTQ method 'nope'"):
        PTQConfig(baseline="nope")


def test_method_is_the_deprecated_name_of_baseline():
    """``method`` was the field's name: accepted (keyword only) and read for one release, with a warning, and
    never a stale value; ``baseline`` is the field ``fields()``, ``replace()``, equality and repr see."""
    with pytest.warns(DeprecationWarning, match=r"PTQConfig\(baseline=\.\.\.\)"):
        old = PTQConfig(method="gptq", w_bits=4)
    assert old == PTQConfig(baseline="gptq", w_bits=4) and hash(old) == hash(PTQConfig(baseline="gptq", w_bits=4))
    assert [f.name for f in fields(PTQConfig)][0] == "baseline" and repr(old).startswith("PTQConfig(baseline=GPTQ(")
    with pytest.raises(ValueError, match="both baseline and method"):
        PTQConfig(method="gptq", baseline="rtn")
    with pytest.raises(ValueError, match="both baseline and method"):
        PTQConfig("rtn", method="gptq")
    changed = replace(old, baseline="percentile")
    assert changed.baseline == make_baseline("percentile") and changed.w_bits == 4
    with pytest.warns(DeprecationWarning, match="PTQConfig.baseline"):
        assert changed.method is changed.baseline  # the replaced value, not the one it was built with
    with pytest.raises(ValueError, match="both baseline and method"):
        replace(old, method="rtn")


def test_the_previous_release_keys_are_read_and_the_new_ones_written():
    config = PTQConfig(baseline=ClippedRTN(ratio=0.5))
    data = config.to_dict()
    assert data["baseline"] == "test_clipped_rtn" and "method" not in data and "method_options" not in data
    old = {("method" if k == "baseline" else "method_options" if k == "baseline_options" else k): v
           for k, v in data.items()}
    assert PTQConfig.from_dict(old) == config
    with pytest.raises(ValueError, match="both 'baseline' and 'method'"):
        PTQConfig.from_dict({**data, "method": "rtn"})
    with pytest.raises(ValueError, match="both 'baseline_options' and 'method_options'"):
        PTQConfig.from_dict({**data, "method_options": {"ratio": 0.9}})


def test_an_unresolved_baseline_is_none_and_resolved_baseline_refuses_it():
    assert PTQConfig().baseline is None
    with pytest.raises(ValueError, match=r"PTQConfig\(baseline=None\).*for_family\(family\)"):
        PTQConfig().resolved_baseline()
    resolved = PTQConfig().for_family(qwt.get_family("resnet"))
    assert resolved.resolved_baseline() is resolved.baseline == make_baseline("percentile")


def test_families_state_what_they_provide_and_baselines_decide():
    assert qwt.get_family("vit").default_baseline == "repq_vit"
    assert qwt.get_family("resnet").default_baseline == "percentile"
    with pytest.raises(ValueError, match="LayerNorm → Linear pairs.*resnet"):
        qwt.quantize(qwt.create_model("resnet18", smoke=True, num_classes=4), torch.zeros(1, 3, 32, 32),
                     PTQConfig(baseline="repq_vit"))


def test_weights_only_setting_places_no_activation_quantiser():
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _images(8, 0), PTQConfig(baseline="percentile", a_bits=16))
    assert PTQConfig(a_bits=16).tag == "W4A16"
    assert not any(module.activation_quantizers() for _, module in quant_modules(model))
    fp = qwt.create_model("vit_fmnist")
    test = _images(8, 3)
    with torch.no_grad(), qwt.quant_state(model, weight=False, act=True):
        # With weights in float it is the float model (up to the attention's op order, see qwt.quant.attention).
        torch.testing.assert_close(model(test), fp(test), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2..8, or 16"):
        PTQConfig(a_bits=12)
    with pytest.raises(ValueError, match="no effect"):
        PTQConfig(a_bits=16, conv_act_bits=8)


def test_options_are_type_checked_from_their_hints():
    from qwt.ptq.baselines import GPTQ, RTN

    for bad in ({"act_order": "no"}, {"symmetric": "no"}, {"symmetric": 1}, {"group_size": True},
                {"block_size": 2.0}, {"damp": float("nan")}, {"activations": 3}):
        with pytest.raises(ValueError, match=f"GPTQ option {next(iter(bad))} takes"):
            GPTQ(**bad)
    with pytest.raises(ValueError, match="RTN option group_size takes an integer or None, got True"):
        RTN(group_size=True)
    with pytest.raises(ValueError, match="ClippedRTN option ratio takes a number"):
        ClippedRTN(ratio="0.5")  # a baseline defined outside the library is checked the same way
    # Valid values keep working; a whole number for a float option is recorded as the float that runs.
    assert GPTQ(damp=0, group_size=64, act_order=True).options() == {
        "damp": 0.0, "block_size": 128, "act_order": True, "group_size": 64, "symmetric": False, "activations": None}
    assert type(GPTQ(damp=0).damp) is float and RTN(group_size=None, activations="tensor").group_size is None


def test_command_line_options_are_read_as_the_option_types():
    from qwt.ptq.baselines import parse_options

    assert parse_options("gptq", [("act_order", "TRUE"), ("symmetric", "false"), ("group_size", "None"),
                                  ("damp", "0"), ("block_size", "+64"), ("activations", "percentile")]) == {
        "act_order": True, "symmetric": False, "group_size": None, "damp": 0.0, "block_size": 64,
        "activations": "percentile"}
    assert parse_options(ClippedRTN, [("ratio", "0.25")]) == {"ratio": 0.25}
    for name, text, accepts in [("act_order", "no", "True or False"), ("symmetric", "1", "True or False"),
                                ("group_size", "1.5", "an integer or None"), ("group_size", "true", "an integer"),
                                ("block_size", "none", "an integer"), ("damp", "nan", "a number"),
                                ("damp", "inf", "a number")]:
        with pytest.raises(ValueError, match=f"'gptq' option {name}={text}: expected {accepts}"):
            parse_options("gptq", [(name, text)])
    with pytest.raises(ValueError, match="no option.*bogus"):
        parse_options("gptq", [("bogus", "1")])


def test_the_classification_cli_records_typed_options_and_refuses_others(tmp_path, capsys):
    from qwt.tasks import protocol
    from qwt.tasks.classification import Classification, main
    from qwt.tasks.cli import ptq_config

    base = ["--model", "deit_small", "--smoke", "--out", str(tmp_path / "out"), "--method", "gptq"]
    args = protocol.parse_args(Classification("vit"), "t",
        base + ["--method-option", "act_order=True", "--method-option", "group_size=32", "--method-option", "damp=0"])
    options = ptq_config(args, qwt.get_family("vit")).to_dict()["baseline_options"]
    assert options["act_order"] is True and options["group_size"] == 32 and options["damp"] == 0.0
    assert main("vit", "t", base + ["--method-option", "act_order=no"]) == 2
    err = capsys.readouterr().err
    assert err == "error: PTQ method 'gptq' option act_order=no: expected True or False\n"
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_rtn_quantizes_a_model_with_conv_weights_and_reloads_it_bit_identical(tmp_path):
    """RTN is documented for any family, but its weight quantiser refused every conv weight (a ViT's patch
    embedding, a CNN's stem) deep inside calibration; conv weights are now one row per output channel."""
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    config = PTQConfig(baseline=make_baseline("rtn", {"group_size": 8}), w_bits=4, a_bits=8)
    model = qwt.quantize(qwt.create_model("vit_fmnist"), images, config)
    embed = model.patch_embed.proj
    assert embed.weight.dim() == 4 and embed.weight_quantizer.delta.shape == (embed.weight.shape[0], 2, 1)
    with torch.no_grad():
        expected = model(images)
    saved = qwt.save_quantized(model, tmp_path / "rtn", "vit_fmnist", config)
    with torch.no_grad():
        assert torch.equal(qwt.load_quantized(saved)(images), expected)


def test_an_activation_only_option_is_refused_where_activations_stay_in_float():
    """RTN's ``activations`` shapes only activation quantisers: with A16 it would do nothing and still be recorded
    as if it had run; the default value, and any value with quantised activations, are taken."""
    from qwt.errors import InputError
    from qwt.tasks.llm import parse_bits

    static = make_baseline("rtn", {"activations": "tensor"})
    with pytest.raises(ValueError, match="activations=tensor shapes the activation quantisers") as refusal:
        qwt.PTQConfig(baseline=static, w_bits=3, a_bits=16)
    assert "\n" not in str(refusal.value)
    assert qwt.PTQConfig(baseline=static, w_bits=4, a_bits=8).tag == "W4A8"
    assert qwt.PTQConfig(baseline="rtn", w_bits=3, a_bits=16).tag == "W3A16"
    with pytest.raises(InputError, match="--bits W3A16: rtn option activations=tensor shapes"):
        parse_bits("W3A16", "rtn", {"activations": "tensor"})
