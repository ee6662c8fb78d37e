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

GROUPED = qwt.PTQConfig(baseline=GPTQ(group_size=16, act_order=True), w_bits=4, a_bits=4)
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
    assert meta["ptq"]["baseline_options"]["act_order"] is True and meta["ptq"]["baseline_options"]["group_size"] == 16
    assert meta["quantizers"][f"{FC1}.weight_quantizer"]["group_size"] == 16
    with torch.no_grad():
        assert torch.equal(qwt.load_quantized(saved_grouped)(_fmnist(8)), grouped(_fmnist(8)))


@pytest.mark.parametrize("config", [qwt.PTQConfig(baseline="gptq", w_bits=4, a_bits=4),
                                    qwt.PTQConfig(baseline=GPTQ(group_size=16), w_bits=4, a_bits=4)])
def test_saving_with_other_options_than_ran_is_refused(grouped, tmp_path, config):
    # Before: GPTQ(act_order=True, group_size=16) saved with PTQConfig(baseline="gptq") recorded act_order false and
    # group_size null (only kinds, bits, axes, grids and floors were compared).
    with pytest.raises(InputError, match=r"quantised with PTQConfig\(baseline=GPTQ\(.*act_order=True, group_size=16"
                                         r".*not with the config passed.*qwt.ptq.applied_config"):
        qwt.save_quantized(grouped, tmp_path / "m", "vit_fmnist", config)
    assert not (tmp_path / "m").exists()


def test_a_model_quantised_by_hand_is_refused_a_config_of_another_group_size(grouped, tmp_path):
    by_hand = copy.deepcopy(grouped)
    del by_hand.qwt_ptq_config  # no remembered config: the quantisers' declared settings are compared
    assert qwt.ptq.applied_config(by_hand) is None
    with pytest.raises(InputError, match=f"{FC1}.weight_quantizer: the model's group_size is 16, the config's None"):
        qwt.save_quantized(by_hand, tmp_path / "m", "vit_fmnist", qwt.PTQConfig(baseline=GPTQ(act_order=True),
                                                                                 w_bits=4, a_bits=4))


def _relabel_groups(size):
    def edit(meta):
        meta["ptq"]["baseline_options"]["group_size"] = size
        for spec in meta["quantizers"].values():
            if spec["kind"] == "uniform_rounding":
                spec["group_size"] = size
    return edit


def _as_earlier_save(meta):
    """A description written before RoundingQuantizer declared its group size, relabelled per channel."""
    meta["ptq"]["baseline_options"]["group_size"] = None
    for spec in meta["quantizers"].values():
        spec.pop("group_size", None)


@pytest.mark.parametrize("edit,message", [
    (_relabel_groups(None), rf"{FC1}.weight_quantizer: Δ and z have shape \(128, 64\), but its settings give "
                            r"\(128, 1\)"),
    (_as_earlier_save, r"Δ and z have shape \(128, 64\), but its settings give \(128, 1\)"),
    (_relabel_groups(32), "Δ or z varies within a group of 32 columns"),
    (_relabel_groups(10**9), "Δ or z varies within a group of 1000000000 columns"),  # never padded to that width
], ids=["per-channel", "earlier-save", "wider-groups", "huge-groups"])
def test_a_description_relabelling_the_weight_groups_is_refused(saved_grouped, resign, edit, message):
    resign(saved_grouped, edit=edit)
    with pytest.raises(InputError, match=message):
        qwt.load_quantized(saved_grouped)


def test_the_loaded_model_remembers_its_config(saved_grouped, tmp_path):
    loaded = qwt.load_quantized(saved_grouped)
    assert qwt.ptq.applied_config(loaded) == GROUPED.for_family(qwt.get_model_entry("vit_fmnist").family)
    with pytest.raises(InputError, match="quantised with"):
        qwt.save_quantized(loaded, tmp_path / "again", "vit_fmnist", qwt.PTQConfig(baseline="gptq", w_bits=4,
                                                                                    a_bits=4))


# --- values a consistent forgery may write: refused where the format cannot mean them ---------------------------

@pytest.mark.parametrize("key,value,message", [
    (f"{FC1}.weight_quantizer.offset", 1000, r"offset moves codes off the grid 0..15"),
    ("blocks.0.block.mlp.fc2.input_quantizer.zero_point", 2.0**40,
     r"zero_point lies outside -503316480..503316480 \(what the affine percentile search can give in FP32\)"),
    ("blocks.1.comp_weight", 1e30, "blocks.1.comp_weight holds values beyond FP16's range"),
], ids=["gptq-offset", "affine-zero-point", "fp16-compensation"])
def test_values_the_format_cannot_mean_are_refused(saved_grouped, resign, key, value, message):
    # Before: GPTQ offsets of +1000 and a compensation weight of 1e30 loaded from a re-signed save.
    state = load_file(str(saved_grouped / "model.safetensors"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += value
    resign(saved_grouped, state)
    with pytest.raises(InputError, match=message):
        qwt.load_quantized(saved_grouped)


def test_a_zero_point_the_affine_search_puts_far_from_zero_round_trips(tmp_path):
    # Calibration data on one side of 0, concentrated far from it: the authors' affine grid puts z at about
    # −lo·(L−1)/(hi−lo), far outside 0..L−1. Such a grid is a genuine one, so load may not refuse it.
    config = qwt.PTQConfig(baseline="percentile", w_bits=4, a_bits=4)
    model = qwt.quantize(qwt.create_model("vit_fmnist"), _fmnist(), config)
    q = model.blocks[0].mlp.fc2.input_quantizer
    q.calibrate(5 + torch.rand(4096, generator=torch.Generator().manual_seed(0)) / 10)
    assert float(q.zero_point) < -500
    saved = qwt.save_quantized(model, tmp_path / "m", "vit_fmnist", config)
    with torch.no_grad():
        assert torch.equal(qwt.load_quantized(saved)(_fmnist(8)), model(_fmnist(8)))


@pytest.mark.parametrize("kwargs", [{"act_layer": "relu"}, {"global_pool": "avg"}, {"num_heads": 8}])
def test_builder_arguments_that_keep_the_tensors_but_change_the_function_are_refused(saved_grouped, resign,
                                                                                       kwargs):
    # Before: vit_fmnist's builder passed any override to timm; a re-signed save built with ReLU loaded and gave
    # garbage (every tensor has the same shape).
    resign(saved_grouped, edit=lambda meta: meta["build_kwargs"].update(kwargs))
    with pytest.raises(InputError, match=f"{next(iter(kwargs))} may not be set: vit_fmnist is built from its own"):
        qwt.load_quantized(saved_grouped)


# --- a saved language model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_model():
    from qwt.models.decoder_lm import build_from_config, tiny_config

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    model = qwt.quantize(build_from_config(config=tiny_config()), ids[:4], LM_CONFIG)
    qwt.apply_qwt(model, ids, qwt.QwTConfig(fp16_eval=False), batch_size=4, progress=False)
    return model


LM_CONFIG = qwt.PTQConfig(baseline="rtn", w_bits=4, a_bits=8)


@pytest.fixture
def saved_lm(lm_model, tmp_path):
    from qwt.models.decoder_lm import tiny_config

    return qwt.save_quantized(lm_model, tmp_path / "lm", "hf_causal_lm", LM_CONFIG, {"config": tiny_config()})


@pytest.fixture
def never_built(monkeypatch):
    import qwt.serialization.skeleton as ser

    def refuse(*args, **kwargs):
        raise AssertionError("the description was built")

    monkeypatch.setattr(ser, "_build", refuse)


@pytest.mark.parametrize("edit,message", [
    ({"num_hidden_layers": 20000}, r"config.num_hidden_layers=20000 is beyond 256"),
    ({"num_hidden_layers": 3}, r"config.num_hidden_layers=3, but the saved tensors hold decoder layers 0..1"),
    ({"vocab_size": 10**9}, r"config.vocab_size=1000000000 is beyond 1048576"),
    ({"rope_parameters": {"rope_theta": 1e6, "n": list(range(2000))}}, r"config.rope_parameters.n lists 2000"),
    ({"hidden_act": "gelu"}, r"config.hidden_act='gelu': llama's MLP uses 'silu'"),
    ({"model_type": "gemma"}, r"config.model_type='gemma' is not one of llama, mistral, qwen2, gemma3_text, opt, gpt2"),
], ids=["20000-layers", "3-layers", "vocab", "nested-list", "activation", "model-type"])
def test_a_forged_language_model_config_is_refused_before_it_is_built(saved_lm, resign, never_built, edit,
                                                                      message):
    # Before: num_hidden_layers 20000 took 96 s and 1.7 GB to build before the tensors refused it (the nested
    # config was not looked into); hidden_act gelu loaded and gave garbage.
    resign(saved_lm, edit=lambda meta: meta["build_kwargs"]["config"].update(edit))
    with pytest.raises(InputError, match=f"declares what no saved model needs: .*{message}"):
        qwt.load_quantized(saved_lm)


def test_an_rtn_zero_point_off_its_grid_is_refused(saved_lm, resign):
    # Before: min-max (RTN) weight zero points were not checked at all; +1000 loaded.
    key = "model.layers.0.block.mlp.up_proj.weight_quantizer.zero_point"
    state = load_file(str(saved_lm / "model.safetensors"))
    state[key] = state[key] + 1000
    resign(saved_lm, state)
    with pytest.raises(InputError, match=r"zero_point lies outside 0..15 \(a grid whose range includes 0\)"):
        qwt.load_quantized(saved_lm)


def test_the_lm_task_refuses_save_for_a_model_it_could_not_save_before_any_compute(tmp_path, monkeypatch, capsys):
    # Without the early check, a run on a model type a save may not declare would be refused at its very end.
    from qwt.models.decoder_lm import build_from_config, tiny_config
    from qwt.tasks import llm
    from qwt.tasks.llm import task

    qwen3 = build_from_config(config={**tiny_config("qwen2"), "model_type": "qwen3"})
    monkeypatch.setattr(task, "load_causal_lm", lambda model, device: (qwen3, None, "tiny qwen3"))
    monkeypatch.setattr(task, "load_windows", lambda *args: pytest.fail("the run went on to read its data"))
    (tmp_path / "text.txt").write_text("some text\n" * 50)
    argv = ["--model", tmp_path, "--calib-text", tmp_path / "text.txt", "--eval-text", tmp_path / "text.txt",
            "--bits", "W4A8", "--out", tmp_path / "out", "--save", tmp_path / "saved", "--no-progress"]
    assert llm.main("test", [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --save: tiny qwen3 cannot be saved (config.model_type='qwen3' is not one of llama, "
                   "mistral, qwen2, gemma3_text, opt, gpt2); run without --save")
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())
