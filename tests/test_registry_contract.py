"""Every registered model honours the family contract, in its reduced size: it builds, quantises with its
family's rule (reparameterisation keeps the FP function), its QwT plan walks from the stem through every step
with the feature layout its compensation form expects, QwT fits on one batch, and the result round-trips through
save/load. A family is tested the moment it registers.

Every registered PTQ baseline its family accepts round-trips the same way (the family's default one in the
model's own contract test, every other one in the pair test); the baselines a family refuses are listed too, and
must be refused in one line before the model is touched."""
import copy
import json
from pathlib import Path

import pytest
import torch

import qwt
from qwt.compensation import BlockReports, infer_stride
from qwt.models.registry import _REGISTRY
from qwt.ptq.baselines import make_baseline
from qwt.quant.modules import quant_modules

MODELS = [name for name in qwt.list_models() if not name.startswith("_")]


def _config(baseline: str) -> qwt.PTQConfig:
    return qwt.PTQConfig(method=make_baseline(baseline), w_bits=4, a_bits=4)


def _accepts(name: str, baseline: str) -> bool:
    """Whether the model's family takes the baseline: refusals come from resolving the config for the family
    (``Baseline.check_family``), before any model is built; a layer rule that refused one later would fail the
    pair test, naming it."""
    try:
        _config(baseline).for_family(_REGISTRY[name].family)
    except ValueError:
        return False
    return True


#: the library's baselines (a test file may register its own; which of those exist depends on collection order)
BASELINES = [b for b in qwt.list_baselines() if type(make_baseline(b)).__module__.startswith("qwt.")]
PAIRS = [(name, baseline) for name in MODELS for baseline in BASELINES]
#: GPTQ factorises each layer's FP64 Hessian (C_in·k·k columns): a reduced ResNet keeps the full widths, whose
#: 4608-column convs take 25 s (resnet18) to 90 s (resnet101) on two CPU cores. resnet18 stands for its family:
#: resnet50 and resnet101 are the same blocks and layers, more of them, through the same save/load code.
SAME_AS_RESNET18 = {("resnet50", "gptq"), ("resnet101", "gptq")}
#: accepted pairs other than the model's default baseline (that one runs in the model's own contract test)
ACCEPTED = [(n, b) for n, b in PAIRS
            if _accepts(n, b) and b != _REGISTRY[n].family.default_baseline and (n, b) not in SAME_AS_RESNET18]
REFUSED = [(n, b) for n, b in PAIRS if not _accepts(n, b)]
FAMILIES = {_REGISTRY[name].family.name: _REGISTRY[name].family for name in MODELS}


def _build(entry):
    torch.manual_seed(0)
    return entry.build(pretrained=False, **entry.reduced).eval()


def _logits(output):
    """A classifier's output, or a language model's logits (transformers returns an output object)."""
    return getattr(output, "logits", output)


def _batch(entry) -> torch.Tensor:
    """The reduced variant's 8 inputs (its own token ids, or Gaussian images), the same on every call."""
    g = torch.Generator().manual_seed(0)
    return entry.reduced_batch(g) if entry.reduced_batch else torch.randn(8, *entry.reduced_input, generator=g)


def _compensate(model: torch.nn.Module, images: torch.Tensor) -> BlockReports:
    # FP32 product at eval: random-init deep CNNs (no trained BatchNorm statistics) overflow FP16.
    return qwt.apply_qwt(model, images, qwt.QwTConfig(fp16_eval=False), batch_size=4, progress=False)


def _assert_round_trip(model: torch.nn.Module, saved: Path, name: str, config: qwt.PTQConfig, images: torch.Tensor,
                       method: str) -> torch.Tensor:
    """Save ``model`` and load it back: the description names ``method``, and the loaded model has the same state
    and gives the same finite outputs, bit for bit. Returns the outputs."""
    qwt.save_quantized(model, saved, name, config, _REGISTRY[name].reduced)
    assert json.loads((saved / "qwt.json").read_text())["ptq"]["baseline"] == method
    loaded = qwt.load_quantized(saved)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key, value in state.items():
        assert value.dtype == loaded_state[key].dtype and torch.equal(value, loaded_state[key]), key
    with torch.no_grad():
        outputs = _logits(model(images))
        assert torch.isfinite(outputs).all()
        assert torch.equal(_logits(loaded(images)), outputs)
    return outputs


@pytest.mark.parametrize("name", MODELS)
def test_registered_model_honours_the_family_contract(name, tmp_path):
    entry = _REGISTRY[name]
    fp = _build(entry)
    family = qwt.family_of(fp)
    assert family is entry.family
    images = _batch(entry)
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

    reports = _compensate(model, images)
    assert len(reports) == sum(s.compensate for s in plan.steps)
    logits = _assert_round_trip(model, tmp_path / name, name, config, images, family.default_baseline)
    assert logits.shape == reference.shape


@pytest.mark.parametrize(("name", "baseline"), [
    pytest.param(n, b, id=f"{n}-{b}") for n, b in ACCEPTED])
def test_every_accepted_baseline_survives_save_and_load_bit_for_bit(name, baseline, tmp_path):
    """Quantised with the baseline and compensated, the model saves and loads back to the same state and the
    same outputs (each baseline places its own quantisers, which the load must rebuild from the description)."""
    entry, config = _REGISTRY[name], _config(baseline)
    images = _batch(entry)
    model = qwt.quantize(_build(entry), images, config)
    _compensate(model, images)
    _assert_round_trip(model, tmp_path / name, name, config, images, baseline)


@pytest.mark.parametrize(("name", "baseline"), REFUSED, ids=[f"{n}-{b}" for n, b in REFUSED])
def test_every_refused_baseline_is_refused_in_one_line_before_quantising(name, baseline):
    entry = _REGISTRY[name]
    model = _build(entry)
    with pytest.raises(ValueError, match=entry.family.name) as refusal:
        qwt.quantize(model, _batch(entry), _config(baseline))
    assert "\n" not in str(refusal.value)
    assert not list(quant_modules(model))  # refused before any layer was replaced


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_family_accepts_the_baselines_meant_for_any_family(family_name):
    """Percentile and RTN apply to any family, GPTQ takes the family's default baseline's activations, and
    RepQ-ViT needs the LayerNorm → Linear pairs a family names."""
    family = FAMILIES[family_name]
    accepted = {b for n, b in PAIRS if _REGISTRY[n].family is family and _accepts(n, b)}
    assert {family.default_baseline, "gptq", "percentile", "rtn"} <= accepted
    assert ("repq_vit" in accepted) == bool(family.norm_linear_pairs)


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
