"""The baseline axis is open on every task's command line: a baseline defined here, in the test file (no library
edit), runs through the smoke mode of classification (ViT and CNN), detection and the language-model task, and
through the table runner (a vision table and the LM table), and is named in each run's labels, records and
configs."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qwt.ptq.baselines import Baseline, register_baseline
from qwt.quant.quantizers import Quantizer, UniformQuantizer
from qwt.tasks import protocol, tables

ROOT = Path(__file__).resolve().parent.parent


@register_baseline
@dataclass(frozen=True)
class ToyMinMax(Baseline):
    """Per-tensor weights (one grid for the whole matrix) and the default per-tensor activations; ``coarse``
    drops one weight bit. ``activations`` takes RTN's ``tensor`` (static per-tensor inputs: what it does anyway),
    so that the LM table's second run, which sets that option, runs with it too."""

    name = "test_toy_minmax"
    coarse: bool = False
    activations: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activations not in (None, "tensor"):
            raise ValueError(f"test_toy_minmax activations: only 'tensor', got {self.activations!r}")

    def weight_quantizer(self, bits: int) -> Quantizer:
        return UniformQuantizer(bits - self.coarse, channel_axis=None)


TOY = ["--method", "test_toy_minmax", "--method-option", "coarse=true"]


def _record(out, suffix: str = ".json") -> dict:
    (record,) = [p for p in out.glob(f"*{suffix}") if p.name != "summary.json"]
    return json.loads(record.read_text())


@pytest.mark.parametrize("task,model", [("vit", "deit_tiny"), ("resnet", "resnet18")])
def test_classification_runs_a_baseline_defined_outside_the_library(task, model, tmp_path):
    from qwt.tasks.classification import main

    out = tmp_path / "out"
    assert main(task, "", ["--model", model, "--smoke", "--no-progress", "--workers", "0", "--calib-images", "8",
                           "--comp-images", "16", "--out", str(out), *TOY]) == 0
    stem = f"{model}_W4A4_test_toy_minmax_coarse=true_smoke"
    record = json.loads((out / f"{stem}.json").read_text())
    assert all(row["model"] == f"{model}-test_toy_minmax-coarse=true-smoke" for row in record["rows"])
    assert [(r["stage"], r["baseline"], r.get("baseline_options")) for r in record["rows"]] == \
        [("fp", None, None), ("ptq", "test_toy_minmax", {"coarse": True}), ("qwt", "test_toy_minmax", {"coarse": True})]
    (ptq,) = json.loads((out / "details" / f"{stem}.json").read_text())["ptq"]
    assert ptq["baseline"] == "test_toy_minmax" and ptq["baseline_options"] == {"coarse": True, "activations": None}
    assert "| W4A4 | test_toy_minmax (coarse=true) | PTQ + QwT |" in (out / f"{stem}.md").read_text()


def test_detection_runs_a_baseline_defined_outside_the_library(tmp_path):
    from qwt.tasks.detection.pipeline import main

    out = tmp_path / "out"
    assert main("", ["--model", "mask_rcnn_swin_t", "--smoke", "--no-progress", "--workers", "0", "--skip-fp",
                     "--out", str(out), *TOY]) == 0
    record = _record(out)
    assert [(r["stage"], r["baseline"], r["baseline_options"]) for r in record["rows"]] == \
        [("ptq", "test_toy_minmax", {"coarse": True}), ("qwt", "test_toy_minmax", {"coarse": True})]
    assert record["rows"][0]["model"] == "mask_rcnn_swin_t-test_toy_minmax-coarse=true-smoke"
    (ptq,) = json.loads(next((out / "details").glob("*.json")).read_text())["ptq"]
    assert ptq["baseline_options"] == {"coarse": True, "activations": None}


def test_the_language_model_task_runs_a_baseline_defined_outside_the_library(tmp_path):
    from qwt.tasks import llm

    out, save = tmp_path / "out", tmp_path / "save"
    flags = ["--tiny-random", "--window", "32", "--calib-windows", "8", "--eval-windows", "4", "--ptq-windows", "2",
             "--bits", "W4A8", "--forms", "dense", "--guard-fraction", "0", "--continuation-tokens", "1",
             "--no-progress", "--out", str(out), *TOY]
    assert llm.main("", flags) == 0
    record = json.loads((out / "tiny-random-llama-test_toy_minmax-coarse=true.json").read_text())
    rows = record["rows"]
    assert [(r["stage"], r["baseline"], r.get("baseline_options")) for r in rows] == \
        [("fp", None, None), ("ptq", "test_toy_minmax", {"coarse": True}), ("qwt", "test_toy_minmax", {"coarse": True})]
    assert set(record["data"]["continuations"]) >= {"W4A8 test_toy_minmax", "W4A8 test_toy_minmax + QwT"}
    assert "| W4A8 | test_toy_minmax (coarse=true) | PTQ + QwT |" in \
        (out / "tiny-random-llama-test_toy_minmax-coarse=true.md").read_text()
    assert all(torch.isfinite(torch.tensor(r["perplexity"])) for r in rows)
    # named for the baseline and its options: a save of another baseline's run never replaces this one (asked of
    # the task, without saving)
    task = llm.LanguageModel()
    args = protocol.parse_args(task, "", [*flags, "--save", str(save)])
    (config,) = task.settings(args)
    assert task.save_name(args, config, "dense", only=True) == "W4A8-test_toy_minmax-coarse=true"
    assert task.save_name(args, config, "channelwise", only=True) == "W4A8-test_toy_minmax-coarse=true-channelwise"


def _runs_in_this_process(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The table runner starts each run as a new process, which would not know a baseline registered in this test
    file (``--method`` would refuse it): each run is made here instead, through its folder's task and the very
    flags the child would get. Returns the flag lists run, in order."""
    ran: list[list[str]] = []

    def run_child(cmd: list[str]) -> int:
        assert cmd[0] == sys.executable and Path(cmd[1]).name == "main.py"
        ran.append(cmd[2:])
        return protocol.main(tables.Table.load(Path(cmd[1]).parent).task(), "", cmd[2:])

    monkeypatch.setattr(tables, "run_child", run_child)
    return ran


def _summary_settings(out: Path) -> list[tuple]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == []
    return [(r["model"], r["bits"], r["baseline"], r.get("baseline_options"), r["stage"]) for r in summary["rows"]]


def test_a_vision_table_runs_a_baseline_defined_outside_the_library(tmp_path, monkeypatch):
    ran = _runs_in_this_process(monkeypatch)
    out = tmp_path / "table"
    assert tables.reproduce(ROOT / "QwT-cls-ResNet", ["--smoke", "--out", str(out), "--calib-images", "8",
                                                      "--comp-images", "16", *TOY]) == 0
    assert len(ran) == 6 and all(" ".join(TOY) in " ".join(flags) for flags in ran)  # 2 models × 3 settings
    expected = []
    for model in ("resnet18-test_toy_minmax-coarse=true-smoke", "resnet50-test_toy_minmax-coarse=true-smoke"):
        expected += [(model, "FP", None, None, "fp")] + [(model, bits, "test_toy_minmax", {"coarse": True}, stage)
                                                         for bits in ("W4A4", "W6A6", "W4A8") for stage in ("ptq", "qwt")]
    assert _summary_settings(out) == expected
    assert "test_toy_minmax (coarse=true)" in (out / "table.md").read_text()


def test_the_lm_table_runs_a_baseline_defined_outside_the_library(tmp_path, monkeypatch):
    """Both of the LM table's runs take the baseline: the second adds its own option (static per-tensor inputs)."""
    ran = _runs_in_this_process(monkeypatch)
    text = "It was a truth universally acknowledged, that a single man in possession of a good fortune. " * 100
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text[::-1])
    out = tmp_path / "table"
    assert tables.reproduce(ROOT / "QwT-llm", ["--smoke", "--out", str(out), "--bits", "W4A8", "--forms", "dense",
                                               "--calib-text", str(tmp_path / "calib.txt"), "--eval-text",
                                               str(tmp_path / "eval.txt"), *TOY]) == 0
    assert len(ran) == 2
    for stem in ("tiny-random-llama-test_toy_minmax-coarse=true",
                 "tiny-random-llama-test_toy_minmax-activations=tensor-coarse=true"):
        assert json.loads((out / f"{stem}.json").read_text())["complete"]
    label, coarse, static = "tiny random Llama (smoke)", {"coarse": True}, {"activations": "tensor", "coarse": True}
    assert _summary_settings(out) == [
        (label, "FP", None, None, "fp"), (label, "W4A8", "test_toy_minmax", coarse, "ptq"),
        (label, "W4A8", "test_toy_minmax", coarse, "qwt"), (label, "W4A8", "test_toy_minmax", static, "ptq"),
        (label, "W4A8", "test_toy_minmax", static, "qwt")]
