"""The ImageNet task runner end to end on reduced random-init models and a synthetic class-folder dataset."""
import copy
import json
import re
from pathlib import Path

import pytest
import torch

import qwt
from qwt.cli import LOCK_FILE
from qwt.compensation import Compensated
from qwt.data.synthetic import write_class_folders
from qwt.models import get_model_entry
from qwt.quant import quant_state, set_quant_state
from qwt.report import config_hash
from qwt.tasks import protocol
from qwt.tasks.classification import Classification, main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("imagenet"), classes=4, train_per_class=24, val_per_class=6)


def _argv(model, dataset, out, *extra):
    return ["--model", model, "--smoke", "--data-dir", str(dataset), "--out", str(out), "--workers", "0",
            "--comp-images", "64", "--no-progress", *extra]


def _run(kind, model, dataset, out, *extra):
    """One run through the protocol; its record's rows."""
    task = Classification(kind)
    args = protocol.parse_args(task, "test", _argv(model, dataset, out, *extra))
    assert protocol.run(task, args) == 0
    return json.loads((Path(out) / f"{task.stem(args)}.json").read_text())["rows"]


def _blocks(details):
    """Every per-block report of a details record (one list per setting and form)."""
    return [b for reports in details["blocks"].values() for b in reports]


@pytest.mark.parametrize("task,model", [("vit", "vit_small"), ("vit", "deit_small_distilled"),
                                        ("vit", "swin_tiny"), ("resnet", "resnet18")])
def test_end_to_end_record_is_complete(task, model, dataset, tmp_path):
    rows = _run(task, model, dataset, tmp_path, "--save", str(tmp_path / "saved"))
    assert [r["stage"] for r in rows] == ["fp", "ptq", "qwt"]
    saved = json.loads((tmp_path / f"{model}_W4A4_smoke.json").read_text())
    assert saved["rows"] == rows and saved["complete"] is True and saved["data"]["comp"] == 64
    assert saved["task"] == f"classification-{task}" and saved["run"]["model"] == model
    kernels = {"cpu_capability", "cpu_flags", "mkl", "onednn"}  # the instruction set behind the last digits
    assert {"cpu", "threads", "torch", "timm", "device"} | kernels <= set(saved["environment"])
    baseline = get_model_entry(model).family.default_baseline
    for r in rows:
        assert {"model", "bits", "baseline", "stage", "top1", "size_mb", "peak_memory_mb"} <= set(r)
        assert 0 <= r["top1"] <= 100 and r["model"] == f"{model}-smoke"
    assert [r["baseline"] for r in rows] == [None, baseline, baseline]
    assert rows[2]["form"] == "dense" and rows[1]["ptq_seconds"] == rows[2]["ptq_seconds"] > 0
    assert rows[2]["size_mb"] > rows[1]["size_mb"] > 0
    details = json.loads((tmp_path / "details" / f"{model}_W4A4_smoke.json").read_text())
    assert list(details["blocks"]) == [f"W4A4 {baseline} dense"]
    blocks = _blocks(details)
    assert blocks and all("r2" in b for b in blocks) and rows[2]["blocks"] == len(blocks)
    assert rows[2]["blocks_kept"] == sum(b["applied"] for b in blocks)
    assert f"**{model}-smoke**" in (tmp_path / f"{model}_W4A4_smoke.md").read_text()
    assert (tmp_path / f"{model}_W4A4_smoke.png").stat().st_size > 0
    loaded = qwt.load_quantized(tmp_path / "saved")
    assert sum(isinstance(m, Compensated) for m in loaded.modules()) == len(blocks)


def test_features_on_disk_give_the_same_record(dataset, tmp_path):
    default = _run("resnet", "resnet18", dataset, tmp_path / "memory")
    on_disk = _run("resnet", "resnet18", dataset, tmp_path / "disk", "--feature-device", "disk")
    assert [r["top1"] for r in on_disk] == [r["top1"] for r in default]
    blocks = [_blocks(json.loads((tmp_path / d / "details" / "resnet18_W4A4_smoke.json").read_text()))
              for d in ("memory", "disk")]
    assert [b["r2"] for b in blocks[0]] == [b["r2"] for b in blocks[1]]


@pytest.mark.parametrize("model", ["deit_small_distilled", "swin_tiny"])
def test_reparameterization_keeps_fp_logits_per_family(model):
    fp = qwt.create_model(model, smoke=True, num_classes=4)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = fp(images)
    q = qwt.quantize(copy.deepcopy(fp), images, qwt.PTQConfig())
    set_quant_state(q, weight=False, act=False)
    # Quantisers off: the FP function with each LayerNorm's affine folded into the next Linear, i.e. other FP32
    # sums; relative error of order √K·u ≈ 1e-6 on any CPU, not bit-identity.
    assert (q(images) - reference).norm() / reference.norm() <= 1e-5


@pytest.mark.parametrize("model", ["vit_small", "deit_small_distilled", "swin_tiny", "resnet18"])
def test_compensation_reduces_block_error_and_gate_zeroes(model):
    entry = get_model_entry(model)
    fp = qwt.create_model(model, smoke=True, num_classes=4)
    gen = torch.Generator().manual_seed(1)
    calib, comp = torch.randn(16, 3, 32, 32, generator=gen), torch.randn(48, 3, 32, 32, generator=gen)
    q = qwt.quantize(copy.deepcopy(fp), calib, qwt.PTQConfig())
    plan = entry.family.plan(q)
    first = next(s.path for s in plan.steps if s.compensate)
    x0 = plan.stem(comp)
    for step in plan.steps:  # input of the first compensated block
        if step.path == first:
            break
        x0 = q.get_submodule(step.path)(x0)
    block = q.get_submodule(first)
    with quant_state(block, weight=False, act=False):
        target = block(x0)
    err_before = (target - block(x0)).pow(2).mean()
    gated = copy.deepcopy(q)
    # Least squares on the calibration data cannot do worse than zero there; force it on whatever R² says.
    config = qwt.QwTConfig(fp16_eval=False, r2_threshold=float("-inf"))
    reports = qwt.apply_qwt(q, comp, config, plan=plan, batch_size=16, progress=False)
    err_after = (target - q.get_submodule(first)(x0)).pow(2).mean()
    assert reports[0].applied and err_after < err_before
    reports = qwt.apply_qwt(gated, comp, qwt.QwTConfig(r2_threshold=2.0), progress=False)
    assert not any(r.applied for r in reports)
    assert all(torch.count_nonzero(m.comp_weight) == 0 for m in gated.modules() if isinstance(m, Compensated))


def test_qwt_star_trains_compensation_and_head_only(dataset, tmp_path):
    rows = _run("vit", "deit_tiny", dataset, tmp_path, "--qwt-star", "--star-max-steps", "3", "--skip-fp")
    assert [r["stage"] for r in rows] == ["ptq", "qwt", "qwt*"]
    assert rows[2]["form"] == "dense" and rows[2]["qwt_seconds"] >= rows[1]["qwt_seconds"]
    model = qwt.create_model("deit_tiny", smoke=True, num_classes=4)
    images = torch.randn(32, 3, 32, 32)
    q = qwt.quantize(copy.deepcopy(model), images, qwt.PTQConfig())
    # Zero compensations (gate closed) leave the most to learn.
    qwt.apply_qwt(q, images, qwt.QwTConfig(r2_threshold=2.0), progress=False)
    frozen = {n: p.clone() for n, p in q.named_parameters()}
    batches = [(images[:16], torch.zeros(16, dtype=torch.long))]
    from qwt.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(epochs=10, lr=1e-2, label_weight=1.0)  # cross-entropy: a clear signal to learn
    losses = finetune(q, model, batches, 1, config, progress=False)
    assert len(losses) == 10 and losses[-1] < losses[0]
    changed = {n for n, p in q.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(re.search(r"comp_(weight|bias)$", n) or n.startswith("head") for n in changed)
    assert any(n.startswith("head") for n in changed) and any("comp_weight" in n for n in changed)


def test_missing_data_dir_and_checkpoint_errors(tmp_path, capsys):
    assert main("vit", "t", ["--model", "deit_small", "--data-dir", str(tmp_path), "--workers", "0"]) == 2
    assert "train/ and val/" in capsys.readouterr().err
    data = write_class_folders(tmp_path / "d", classes=2, train_per_class=20, val_per_class=2, size=16)
    assert main("vit", "t", ["--model", "deit_small", "--data-dir", str(data), "--workers", "0"]) == 2
    assert "head scores 1000 classes but val/ has 2 classes" in capsys.readouterr().err  # before any weights
    with pytest.raises(FileNotFoundError, match="deit_small_patch16_224-cd65a155.pth"):
        qwt.create_model("deit_small")
    with pytest.raises(SystemExit):
        protocol.parse_args(Classification("vit"), "t", ["--model", "resnet18"])  # wrong task: not a choice


def test_augmented_images_do_not_depend_on_draw_order(dataset):
    from qwt.data.imagenet import SeededSubset, class_folder, train_transform

    train = class_folder(dataset, "train", train_transform(get_model_entry("deit_tiny").preprocessing))
    subset = SeededSubset(train, [5, 9, 17], seed=0)
    forward = [subset[k][0] for k in range(3)]
    backward = [subset[k][0] for k in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert not torch.equal(SeededSubset(train, [5], seed=1)[0][0], forward[0])  # the seed matters


def test_gptq_from_the_command_line_is_named_in_the_record(dataset, tmp_path):
    rows = _run("vit", "deit_small", dataset, tmp_path, "--method", "gptq", "--method-option", "act_order=true",
                "--save", str(tmp_path / "saved"))
    # never next to a paper RepQ-ViT row, nor in the place of a run with other options
    assert [r["model"] for r in rows] == ["deit_small-gptq-act_order=true-smoke"] * 3
    # the rows name what ran: the option given, and the activations GPTQ took from the family's baseline
    options = {"act_order": True, "activations": "repq_vit"}
    assert [(r["baseline"], r.get("baseline_options")) for r in rows[1:]] == [("gptq", options)] * 2
    details = json.loads((tmp_path / "details" / "deit_small_W4A4_gptq_act_order=true_smoke.json").read_text())
    [ptq] = details["ptq"]
    assert ptq["baseline"] == "gptq" and ptq["baseline_options"]["act_order"] is True
    assert qwt.load_quantized(tmp_path / "saved") is not None


def test_a_method_the_family_cannot_take_is_refused_before_any_compute(dataset, tmp_path):
    with pytest.raises(ValueError, match="LayerNorm → Linear pairs"):
        _run("resnet", "resnet18", dataset, tmp_path / "out", "--method", "repq_vit")
    assert not (tmp_path / "out").exists()


# --- --config FILE: the flags' own checks, named as the file's, before any compute -------------------------------

def _refuse_compute(monkeypatch):
    """From here on, loading a model or data fails the test: what follows is decided before any compute."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run loaded its model and data")

    monkeypatch.setattr(Classification, "open", refuse)


@pytest.fixture
def no_compute(monkeypatch):
    _refuse_compute(monkeypatch)


@pytest.mark.parametrize("settings,flags,words", [
    ({"w_bits": "four"}, [], "argument --w-bits: invalid int value: 'four'"),
    ({"method": "awq"}, [], "argument --method: invalid choice: 'awq'"),
    ({"method": "gptq", "method_option": {"act_order": "no"}}, [], "act_order=no: expected True or False"),
    ({"method_option": {"act_order": "no"}}, ["--method", "gptq"], "act_order=no: expected True or False"),
    ({"method_option": {"act_order": True}}, [], "'repq_vit' has no option(s) act_order"),
    ({"qwt_star": True, "star_temperature": 0}, [], "temperature must be > 0"),
    ({"r2_treshold": 0.5}, [], "unknown setting(s) r2_treshold"),
    ({"skip_fp": "yes"}, [], "skip_fp is true or false, got 'yes'"),
])
def test_a_config_files_bad_value_is_refused_in_one_line_naming_the_file(settings, flags, words, dataset, tmp_path,
                                                                          capsys, no_compute):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings))
    out = tmp_path / "out"
    assert main("vit", "t", [*_argv("deit_tiny", dataset, out), "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {config}: ") and words in err[0], err
    assert not out.exists()


def test_a_bad_command_line_value_is_not_blamed_on_the_config_file(dataset, tmp_path, capsys, no_compute):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"method": "gptq"}))
    argv = [*_argv("deit_tiny", dataset, tmp_path / "out"), "--config", str(config), "--method-option", "act_order=no"]
    assert main("vit", "t", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: PTQ method 'gptq' option act_order=no: expected True or False"]


def test_a_config_file_may_name_the_model_and_the_command_line_wins(dataset, tmp_path):
    """The file may hold a required flag; its run is the one the same flags give (same record name, run and
    configuration), so either resumes the other."""
    task = Classification("vit")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "deit_tiny", "w_bits": 6, "method": "gptq", "smoke": True,
                                  "method_option": {"act_order": True}}))
    from_file = protocol.parse_args(task, "t", ["--config", str(config), "--w-bits", "8", "--out", str(tmp_path)])
    flags = protocol.parse_args(task, "t", ["--model", "deit_tiny", "--w-bits", "8", "--method", "gptq", "--smoke",
                                            "--method-option", "act_order=true", "--out", str(tmp_path)])
    assert from_file.model == "deit_tiny" and from_file.w_bits == 8
    assert task.stem(from_file) == task.stem(flags) == "deit_tiny_W8A4_gptq_act_order=true_smoke"
    assert task.run_key(from_file) == task.run_key(flags)
    assert config_hash(from_file) == config_hash(flags)


# --- a second run on the same --out ------------------------------------------------------------------------------

def _snapshot(out):
    """Every file under ``out``: its bytes, and (but for the lock, which each hold rewrites) when it was written."""
    return {p.relative_to(out).as_posix(): (p.read_bytes(), None if p.name == LOCK_FILE else p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_on_the_same_out_is_skipped_or_refused_and_changes_nothing(dataset, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "out"
    flags = [*_argv("deit_tiny", dataset, out), "--skip-fp"]
    assert main("vit", "t", flags) == 0
    before = _snapshot(out)
    stem = "deit_tiny_W4A4_smoke"
    assert {f"{stem}.json", f"{stem}.md", f"{stem}.png", f"details/{stem}.json"} <= set(before)
    _refuse_compute(monkeypatch)
    capsys.readouterr()
    assert main("vit", "t", flags) == 0  # the same run: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(out) == before
    assert main("vit", "t", [*flags, "--r2-threshold", "0.5"]) == 2  # another configuration of the same record
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out} already holds a complete record of {stem}"), err
    assert _snapshot(out) == before
