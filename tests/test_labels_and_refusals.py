"""Refusals, labels and records of a hostile pass over the API and every command line: each case here used to run
on silently (a wrong label, a wrong number) or end in a raw traceback or a hang."""
import argparse
import copy
import json
import os
import runpy
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
from qwt.report import config_hash
from qwt.tasks import classification, protocol
from qwt.tasks.cli import qwt_config
from qwt.tasks.fashion_mnist import FashionMNIST, FashionMNISTSession
from qwt.tasks.tables import assemble_folder, reproduce

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
    task = classification.Classification("resnet")
    args = protocol.parse_args(task, "", ["--model", "resnet18", "--smoke", "--conv-act-bits", "8"])
    assert task.stem(args) == "resnet18_W4A4-convA8_smoke"


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


RESNET = classification.Classification("resnet")


def _table_args(folder: Path, checkpoint: Path | None, model: str = "resnet18") -> argparse.Namespace:
    flags = ["--model", model, "--data-dir", str(folder), "--out", str(folder)]
    return protocol.parse_args(RESNET, "", flags + (["--checkpoint", str(checkpoint)] if checkpoint else []))


def _rows(model: str) -> list[dict]:
    setting = {"model": model, "bits": "W4A4", "baseline": "percentile"}
    return [{"model": model, "bits": "FP", "baseline": None, "stage": "fp", "form": None, "top1": 70.0},
            {**setting, "stage": "ptq", "form": None, "top1": 60.0},
            {**setting, "stage": "qwt", "form": "dense", "top1": 65.0, "blocks_kept": 8, "blocks": 8}]


def _write_record(args: argparse.Namespace, rows: list[dict], task: protocol.Task = RESNET) -> Path:
    """A complete record of ``args``'s run, as the protocol leaves it in --out (the keys resume and assembly read)."""
    record = {"complete": True, "task": task.name, "config_hash": config_hash(args), "run": task.run_key(args),
              "environment": {"cpu": "x"}, "data": {}, "rows": rows}
    path = Path(args.out) / f"{task.stem(args)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_resume_matches_the_checkpoint_by_content(tmp_path, capsys, monkeypatch):
    # Before: after the weights file was replaced, the old record still counted as done and its numbers stayed.
    # Now a record of the same weights is a finished run (nothing is loaded), one of other weights is refused.
    monkeypatch.setattr(classification.Classification, "open", lambda *a: pytest.fail("the run loaded a model"))
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"first weights")
    args = _table_args(tmp_path, weights)
    record = _write_record(args, _rows("resnet18"))
    saved = record.read_bytes()
    assert protocol.run(RESNET, args) == 0 and "nothing to do" in capsys.readouterr().out
    weights.write_bytes(b"other weights, not the same")
    with pytest.raises(InputError, match="already holds a complete record of resnet18_W4A4 made with other settings "
                                         "or another weights file"):
        protocol.run(RESNET, args)
    assert record.read_bytes() == saved


def test_assembly_reports_missing_and_damaged_runs_and_fails_when_partial(tmp_path, capsys):
    for model in ("resnet18", "resnet50"):
        _write_record(_table_args(tmp_path, None, model), _rows(model))
    (tmp_path / "resnet101_W4A4.json").write_text('{"complete": tru')  # damaged
    assert assemble_folder(ROOT / "QwT-cls-ResNet", tmp_path) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "resnet101 W4A4" in summary["missing"] and "resnet18 W6A6" in summary["missing"]
    assert "resnet18 W4A4" not in summary["missing"]
    err = capsys.readouterr().err
    assert "resnet101_W4A4" in err and "missing runs" in err


def test_assembly_refuses_records_of_another_task(tmp_path):
    _write_record(_table_args(tmp_path, None), _rows("resnet18"))
    with pytest.raises(InputError, match="not in .*QwT-cls-RepQ-ViT's table: resnet18_W4A4"):
        assemble_folder(ROOT / "QwT-cls-RepQ-ViT", tmp_path)
    assert not (tmp_path / "summary.json").exists()


def _load_script(name: str, code: str) -> str:
    """Run ``code`` with ``scripts/`` as the working folder (the scripts import each other as top-level modules)."""
    done = _cli("-c", code, cwd=ROOT / "scripts")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def small_fashion_mnist(monkeypatch):
    """Fashion-MNIST cut to 300 train and 60 test images, so that the main job's runs load and run in seconds."""
    from qwt.tasks import fashion_mnist

    gen = torch.Generator().manual_seed(0)
    data = {split: (torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen), torch.arange(n) % 10)
            for split, n in (("train", 300), ("test", 60))}
    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", lambda split, root=None: data[split])


def _main_job_session(*flags: str) -> FashionMNISTSession:
    args = protocol.parse_args(FashionMNIST(), "", [*flags, "--calib-images", "8", "--comp-images", "32",
                                                    "--no-progress"])
    return FashionMNISTSession(args)


def test_main_job_labels_its_cnn_subset_and_records_only_what_ran(small_fashion_mnist):
    vit = _main_job_session("--model", "vit_fmnist")
    assert vit.label == "vit_fmnist" and vit.data == {"calib_images": 8, "comp_images": 32, "test_images": 60}
    cnn = ["--model", "efficientnet_lite0", "--probe-images", "20"]
    subset = _main_job_session(*cnn, "--cnn-test-images", "50")
    assert subset.label == "efficientnet_lite0@64px-test50"  # a subset never passes for the full test set
    assert subset.data == {"calib_images": 8, "comp_images": 32, "test_images": 50, "probe_images": 20}
    assert _main_job_session(*cnn, "--cnn-test-images", "100").label == "efficientnet_lite0@64px"


def test_main_job_records_every_qwt_setting_that_ran(small_fashion_mnist, tmp_path):
    """The run's details record the QwT configuration it used (the main job did not state --guard-fraction)."""
    task = FashionMNIST()
    args = protocol.parse_args(task, "", ["--model", "vit_fmnist", "--bits", "W4A4", "--gptq-bits", "--calib-images",
                                          "8", "--comp-images", "128", "--guard-fraction", "0.25", "--solver",
                                          "reference", "--seed", "3", "--skip-fp", "--no-progress",
                                          "--out", str(tmp_path)])
    assert protocol.run(task, args) == 0
    details = json.loads((tmp_path / "details" / "vit_fmnist.json").read_text())
    guarded = asdict(qwt.QwTConfig(guard_fraction=0.25, solver="reference"))
    assert details["qwt"] == [json.loads(json.dumps(guarded))]
    assert details["args"]["seed"] == 3 and details["args"]["guard_fraction"] == 0.25
    record = json.loads((tmp_path / "vit_fmnist.json").read_text())
    assert record["data"] == {"calib_images": 8, "comp_images": 128, "test_images": 60}
    assert [r["stage"] for r in record["rows"]] == ["ptq", "qwt"]
    default = protocol.check(task, protocol.parse_args(task, "", ["--model", "vit_fmnist", "--out", str(tmp_path)]))
    assert default.forms == [qwt.QwTConfig()]  # the job's defaults are the library's


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
    args = protocol.parse_args(classification.Classification("vit"), "",
                               ["--model", "deit_tiny", "--feature-device", "cuda"])
    with pytest.raises(InputError, match="--feature-device cuda: no CUDA GPU"):
        qwt_config(args)


def test_star_temperature_zero_is_refused_before_the_run(tmp_path):
    done = _cli("QwT-cls-ResNet/main.py", "--model", "resnet18", "--smoke", "--qwt-star", "--star-temperature", "0",
                "--workers", "0", "--no-progress", "--out", str(tmp_path / "out"))
    _one_line_refusal(done, "temperature must be > 0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.json"))


def test_reproduce_table_refuses_a_folder_that_is_not_a_task(tmp_path, capsys):
    _one_line_refusal(_cli("scripts/reproduce_table.py", str(tmp_path), "--smoke"), "configs/table.json not found")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "table.json").write_text('{"title": "x"}')
    _refused_in_process(lambda argv: reproduce(tmp_path, argv), ["--smoke"], capsys, "is not a table description")


def _script_main(path: str):
    """``main`` of a script outside the package, loaded as a module (its refusals checked in process: its start as
    a program is checked by the tests above that run it)."""
    return runpy.run_path(str(ROOT / path), run_name=Path(path).stem)["main"]


def _refused_in_process(main, argv: list[str], capsys, *words: str) -> None:
    """Exit status 2 (argparse's, or run_cli's for an input error: no exception escapes) and one ``error:`` line
    naming the problem."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("flags,words", [
    (["--comp-images", "0"], ["must be at least 1"]), (["--comp-images", "-5"], ["must be at least 1"]),
    (["--out", "FILE"], ["exists and is not a folder"]),
])
def test_deploy_checks_its_inputs_first(tmp_path, capsys, flags, words):
    (tmp_path / "file").write_text("keep")
    flags = [str(tmp_path / "file") if f == "FILE" else f for f in flags]
    _refused_in_process(_script_main("scripts/deploy.py"), ["--models", "vit_fmnist", *flags], capsys, *words)
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize("flags,words", [
    (["--calib-images", "0"], ["must be at least 1"]), (["--comp-images", "-1"], ["must be at least 1"]),
    (["--w-bits", "9"], ["bit width"]), (["--model", "no_such_model"], ["unknown model"]),
    (["--feature-device", "nowhere"], ["--feature-device"]),
])
def test_calibration_benchmark_refuses_bad_input_in_one_line(capsys, flags, words):
    main = _script_main("benchmarks/calibration_speed.py")
    _refused_in_process(main, ["--smoke", "--model", "deit_tiny", *flags], capsys, *words)


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
