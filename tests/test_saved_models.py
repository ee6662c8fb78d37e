"""Saved models describe themselves: a config that disagrees with the model, and tampered or damaged files,
are refused with a message naming the file, instead of loading into a model that gives wrong logits."""
import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from qwt import PTQConfig, QwTConfig, apply_qwt, load_quantized, quantize, save_quantized
from qwt.errors import InputError
from qwt.models import ModelEntry, register_model
from qwt.models.registry import _REGISTRY
from qwt.models.vit import VIT


#: The device each build of the test model was made on ("meta": shapes only, no memory).
BUILDS: list[str] = []


@pytest.fixture(scope="module")
def entry():
    def build(pretrained: bool = True, **kwargs):
        BUILDS.append(torch.empty(0).device.type)
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(
            **{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10,
               **kwargs}).eval()

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


def test_the_saved_config_names_the_baseline_that_ran(saved, entry, w6a6, tmp_path):
    """``PTQConfig()`` means the family's default; the save records that default by name, never "default"."""
    assert json.loads((saved / "qwt.json").read_text())["ptq"]["baseline"] == "repq_vit"
    with pytest.raises(InputError, match=r"quantised with PTQConfig\(baseline=RepQViT\(\).*not with the config "
                                         r"passed, PTQConfig\(baseline=Percentile\(\)"):
        save_quantized(w6a6[0], tmp_path / "p", entry.name, PTQConfig(baseline="percentile", w_bits=6, a_bits=6))


def test_a_gptq_save_with_its_partner_left_to_the_family_loads(entry, resign, tmp_path):
    """GPTQ's activation partner is resolved from the family and saved by name; a save written when it was
    recorded as null (the family's choice) still loads, to the same model."""
    from qwt.ptq.baselines import GPTQ

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    config = PTQConfig(baseline=GPTQ(), w_bits=4, a_bits=6)
    model = quantize(entry.build(), images, config)
    saved = save_quantized(model, tmp_path / "g", entry.name, config)
    assert json.loads((saved / "qwt.json").read_text())["ptq"]["baseline_options"]["activations"] == "repq_vit"
    resign(saved, edit=lambda meta: meta["ptq"]["baseline_options"].update(activations=None))
    assert json.loads((saved / "qwt.json").read_text())["ptq"]["baseline_options"]["activations"] is None
    with torch.no_grad():
        assert torch.equal(load_quantized(saved)(images), model(images))


def test_a_save_of_the_previous_release_with_method_keys_loads(entry, resign, tmp_path):
    """The previous release wrote the baseline as ``"method"`` / ``"method_options"``: such a save loads to the
    same model and config, and saving it again writes the new keys."""
    from qwt.ptq import applied_config
    from qwt.ptq.baselines import GPTQ

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    config = PTQConfig(baseline=GPTQ(act_order=True), w_bits=4, a_bits=6)
    model = quantize(entry.build(), images, config)
    saved = save_quantized(model, tmp_path / "old", entry.name, config)

    def old_keys(meta):
        meta["ptq"] = {("method" if k == "baseline" else "method_options" if k == "baseline_options" else k): v
                       for k, v in meta["ptq"].items()}

    resign(saved, edit=old_keys)
    ptq = json.loads((saved / "qwt.json").read_text())["ptq"]
    assert ptq["method"] == "gptq" and ptq["method_options"]["act_order"] is True and "baseline" not in ptq
    loaded = load_quantized(saved)
    assert applied_config(loaded) == applied_config(model)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    again = save_quantized(loaded, tmp_path / "new", entry.name, config)
    ptq = json.loads((again / "qwt.json").read_text())["ptq"]
    assert ptq["baseline"] == "gptq" and ptq["baseline_options"]["act_order"] is True and "method" not in ptq


def test_a_config_that_disagrees_with_the_model_is_refused(entry, w6a6, tmp_path):
    # Before: a W6A6 model saved with a W4A4 config reloaded silently with logits off by up to 2.8.
    with pytest.raises(InputError, match=r"quantised with PTQConfig\(.*w_bits=6.*not with the config passed, "
                                         r"PTQConfig\(.*w_bits=4"):
        save_quantized(w6a6[0], tmp_path / "m", entry.name, PTQConfig(w_bits=4, a_bits=4))
    by_hand = copy.deepcopy(w6a6[0])  # quantised without qwt.quantize: no remembered config, structural checks
    del by_hand.qwt_ptq_config
    with pytest.raises(InputError, match="6 bits, the config to 4"):
        save_quantized(by_hand, tmp_path / "m", entry.name, PTQConfig(w_bits=4, a_bits=4))
    with pytest.raises(InputError, match="the model's floor is 1e-06, the config's None"):
        save_quantized(by_hand, tmp_path / "m", entry.name, PTQConfig(w_bits=6, a_bits=6, log_floor=None))
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


@pytest.mark.parametrize("tamper,message", [
    (lambda s: s.update({"blocks.0.block.mlp.fc1.weight": s["blocks.0.block.mlp.fc1.weight"] * float("nan")}), "NaN"),
    (lambda s: s.update({"blocks.0.block.mlp.fc1.weight_quantizer.delta":
                         s["blocks.0.block.mlp.fc1.weight_quantizer.delta"].to(torch.int32)}), "int32, expected"),
    (lambda s: s.update({"blocks.0.block.mlp.fc1.weight_quantizer.delta": torch.ones(3)}), "shape"),
])
def test_tampered_tensors_are_refused(saved, resign, tamper, message):
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


def _flip_exponent_bit(path, key):
    """Flip the top exponent bit of the first FP32 value of ``key`` in a safetensors file, as a damaged disk or
    transfer would (the header and the description stay as they were)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8:8 + n])[key]["data_offsets"][0]
    raw[start + 3] ^= 0x40  # little-endian FP32: byte 3 holds the sign and the top exponent bits
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_tensor_is_refused_naming_it(saved):
    # Before: no checksum covered the tensor bytes; one flipped exponent bit in a compensation weight loaded
    # silently (top-1 87.5 → 10.7 in the report).
    key = "blocks.1.comp_weight"
    _flip_exponent_bit(saved / "model.safetensors", key)
    with pytest.raises(InputError, match=rf"model.safetensors is damaged: {key} does not match its SHA-256"):
        load_quantized(saved)


@pytest.mark.parametrize("key,value,message", [
    ("blocks.0.block.attn.qkv.input_quantizer.delta", 0.0, "delta holds a step ≤ 0"),
    ("blocks.0.block.mlp.fc2.input_quantizer.delta", -1.0, "delta holds a step ≤ 0"),
    ("blocks.0.block.mlp.fc1.weight_quantizer.zero_point", 1000.0, "grid does not reach the weights"),
    ("blocks.0.block.mlp.fc2.input_quantizer.zero_point", 0.5, "non-integer zero point"),
])
def test_impossible_quantiser_values_are_refused(saved, resign, key, value, message):
    # Before: Δ = 0 or a zero point of +1000 loaded silently (a forger re-signs the files).
    state = load_file(str(saved / "model.safetensors"))
    state[key] = state[key].clone().fill_(value) if value != 1000.0 else state[key] + value
    resign(saved, state)
    with pytest.raises(InputError, match=message):
        load_quantized(saved)


def test_zero_points_off_the_grid_that_calibration_produces_still_round_trip(entry, tmp_path):
    # The authors' affine grid puts z outside 0..L-1 for a row whose values all lie on one side of zero.
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = entry.build()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0] = model.blocks[0].mlp.fc1.weight[0].abs() + 0.5
    quantize(model, images, PTQConfig(w_bits=4, a_bits=4))
    z = model.blocks[0].mlp.fc1.weight_quantizer.zero_point
    assert float(z.min()) < 0
    out = save_quantized(model, tmp_path / "m", entry.name, PTQConfig(w_bits=4, a_bits=4))
    assert torch.equal(load_quantized(out)(images), model(images))


def test_a_description_cannot_relabel_the_bits(saved, resign):
    # Before: load did not compare the described PTQ config with the per-quantiser bits, so a re-signed
    # description called this 6-bit model W4A4 (and size/labels followed the config).
    resign(saved, edit=lambda meta: meta["ptq"].update(w_bits=4, a_bits=4))
    with pytest.raises(InputError, match="quantises to 6 bits, the config to 4"):
        load_quantized(saved)


@pytest.mark.parametrize("kwargs,message,builds", [
    ({"img_size": 6000}, "declares what no saved model needs: img_size=6000 is beyond 2048", []),
    ({"depth": 100000}, "depth=100000 is beyond", []),
    ({"checkpoint": "/etc/passwd"}, "checkpoint may not be set", []),
    ({"img_size": 256}, "pos_embed has shape", ["meta"]),
])
def test_a_forged_description_is_refused_before_anything_is_allocated(saved, resign, kwargs, message, builds):
    # Before: a ~1 MB save declaring img_size 6000 built the model (memory growing with img_size²) before any
    # tensor was checked.
    resign(saved, edit=lambda meta: meta["build_kwargs"].update(kwargs))
    BUILDS.clear()
    with pytest.raises(InputError, match=message):
        load_quantized(saved)
    assert BUILDS == builds  # at most a shapes-only build on the meta device


@pytest.mark.parametrize("edit,message", [
    (lambda meta: meta["compensation"].append(dict(meta["compensation"][0])), "a block is compensated twice"),
    (lambda meta: meta["compensation"][0].update(fp16_eval="no"), "fp16_eval true or false"),
    (lambda meta: meta["compensation"][0].update({"in": 0}), "sizes are integers"),
    (lambda meta: meta["quantizers"].update({f"q{i}": {} for i in range(1000)}), "quantisers and 2 compensated "
                                                                                 "blocks for"),
])
def test_a_description_declaring_impossible_blocks_is_refused(saved, resign, edit, message):
    resign(saved, edit=edit)
    BUILDS.clear()
    with pytest.raises(InputError, match=f"declares what no saved model needs: .*{message}"):
        load_quantized(saved)
    assert BUILDS == []


def test_a_deeply_nested_description_is_one_clear_refusal(saved):
    # Before: json.loads raised RecursionError (a traceback in every CLI).
    (saved / "qwt.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested deeper than a model description"):
        load_quantized(saved)
    (saved / "qwt.json").write_text(json.dumps({"format_version": 4, "a": [[[[[[[[[[1]]]]]]]]]]}))
    with pytest.raises(InputError, match="nested deeper than a model description"):
        load_quantized(saved)


def test_a_description_of_an_earlier_format_is_refused_with_the_fix(saved, resign):
    resign(saved, edit=lambda meta: meta.update(format_version=3))
    with pytest.raises(InputError, match="saved by an earlier version, without checksums.*save the model again"):
        load_quantized(saved)


def test_the_export_cli_refuses_a_nested_description_in_one_line(saved, tmp_path):
    import subprocess
    import sys

    (saved / "qwt.json").write_text("[" * 100_000 + "]" * 100_000)
    done = subprocess.run([sys.executable, "-m", "qwt.export", str(saved), str(tmp_path / "m.onnx"),
                           "--input-shape", "3", "32", "32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "nested deeper" in done.stderr and not (tmp_path / "m.onnx").exists()


# Saving never deletes what it did not write.

def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_saving_into_a_folder_with_code_refuses_and_deletes_nothing(entry, w6a6, tmp_path, monkeypatch):
    # Before: save_quantized(model, ".") in a folder holding any qwt.json deleted everything in it.
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')\n")
    (project / "data.csv").write_text("1,2\n")
    (project / "qwt.json").write_text('{"unrelated": true}')
    before = _files(project)
    monkeypatch.chdir(project)
    with pytest.raises(InputError, match=r"files a save did not write \(data.csv, train.py\)"):
        save_quantized(w6a6[0], ".", entry.name, PTQConfig(w_bits=6, a_bits=6))
    assert _files(project) == before and sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_a_folder_with_an_unrelated_qwt_json_is_not_a_previous_save(entry, w6a6, tmp_path):
    # Before: the only check was that a file named qwt.json existed; the folder was then removed.
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "qwt.json").write_text('{"format_version": 4}')
    (folder / "model.safetensors").write_bytes(b"not mine to delete")
    before = _files(folder)
    with pytest.raises(InputError, match="not a complete save|cannot be read|not the description"):
        save_quantized(w6a6[0], folder, entry.name, PTQConfig(w_bits=6, a_bits=6))
    assert _files(folder) == before


def test_resaving_keeps_what_the_user_added_next_to_a_save(entry, w6a6, saved):
    # Before: re-saving deleted an ONNX export or notes written into the save's folder.
    (saved / "model.onnx").write_bytes(b"onnx")
    (saved / "notes.txt").write_text("W6A6 run of Tuesday")
    before = _files(saved)
    with pytest.raises(InputError, match=r"files a save did not write \(model.onnx, notes.txt\)"):
        save_quantized(w6a6[0], saved, entry.name, PTQConfig(w_bits=6, a_bits=6))
    assert _files(saved) == before
    assert torch.equal(load_quantized(saved)(w6a6[1]), w6a6[0](w6a6[1]))


def test_a_previous_save_is_replaced_and_nothing_else_is_left(entry, w6a6, saved):
    (saved / "qwt.json").write_text((saved / "qwt.json").read_text())  # same bytes: still the signed description
    save_quantized(w6a6[0], saved, entry.name, PTQConfig(w_bits=6, a_bits=6), extra={"run": 2})
    assert json.loads((saved / "qwt.json").read_text())["extra"] == {"run": 2}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]  # no temporary or replaced folder left
    assert torch.equal(load_quantized(saved)(w6a6[1]), w6a6[0](w6a6[1]))


def test_an_empty_folder_is_a_valid_target(entry, w6a6, tmp_path):
    (tmp_path / "m").mkdir()
    save_quantized(w6a6[0], tmp_path / "m", entry.name, PTQConfig(w_bits=6, a_bits=6))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "qwt.json"]


def test_a_symlink_target_is_refused_and_left_alone(entry, w6a6, saved, tmp_path):
    # Before: --save pointing at a symlink to an earlier save failed with a traceback after the whole run.
    link = tmp_path / "link"
    link.symlink_to(saved)
    before = _files(saved)
    with pytest.raises(InputError, match="is a symbolic link; pass the folder it points to"):
        save_quantized(w6a6[0], link, entry.name, PTQConfig(w_bits=6, a_bits=6))
    assert link.is_symlink() and _files(saved) == before


def test_a_replaced_save_that_changed_meanwhile_is_put_back(entry, w6a6, saved, monkeypatch):
    import qwt.serialization.store as ser

    checks = []

    def late_file(directory):
        checks.append(directory)
        if len(checks) == 2:  # the re-check after the rename aside: a file appeared since the first check
            (directory / "late.txt").write_text("added while saving")
        return original(directory)

    original = ser._recognised_save
    monkeypatch.setattr(ser, "_recognised_save", late_file)
    with pytest.raises(InputError, match="changed while saving"):
        save_quantized(w6a6[0], saved, entry.name, PTQConfig(w_bits=6, a_bits=6))
    assert (saved / "late.txt").read_text() == "added while saving"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]
