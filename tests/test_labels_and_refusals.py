"""Refusals, labels and records of a hostile pass over the API and every command line: each case here used to run
on silently (a wrong label, a wrong number) or end in a raw traceback or a hang."""
import argparse
import copy
import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

import qwt
from qwt.compensation.modules import LinearCompensated
from qwt.data.imagenet import class_folder, eval_transform, Preprocessing
from qwt.data.synthetic import write_class_folders
from qwt.errors import InputError
from qwt.finetune import FinetuneConfig
from qwt.report import is_done, write_run
from qwt.tasks import classification
from qwt.tasks.cli import qwt_config
from qwt.tasks.tables import assemble_folder

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "common"), "OMP_WAIT_POLICY": "PASSIVE"}


def _cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _one_line_refusal(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, no traceback, and one ``error:`` line naming the problem."""
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert all(w in done.stderr for w in words), done.stderr[-2000:]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit_w4a4(images):
    model = qwt.create_model("vit_fmnist")
    qwt.quantize(model, images[:8], qwt.PTQConfig(w_bits=4, a_bits=4))
    return model


# --- the API: refuse instead of guessing -------------------------------------------------------------------------

def test_quantize_refuses_an_already_quantised_model(vit_w4a4, images):
    # Before: a W8A8 config on a W4A4 model silently kept 4 bits.
    with pytest.raises(InputError, match="already quantised"):
        qwt.quantize(copy.deepcopy(vit_w4a4), images[:8], qwt.PTQConfig(w_bits=8, a_bits=8))


def test_a_family_that_does_not_match_the_model_is_refused(images):
    # Before: a ViT took the Swin rule (52 quantisers instead of 76) without a word.
    model = qwt.create_model("vit_fmnist")
    with pytest.raises(InputError, match="does not recognise VisionTransformer"):
        qwt.quantize(model, images[:8], qwt.PTQConfig(), family="swin")
    assert not any(isinstance(m, qwt.quant.QuantModule) for m in model.modules())
    with pytest.raises(InputError, match="does not recognise"):
        qwt.apply_qwt(qwt.create_model("vit_fmnist"), images, family="resnet", progress=False)


@pytest.mark.parametrize("bad,message", [
    (lambda x: (x * 40 + 128).clamp(0, 255).to(torch.uint8), "torch.uint8"),
    (lambda x: x[0], r"expected a batch \(N, C, H, W\)"),
    (lambda x: x[:0], "empty"),
])
def test_quantize_and_apply_qwt_refuse_bad_image_tensors(vit_w4a4, images, bad, message):
    with pytest.raises(InputError, match=message):
        qwt.quantize(qwt.create_model("vit_fmnist"), bad(images), qwt.PTQConfig())
    with pytest.raises(InputError, match=message):
        qwt.apply_qwt(copy.deepcopy(vit_w4a4), bad(images), progress=False)


def test_a_half_precision_model_is_refused(images, vit_w4a4):
    with pytest.raises(InputError, match="float16 parameters"):
        qwt.quantize(qwt.create_model("vit_fmnist").half(), images.half(), qwt.PTQConfig())
    with pytest.raises(InputError, match="float16 parameters"):
        qwt.apply_qwt(copy.deepcopy(vit_w4a4).half(), images, progress=False)


def test_a_quantised_model_refuses_integer_images_as_the_fp_model_does(vit_w4a4, images):
    # Before: the FP model refused uint8 images, the quantised one rounded them and answered (9.5 % top-1).
    raw = (images * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(RuntimeError):
        qwt.create_model("vit_fmnist")(raw)
    with pytest.raises(InputError, match="floating-point images"):
        vit_w4a4(raw)


def test_apply_qwt_refuses_a_start_block_past_the_last_block(vit_w4a4, images):
    model = copy.deepcopy(vit_w4a4)
    with pytest.raises(ValueError, match="past the last block"):
        qwt.apply_qwt(model, images, qwt.QwTConfig(start_block=6), progress=False)
    assert not any(isinstance(m, LinearCompensated) for m in model.modules())


@pytest.mark.parametrize("kwargs,message", [
    ({"label_weight": 1.5}, "label_weight"), ({"label_weight": -0.5}, "label_weight"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"temperature": 0.0}, "temperature"),
])
def test_qwt_star_settings_are_checked_in_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**kwargs)
    FinetuneConfig(label_weight=1.0, grad_clip=None)


def test_fp16_eval_must_be_a_bool():
    with pytest.raises(ValueError, match="fp16_eval"):
        qwt.QwTConfig(fp16_eval="no")


def test_conv_act_bits_is_refused_for_a_token_model(images):
    with pytest.raises(ValueError, match="CNNs only"):
        qwt.quantize(qwt.create_model("vit_fmnist"), images[:8], qwt.PTQConfig(conv_act_bits=8))


# --- labels and records are what ran -----------------------------------------------------------------------------

def test_conv_act_bits_shows_in_the_tag_rows_and_file_names():
    config = qwt.PTQConfig(baseline="percentile", w_bits=4, a_bits=4, conv_act_bits=8)
    assert config.tag == "W4A4-convA8"
    assert qwt.PTQConfig(w_bits=4, a_bits=4, conv_act_bits=4).tag == "W4A4"  # same arithmetic, same label
    args = classification.build_parser("resnet", "").parse_args(
        ["--model", "resnet18", "--smoke", "--conv-act-bits", "8"])
    assert classification.run_stem(args) == "resnet18_W4A4-convA8_smoke"


def test_conv_act_bits_run_is_labelled_in_its_record(tmp_path):
    out = tmp_path / "out"
    assert classification.main("resnet", "", ["--model", "resnet18", "--smoke", "--conv-act-bits", "8", "--workers",
                                               "0", "--no-progress", "--comp-images", "8", "--skip-fp",
                                               "--out", str(out)]) == 0
    record = json.loads((out / "resnet18_W4A4-convA8_smoke.json").read_text())
    assert record["run"]["bits"] == "W4A4-convA8"
    assert {r["bits"] for r in record["rows"]} == {"W4A4-convA8"}
    assert "| W4A4-convA8 |" in (out / "resnet18_W4A4-convA8_smoke.md").read_text()


@pytest.mark.parametrize("fp16_eval,weight_bits", [(True, 16), (False, 32)])
def test_size_counts_the_compensation_as_it_runs(fp16_eval, weight_bits):
    model = nn.Sequential(LinearCompensated.zeros(nn.Identity(), 4, 4, fp16_eval=fp16_eval))
    assert qwt.model_size_mb(model) == (16 * weight_bits + 4 * 32) // 8 / 1e6


def _table_args(folder: Path, checkpoint: Path | None, model: str = "resnet18") -> argparse.Namespace:
    flags = ["--model", model, "--out", str(folder)] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    return classification.build_parser("resnet", "").parse_args(flags)


def _rows(model: str) -> list[dict]:
    return [{"model": model, "bits": "FP", "method": "fp", "top1": 70.0},
            {"model": model, "bits": "W4A4", "method": "ptq", "top1": 60.0},
            {"model": model, "bits": "W4A4", "method": "ptq+qwt", "top1": 65.0}]


def test_resume_matches_the_checkpoint_by_content(tmp_path):
    # Before: after the weights file was replaced, the old record still counted as done and its numbers stayed.
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"first weights")
    args = _table_args(tmp_path, weights)
    write_run(tmp_path, "resnet18_W4A4", _rows("resnet18"), {}, args, {"cpu": "x"}, True)
    assert is_done(tmp_path, "resnet18_W4A4", args)
    weights.write_bytes(b"other weights")
    assert not is_done(tmp_path, "resnet18_W4A4", args)


def test_assembly_reports_missing_and_damaged_runs_and_fails_when_partial(tmp_path, capsys):
    for model in ("resnet18", "resnet50"):
        write_run(tmp_path, f"{model}_W4A4", _rows(model), {}, _table_args(tmp_path, None, model), {"cpu": "x"}, True)
    (tmp_path / "resnet101_W4A4.json").write_text('{"complete": tru')  # damaged
    assert assemble_folder(ROOT / "QwT-cls-ResNet", tmp_path) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "resnet101 W4A4" in summary["missing"] and "resnet18 W6A6" in summary["missing"]
    assert "resnet18 W4A4" not in summary["missing"]
    err = capsys.readouterr().err
    assert "resnet101_W4A4" in err and "missing runs" in err


def test_assembly_refuses_records_of_another_task(tmp_path):
    write_run(tmp_path, "resnet18_W4A4", _rows("resnet18"), {}, _table_args(tmp_path, None), {"cpu": "x"}, True)
    with pytest.raises(InputError, match="not in .*QwT-cls-RepQ-ViT's table: resnet18_W4A4"):
        assemble_folder(ROOT / "QwT-cls-RepQ-ViT", tmp_path)
    assert not (tmp_path / "summary.json").exists()


def _load_script(name: str, code: str) -> str:
    """Run ``code`` with ``scripts/`` as the working folder (the scripts import each other as top-level modules)."""
    done = _cli("-c", code, cwd=ROOT / "scripts")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_main_job_labels_its_cnn_subset_and_records_only_what_ran():
    code = """
import json, torch
import demo
test = (torch.zeros(10000, 28, 28, dtype=torch.uint8), torch.zeros(10000, dtype=torch.long))
vit = demo.parse_args(["--models", "vit_fmnist"])
both = demo.parse_args([])
full = demo.parse_args(["--cnn-test-images", "20000"])
print(json.dumps([demo.run_data(vit, test), demo.run_data(both, test), demo.cnn_label(both, test),
                  demo.cnn_label(full, test)]))
"""
    vit_only, both, label, full_label = json.loads(_load_script("demo", code).strip().splitlines()[-1])
    assert "cnn_test_images" not in vit_only and "probe_images" not in vit_only and vit_only["vit_test_images"] == 10000
    assert both["cnn_test_images"] == 2000
    assert label == "efficientnet_lite0@64px-test2000" and full_label == "efficientnet_lite0@64px"


def test_main_job_records_every_qwt_setting_that_ran():
    """summary.json's ``qwt`` is the configuration the runs used (it did not state --guard-fraction before)."""
    code = """
import json, torch
import demo
test = (torch.zeros(10, 28, 28, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
args = demo.parse_args(["--guard-fraction", "0.25", "--solver", "reference", "--seed", "3"])
print(json.dumps([demo.summary_meta(args, test, {"cpu": "x"}), demo.summary_meta(demo.parse_args([]), test, {})]))
"""
    guarded, default = json.loads(_load_script("demo", code).strip().splitlines()[-1])
    assert guarded["qwt"] == {**asdict(qwt.QwTConfig()), "guard_fraction": 0.25, "solver": "reference"}
    assert default["qwt"] == asdict(qwt.QwTConfig())  # the job's defaults are the library's
    assert guarded["data"]["seed"] == 3 and guarded["environment"] == {"cpu": "x"}


def test_deploy_records_its_counts():
    code = """
import json
import deploy
print(json.dumps(deploy.settings(deploy.parse_args(["--b1-runs", "3", "--b32-runs", "2", "--models", "vit_fmnist"]))))
"""
    settings = json.loads(_load_script("deploy", code).strip().splitlines()[-1])
    assert settings["b1_runs"] == 3 and settings["b32_runs"] == 2 and settings["models"] == ["vit_fmnist"]
    assert "probe_images" not in settings


def test_calibration_benchmark_records_the_cpu_and_torch_version():
    done = _cli("benchmarks/calibration_speed.py", "--model", "deit_tiny", "--smoke", "--calib-images", "4",
                "--comp-images", "4", "--batch-size", "4", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["environment"]["torch"] == torch.__version__ and figures["environment"]["cpu"]


# --- command lines: one line, exit status 2, before any work -----------------------------------------------------

@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory, vit_w4a4):
    folder = tmp_path_factory.mktemp("saved") / "vit"
    qwt.save_quantized(vit_w4a4, folder, "vit_fmnist", qwt.PTQConfig(w_bits=4, a_bits=4))
    return folder


@pytest.mark.parametrize("shape,message", [
    (["0", "28", "28"], None), (["-1", "28", "28"], None),  # argparse: exit status 2
    (["3", "28", "28"], "does not fit the saved model"), (["3", "50000", "50000"], "more than the"),
])
def test_export_cli_checks_the_input_shape(saved_vit, tmp_path, shape, message):
    """In process: ``python -m qwt.export`` runs this ``main`` through run_cli, which turns an InputError into
    one line and exit status 2 (see test_export's test of a missing saved model)."""
    from qwt.export.__main__ import main

    argv = [str(saved_vit), str(tmp_path / "m.onnx"), "--input-shape", *shape]
    if message is None:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    else:
        with pytest.raises(InputError, match=message):
            main(argv)
    assert not (tmp_path / "m.onnx").exists()


def test_export_cli_refuses_an_output_below_a_file(saved_vit, tmp_path):
    (tmp_path / "file.txt").write_text("notes")
    done = _cli("-m", "qwt.export", str(saved_vit), str(tmp_path / "file.txt" / "m.onnx"), "--input-shape", "1",
                "28", "28")
    _one_line_refusal(done, "is not a folder")
    assert (tmp_path / "file.txt").read_text() == "notes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_feature_device_cuda_without_a_gpu_is_refused():
    args = classification.build_parser("vit", "").parse_args(["--model", "deit_tiny", "--feature-device", "cuda"])
    with pytest.raises(InputError, match="--feature-device cuda: no CUDA GPU"):
        qwt_config(args)


def test_star_temperature_zero_is_refused_before_the_run(tmp_path):
    done = _cli("QwT-cls-ResNet/main.py", "--model", "resnet18", "--smoke", "--qwt-star", "--star-temperature", "0",
                "--workers", "0", "--no-progress", "--out", str(tmp_path / "out"))
    _one_line_refusal(done, "temperature must be > 0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.json"))


def test_reproduce_table_refuses_a_folder_that_is_not_a_task(tmp_path):
    _one_line_refusal(_cli("scripts/reproduce_table.py", str(tmp_path), "--smoke"), "configs/table.json not found")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "table.json").write_text('{"title": "x"}')
    _one_line_refusal(_cli("scripts/reproduce_table.py", str(tmp_path), "--smoke"), "is not a table description")


@pytest.mark.parametrize("flags,words", [
    (["--comp-images", "0"], ["must be at least 1"]), (["--comp-images", "-5"], ["must be at least 1"]),
    (["--out", "FILE"], ["exists and is not a folder"]),
])
def test_deploy_checks_its_inputs_first(tmp_path, flags, words):
    (tmp_path / "file").write_text("keep")
    flags = [str(tmp_path / "file") if f == "FILE" else f for f in flags]
    done = _cli("scripts/deploy.py", "--models", "vit_fmnist", *flags, timeout=120)
    _one_line_refusal(done, *words)
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize("flags,words", [
    (["--calib-images", "0"], ["must be at least 1"]), (["--comp-images", "-1"], ["must be at least 1"]),
    (["--w-bits", "9"], ["bit width"]), (["--model", "no_such_model"], ["unknown model"]),
    (["--feature-device", "nowhere"], ["--feature-device"]),
])
def test_calibration_benchmark_refuses_bad_input_in_one_line(flags, words):
    _one_line_refusal(_cli("benchmarks/calibration_speed.py", "--smoke", "--model", "deit_tiny", *flags,
                           timeout=120), *words)


# --- a non-regular file in a dataset folder is refused, never read -----------------------------------------------

def test_a_fifo_named_like_an_image_is_refused(tmp_path):
    root = write_class_folders(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    folder = next(p for p in sorted((Path(root) / "train").iterdir()) if p.is_dir())
    os.mkfifo(folder / "blocked.png")
    with pytest.raises(InputError, match="blocked.png is not a regular file"):
        class_folder(root, "train", eval_transform(Preprocessing(0.875, size=32)))


# --- the ONNX simulation export keeps the compensation in FP32 by default ----------------------------------------

def _fp16_casts(path: Path) -> int:
    onnx = pytest.importorskip("onnx")
    return sum(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
               for n in onnx.load(str(path)).graph.node)


def test_simulation_export_keeps_the_compensation_in_fp32_unless_asked(vit_w4a4, images, tmp_path):
    pytest.importorskip("onnxruntime")
    from qwt.export import export_onnx

    model = copy.deepcopy(vit_w4a4)
    qwt.apply_qwt(model, images, qwt.QwTConfig(), progress=False)  # fp16_eval: the authors' default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default FP32 export says nothing
        assert _fp16_casts(export_onnx(model, images[:1], tmp_path / "sim.onnx")) == 0
    with pytest.warns(UserWarning, match="predictions differ"):
        assert _fp16_casts(export_onnx(model, images[:1], tmp_path / "half.onnx", compensation_half=True)) > 0
    assert all(m.fp16_eval for m in model.modules() if isinstance(m, LinearCompensated))  # the model is unchanged


def test_export_restores_the_models_train_mode(vit_w4a4, images, tmp_path):
    pytest.importorskip("onnxruntime")
    from qwt.export import export_onnx

    model = copy.deepcopy(vit_w4a4).train()
    export_onnx(model, images[:1], tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())


def test_main_job_refuses_a_guard_its_batches_cannot_serve_before_any_work(tmp_path):
    """512 images make 16 compensation batches; a guard fraction that holds out none of them would only be found
    after the first FP evaluation."""
    done = _cli(str(ROOT / "scripts" / "demo.py"), "--guard-fraction", "0.01", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "held-out guard" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
