"""One place decides the default PTQ baseline: the model's family (``Family.default_baseline``). ``PTQConfig()``
means that default, resolved once where the family is known, and a composed baseline (GPTQ) takes its
activation partner from the same field."""
from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import torch

import qwt
from qwt.models.decoder_lm import DECODER_LM, decoder_lm_rule
from qwt.models.registry import _REGISTRY
from qwt.models.vit import VIT, vit_layer_rule
from qwt.ptq import PTQConfig
from qwt.ptq.baselines import GPTQ, RTN
from qwt.quant.modules import quant_modules
from qwt.quant.rtn import TokenQuantizer
from qwt.tasks import classification, protocol

#: What each family runs without a method: RepQ-ViT on ViT/DeiT/Swin, percentile on CNNs, RTN on decoder LMs.
EXPECTED = {"vit": "repq_vit", "swin": "repq_vit", "mmdet_swin": "repq_vit", "resnet": "percentile",
            "convnext": "percentile", "efficientnet": "percentile", "decoder_lm": "rtn"}
MODELS = [name for name in qwt.list_models() if not name.startswith("_")]


def _family(name: str) -> qwt.Family:
    if name == "mmdet_swin":
        pytest.importorskip("mmdet")
        importlib.import_module("qwt.tasks.detection.plan")  # registers the detector family
    return qwt.get_family(name)


def test_every_family_names_a_default_and_the_table_covers_them():
    assert set(qwt.list_families()) <= set(EXPECTED)
    for name in qwt.list_families():
        assert qwt.get_family(name).default_baseline == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ptq_config_resolves_to_the_family_default_and_gptq_to_its_partner(name):
    family = _family(name)
    config = PTQConfig(w_bits=3, a_bits=5).for_family(family)
    assert config.baseline.name == EXPECTED[name] and config.to_dict()["baseline"] == EXPECTED[name]
    assert (config.w_bits, config.a_bits, config.tag) == (3, 5, "W3A5")
    assert config.for_family(family) == config  # resolving twice changes nothing
    gptq = PTQConfig(baseline=GPTQ(act_order=True)).for_family(family).baseline
    assert gptq == GPTQ(act_order=True, activations=EXPECTED[name])
    assert gptq.activation_baseline().name == EXPECTED[name]
    # A partner that is named stays what it is.
    assert PTQConfig(baseline=GPTQ(activations="percentile")).for_family(family).baseline.activations == "percentile"


@pytest.mark.parametrize("name", MODELS)
def test_quantize_without_a_config_runs_the_family_default(name):
    entry = _REGISTRY[name]
    torch.manual_seed(0)
    fp = entry.build(pretrained=False, **entry.reduced).eval()
    g = torch.Generator().manual_seed(0)
    calib = entry.reduced_batch(g) if entry.reduced_batch else torch.randn(8, *entry.reduced_input, generator=g)
    default = qwt.quantize(copy.deepcopy(fp), calib)
    explicit = qwt.quantize(copy.deepcopy(fp), calib, PTQConfig(baseline=EXPECTED[entry.family.name]))
    with torch.no_grad():
        out, ref = default(calib), explicit(calib)
    assert torch.equal(getattr(out, "logits", out), getattr(ref, "logits", ref))
    assert [type(m).__name__ for _, m in quant_modules(default)] == [type(m).__name__ for _, m in quant_modules(explicit)]


def test_gptq_on_a_decoder_lm_takes_rtn_inputs_as_the_lm_task_asks():
    """Before, GPTQ's partner on any "token model" was RepQ-ViT (a static per-tensor grid on an LM's Linear
    inputs); the decoder-LM family's default is RTN, per-token at run time, which the LM task named by hand."""
    entry = _REGISTRY["hf_causal_lm"]
    model = entry.build(pretrained=False, **entry.reduced)
    rule = decoder_lm_rule(model, PTQConfig(baseline=GPTQ(), a_bits=8).for_family(DECODER_LM))
    inputs = [rule(n, m).input_quantizer for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and n.startswith("model.layers.")]
    assert inputs and all(isinstance(q, TokenQuantizer) for q in inputs)
    from qwt.tasks import llm

    assert llm.parse_bits("W4A8", "gptq").baseline == GPTQ(activations="rtn")  # the LM task's rows unchanged
    assert llm.parse_bits("W4A8").baseline == RTN()


def test_an_unresolved_config_is_refused_where_it_would_run(tiny_vit):
    with pytest.raises(ValueError, match=r"for_family\(family\)"):
        PTQConfig().to_dict()  # a record or a save never names "the default"
    with pytest.raises(ValueError, match=r"for_family\(family\)"):
        vit_layer_rule(tiny_vit, PTQConfig())
    with pytest.raises(ValueError, match=r"GPTQ\(activations=None\).*for_family\(family\)"):
        vit_layer_rule(tiny_vit, PTQConfig(baseline=GPTQ()))
    assert not list(quant_modules(tiny_vit))
    vit_layer_rule(tiny_vit, PTQConfig(baseline=GPTQ()).for_family(VIT))  # resolved: fine


def test_a_family_default_it_cannot_run_is_refused_at_registration():
    resnet = qwt.get_family("resnet")
    with pytest.raises(ValueError, match="family 'resnet': default_baseline 'repq_vit': .*LayerNorm → Linear pairs"):
        dataclasses.replace(resnet, default_baseline="repq_vit")
    with pytest.raises(ValueError, match="family 'resnet': default_baseline 'nope': unknown PTQ method"):
        dataclasses.replace(resnet, default_baseline="nope")
    with pytest.raises(ValueError, match="family 'resnet': default_baseline 'gptq': GPTQ activations must name"):
        dataclasses.replace(resnet, default_baseline="gptq")
    with pytest.raises(ValueError, match="default_baseline must be a registered PTQ method's name"):
        dataclasses.replace(resnet, default_baseline=RTN())


@pytest.mark.parametrize("task,model,method,suffix", [
    ("vit", "deit_tiny", None, ""), ("vit", "deit_tiny", "repq_vit", ""), ("vit", "deit_tiny", "percentile", "_percentile"),
    ("resnet", "resnet18", "percentile", ""), ("resnet", "resnet18", "gptq", "_gptq"),
])
def test_classification_records_name_only_a_non_default_method(task, model, method, suffix):
    argv = ["--model", model, "--smoke"] + (["--method", method] if method else [])
    cls = classification.Classification(task)
    args = protocol.parse_args(cls, "", argv)
    assert cls.stem(args) == f"{model}_W4A4{suffix}_smoke"
    from qwt.tasks.cli import ptq_config

    config = ptq_config(args, qwt.get_model_entry(model).family)
    assert config.baseline.name == (method or EXPECTED[qwt.get_model_entry(model).family.name])
