"""A saved model states what ran, and a consistently forged save (description and every checksum rewritten, see
the ``resign`` fixture) is refused where its values are ones the format cannot mean."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import qwt
from qwt.errors import InputError
from qwt.ptq.baselines import GPTQ

GROUPED = qwt.PTQConfig(method=GPTQ(group_size=16, act_order=True), w_bits=4, a_bits=4)
FC1 = "blocks.0.block.mlp.fc1"  # a Linear with 64 input columns: four groups of 16


def _fmnist(n: int = 32) -> torch.Tensor:
    from qwt.data.fashion_mnist import load_fashion_mnist, normalize

    return normalize(load_fashion_mnist("train")[0][:n])


@pytest.fixture(scope="module")
def grouped():
    """vit_fmnist, GPTQ-rounded in static groups of 16 columns with act_order, and QwT-compensated."""
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _fmnist(), GROUPED)
    qwt.apply_qwt(model, _fmnist(64), qwt.QwTConfig(), progress=False)
    return model


@pytest.fixture
def saved_grouped(grouped, tmp_path):
    return qwt.save_quantized(grouped, tmp_path / "m", "vit_fmnist", GROUPED)


def test_the_description_states_the_gptq_options_that_ran(grouped, saved_grouped):
    meta = json.loads((saved_grouped / "qwt.json").read_text())
    assert meta["ptq"]["method_options"]["act_order"] is True and meta["ptq"]["method_options"]["group_size"] == 16
    assert meta["quantizers"][f"{FC1}.weight_quantizer"]["group_size"] == 16
    with torch.no_grad():
        assert torch.equal(qwt.load_quantized(saved_grouped)(_fmnist(8)), grouped(_fmnist(8)))


@pytest.mark.parametrize("config", [qwt.PTQConfig(method="gptq", w_bits=4, a_bits=4),
                                    qwt.PTQConfig(method=GPTQ(group_size=16), w_bits=4, a_bits=4)])
def test_saving_with_other_options_than_ran_is_refused(grouped, tmp_path, config):
    # Before: GPTQ(act_order=True, group_size=16) saved with PTQConfig(method="gptq") recorded act_order false and
    # group_size null (only kinds, bits, axes, grids and floors were compared).
    with pytest.raises(InputError, match=r"quantised with PTQConfig\(method=GPTQ\(.*act_order=True, group_size=16"
                                         r".*not with the config passed.*qwt.ptq.applied_config"):
        qwt.save_quantized(grouped, tmp_path / "m", "vit_fmnist", config)
    assert not (tmp_path / "m").exists()


def test_a_model_quantised_by_hand_is_refused_a_config_of_another_group_size(grouped, tmp_path):
    by_hand = copy.deepcopy(grouped)
    del by_hand.qwt_ptq_config  # no remembered config: the quantisers' declared settings are compared
    assert qwt.ptq.applied_config(by_hand) is None
    with pytest.raises(InputError, match=f"{FC1}.weight_quantizer: the model's group_size is 16, the config's None"):
        qwt.save_quantized(by_hand, tmp_path / "m", "vit_fmnist", qwt.PTQConfig(method=GPTQ(act_order=True),
                                                                                 w_bits=4, a_bits=4))


def _relabel_groups(size):
    def edit(meta):
        meta["ptq"]["method_options"]["group_size"] = size
        for spec in meta["quantizers"].values():
            if spec["kind"] == "uniform_rounding":
                spec["group_size"] = size
    return edit


def _as_earlier_save(meta):
    """A description written before RoundingQuantizer declared its group size, relabelled per channel."""
    meta["ptq"]["method_options"]["group_size"] = None
    for spec in meta["quantizers"].values():
        spec.pop("group_size", None)


@pytest.mark.parametrize("edit,message", [
    (_relabel_groups(None), rf"{FC1}.weight_quantizer: Δ and z have shape \(128, 64\), but its settings give "
                            r"\(128, 1\)"),
    (_as_earlier_save, r"Δ and z have shape \(128, 64\), but its settings give \(128, 1\)"),
    (_relabel_groups(32), "Δ or z varies within a group of 32 columns"),
], ids=["per-channel", "earlier-save", "wider-groups"])
def test_a_description_relabelling_the_weight_groups_is_refused(saved_grouped, resign, edit, message):
    resign(saved_grouped, edit=edit)
    with pytest.raises(InputError, match=message):
        qwt.load_quantized(saved_grouped)


def test_the_loaded_model_remembers_its_config(saved_grouped, tmp_path):
    loaded = qwt.load_quantized(saved_grouped)
    assert qwt.ptq.applied_config(loaded) == GROUPED
    with pytest.raises(InputError, match="quantised with"):
        qwt.save_quantized(loaded, tmp_path / "again", "vit_fmnist", qwt.PTQConfig(method="gptq", w_bits=4,
                                                                                    a_bits=4))
