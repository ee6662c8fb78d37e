"""Inputs that used to give a silent wrong number or a raw traceback are refused before any compute, with one
exit code; runs record what they used and where; table assembly reads only matching complete records."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from qwt import PTQConfig, QwTConfig
from qwt.compensation.blockwise import check_qwt_config
from qwt.data.imagenet import Preprocessing, make_loaders
from qwt.data.synthetic import write_class_folders
from qwt.errors import InputError
from qwt.report import config_hash
from qwt.tasks import protocol
from qwt.tasks.classification import Classification, main, run_label
from qwt.tasks.tables import Table, assemble

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    """A script of ``scripts/`` imported as a module (scripts are not a package; nothing is added to sys.path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


assemble_table = _script("assemble_table")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("imagenet"), classes=4, train_per_class=8, val_per_class=2)


@pytest.mark.parametrize("kwargs", [{"log_floor": -1e-6}, {"log_floor": float("nan")}])
def test_ptq_config_refuses_a_bad_log_floor(kwargs):
    with pytest.raises(ValueError, match="log_floor"):
        PTQConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"r2_threshold": float("nan")}, "r2_threshold"), ({"ridge": -1.0}, "ridge"),
    ({"solver": "magic"}, "unknown solver"), ({"start_block": 6}, "past the last block"),
])
def test_qwt_config_is_checked_against_the_plan(kwargs, message):
    with pytest.raises(ValueError, match=message):  # bad settings: QwTConfig itself; start_block: against the plan
        check_qwt_config(QwTConfig(**kwargs), blocks=6)
    check_qwt_config(QwTConfig(start_block=5), blocks=6)


def test_class_lists_are_checked_before_compute(dataset, tmp_path):
    # Before: a missing val class or a 4-class val under a 1000-class head ran to the end and reported 0.00 %.
    pre = Preprocessing(0.875)
    with pytest.raises(InputError, match="head scores 1000 classes but val/ has 4 classes"):
        make_loaders(dataset, pre, 4, 8, workers=0, head_classes=1000)
    broken = shutil.copytree(dataset, tmp_path / "data")
    shutil.rmtree(next(p for p in sorted((broken / "val").iterdir())))
    with pytest.raises(InputError, match="missing in val/: 1 classes"):
        make_loaders(broken, pre, 4, 8, workers=0)


def test_counts_larger_than_the_data_are_recorded_as_used(dataset):
    # Before: --comp-images 512 on 32 train images recorded 512.
    loaders = make_loaders(dataset, Preprocessing(0.875), 4, 512, workers=0)
    assert loaders.counts == {"calib": 4, "comp": 32, "val": 8, "val_total": 8}
    assert sum(len(x) for x, _ in loaders.comp) == 32


@pytest.mark.parametrize("flags,message", [
    (["--calib-images", "0"], None), (["--comp-images", "-5"], None), (["--r2-threshold", "nan"], None),
    (["--checkpoint", "{tmp}"], "is a directory"), (["--checkpoint", "{tmp}/w.safetensors"], "truncated"),
    (["--checkpoint", "{tmp}/w.npz"], "not a complete big_vision .npz"),
    (["--out", "{tmp}/file/out"], "is not a folder"), (["--device", "cuda:7"], "--device cuda:7"),
    (["--save", "{tmp}/notes"], "is not a saved QwT model"), (["--save", "{tmp}"], "pass a --save outside --out"),
])
def test_main_refuses_bad_input_with_exit_2_and_no_traceback(flags, message, dataset, tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04" + b"\0" * 20)
    (tmp_path / "file").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a saved model")
    argv = ["--model", "vit_small", "--smoke", "--data-dir", str(dataset), "--workers", "0", "--no-progress",
            "--out", str(tmp_path / "out"), *(f.format(tmp=tmp_path) for f in flags)]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and (message is None or message in err), err
    assert not (tmp_path / "out").exists()


def _exit_code(argv: list[str]) -> int:
    try:
        return main("vit", "test", argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


def test_rows_are_recorded_as_they_come_and_subset_runs_are_marked(dataset, tmp_path, monkeypatch):
    # A crash in QwT must not lose the FP and PTQ rows; the record says it is incomplete.
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(protocol, "apply_qwt", crash)
    task = Classification("resnet")
    args = protocol.parse_args(task, "t", [
        "--model", "resnet18", "--smoke", "--data-dir", str(dataset), "--workers", "0", "--no-progress",
        "--comp-images", "8", "--val-limit", "3", "--out", str(tmp_path)])
    assert run_label(args) == "resnet18-smoke-val3"
    with pytest.raises(RuntimeError, match="out of memory"):
        protocol.run(task, args)
    record = json.loads((tmp_path / "resnet18_W4A4_smoke_val3.json").read_text())
    assert record["complete"] is False and [r["stage"] for r in record["rows"]] == ["fp", "ptq"]
    assert not (tmp_path / "resnet18_W4A4_smoke_val3.md").exists()  # a table is written from complete records
    assert record["data"]["val"] == 3 and record["rows"][0]["model"] == "resnet18-smoke-val3"
    assert record["environment"]["threads"] == torch.get_num_threads()


def _record(folder: Path, model: str, complete: bool, seed: int = 0) -> None:
    """A record of a ViT run as the protocol leaves it in --out (complete, or cut off after its PTQ row)."""
    task = Classification("vit")
    args = protocol.parse_args(task, "", ["--model", model, "--data-dir", str(folder), "--seed", str(seed),
                                          "--out", str(folder)])
    setting = {"model": model, "bits": "W4A4", "baseline": "repq_vit"}
    rows = [{"model": model, "bits": "FP", "baseline": None, "stage": "fp", "form": None, "top1": 80.0},
            {**setting, "stage": "ptq", "form": None, "top1": 70.0},
            {**setting, "stage": "qwt", "form": "dense", "top1": 75.0, "blocks_kept": 12, "blocks": 12}]
    record = {"complete": complete, "task": task.name, "config_hash": config_hash(args), "run": task.run_key(args),
              "environment": {"cpu": "x"}, "data": {}, "rows": rows if complete else rows[:2]}
    (folder / f"{task.stem(args)}.json").write_text(json.dumps(record))


def test_assembly_reads_only_matching_complete_records(tmp_path, capsys):
    _record(tmp_path, "deit_tiny", True)
    _record(tmp_path, "deit_small", False)  # interrupted
    (tmp_path / "notes.json").write_text("[1, 2]")  # foreign JSON
    task = ROOT / "QwT-cls-RepQ-ViT"
    assert assemble_table.main([str(task), str(tmp_path)]) == 1  # a partial table: the other runs are missing
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["model"] for r in summary["rows"]} == {"deit_tiny"} and summary["environment"] == [{"cpu": "x"}]
    assert "deit_small W4A4" in summary["missing"] and "deit_tiny W4A4" not in summary["missing"]
    assert "deit_small_W4A4" in capsys.readouterr().err
    _record(tmp_path, "deit_base", True, seed=1)  # made with other settings
    assert assemble_table.main([str(task), str(tmp_path)]) == 2  # two configurations: which one?
    config = json.loads((tmp_path / "deit_tiny_W4A4.json").read_text())["config_hash"]
    assert assemble(tmp_path, [("deit_tiny_W4A4", config), ("deit_base_W4A4", config)], Table.load(task)) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["missing"] == ["deit_base_W4A4"]


def test_sigterm_stops_the_table_script_and_its_child(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "common"), "OMP_WAIT_POLICY": "PASSIVE"}
    parent = subprocess.Popen([sys.executable, str(ROOT / "scripts/reproduce_table.py"), str(ROOT / "QwT-cls-ResNet"),
                               "--smoke", "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = out / "resnet18_W4A4_smoke.json"
    deadline = time.monotonic() + 120
    while not record.exists() and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.01)
    assert record.exists(), "the first run wrote no record"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=90) == 130
    # The signal lands during the first run, or on a fast CPU just after it (a smoke run can finish between its
    # first row and the signal): either way the table stops there, the first record says complete only if it
    # holds the run's last row, a second run, if one started, is marked incomplete, no child is left and nothing
    # is assembled.
    first = json.loads(record.read_text())
    assert not first["complete"] or first["rows"][-1]["stage"] == "qwt"
    others = [p for p in out.glob("*_smoke.json") if p != record]
    assert len(others) <= 1 and all(json.loads(p.read_text())["complete"] is False for p in others)
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(out).encode() in _cmdline(p)]
    assert children == []
    assert not (out / "summary.json").exists()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("settings", [{"skip_degenerate": "no"}, {"fp16_eval": "no"}, {"start_block": True},
                                      {"kernel_size": 3.0}, {"r2_threshold": "0.5"}, {"feature_device": 3}])
def test_qwt_settings_of_the_wrong_type_are_refused(settings):
    """A wrongly typed QwT setting would run as something else ("no" is truthy, True is block 1)."""
    name = next(iter(settings))
    with pytest.raises(ValueError, match=f"QwTConfig {name} takes"):
        QwTConfig(**settings)
    assert QwTConfig(ridge=1).ridge == 1.0 and type(QwTConfig(ridge=1).ridge) is float  # recorded as it runs


@pytest.mark.parametrize("settings", [{"w_bits": 4.0}, {"conv_act_bits": True}, {"log_floor": "1e-6"}])
def test_ptq_settings_of_the_wrong_type_are_refused(settings):
    with pytest.raises(ValueError, match=f"PTQConfig {next(iter(settings))} takes"):
        PTQConfig(**settings)
