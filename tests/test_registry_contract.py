"""Every registered model honours the family contract, in its reduced size: it builds, quantises with its
family's rule (reparameterisation keeps the FP function), its QwT plan walks from the stem through every step
with the feature layout its compensation form expects, QwT fits on one batch, and the result round-trips through
save/load. A family is tested the moment it registers."""
import copy
import json

import pytest
import torch

import qwt
from qwt.compensation import infer_stride
from qwt.models.registry import _REGISTRY

MODELS = [name for name in qwt.list_models() if not name.startswith("_")]


def _build(entry):
    torch.manual_seed(0)
    return entry.build(pretrained=False, **entry.reduced).eval()


def _logits(output):
    """A classifier's output, or a language model's logits (transformers returns an output object)."""
    return getattr(output, "logits", output)


@pytest.mark.parametrize("name", MODELS)
def test_registered_model_honours_the_family_contract(name, tmp_path):
    entry = _REGISTRY[name]
    fp = _build(entry)
    family = qwt.family_of(fp)
    assert family is entry.family
    g = torch.Generator().manual_seed(0)
    images = entry.reduced_batch(g) if entry.reduced_batch else torch.randn(8, *entry.reduced_input, generator=g)
    with torch.no_grad():
        reference = _logits(fp(images))
    config = qwt.PTQConfig(w_bits=4, a_bits=4)  # the family's default baseline
    model = qwt.quantize(copy.deepcopy(fp), images, config)
    with torch.no_grad(), qwt.quant_state(model, weight=False, act=False):
        # Reparameterisation is exact in real arithmetic; in FP32 the folded sums round differently (≪ 1e-4).
        torch.testing.assert_close(_logits(model(images)), reference, atol=1e-4, rtol=1e-4)

    plan = family.plan(model)
    with torch.no_grad():
        x = plan.stem(images)
        for step in plan.steps:
            y = step.run(model.get_submodule(step.path), x)
            if step.compensate:
                assert y.dim() == x.dim() and y.shape[0] == x.shape[0], step.path
                if plan.form == "linear":
                    assert y.shape[:-1] == x.shape[:-1], step.path  # tokens kept, features on the last axis
                else:
                    infer_stride(x.shape[-1], y.shape[-1])  # NCHW, stride 1 or 2
            x = y

    # FP32 product at eval: random-init deep CNNs (no trained BatchNorm statistics) overflow FP16.
    reports = qwt.apply_qwt(model, images, qwt.QwTConfig(fp16_eval=False), batch_size=4, progress=False)
    assert len(reports) == sum(s.compensate for s in plan.steps)
    with torch.no_grad():
        logits = _logits(model(images))
    assert torch.isfinite(logits).all() and logits.shape == reference.shape

    qwt.save_quantized(model, tmp_path / name, name, config, entry.reduced)
    assert json.loads((tmp_path / name / "qwt.json").read_text())["ptq"]["baseline"] == family.default_baseline
    with torch.no_grad():
        assert torch.equal(_logits(qwt.load_quantized(tmp_path / name)(images)), logits)


@pytest.mark.parametrize("name", MODELS)
def test_residual_branches_name_the_last_layer_of_each_branch(name):
    """Where a family names its residual branches (channel-wise compensation, W8A8 conv outputs), every
    compensated block has those layers, and each is a Linear or Conv2d."""
    entry = _REGISTRY[name]
    if entry.family.residual_branches is None:
        pytest.skip(f"the {entry.family.name} family does not name residual branches")
    model = _build(entry)
    for step in entry.family.plan(model).steps:
        if step.compensate:
            block = model.get_submodule(step.path)
            names = entry.family.residual_branches(model, step.path)
            assert names, step.path
            for layer in names:
                assert isinstance(block.get_submodule(layer), (torch.nn.Linear, torch.nn.Conv2d)), (step.path, layer)
