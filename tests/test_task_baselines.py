"""The baseline axis is open on every task's command line: a baseline defined here, in the test file (no library
edit), runs through the smoke mode of classification (ViT and CNN), detection and the language-model task, and is
named in each run's labels, records and configs."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from qwt.ptq.baselines import Baseline, register_baseline
from qwt.quant.quantizers import Quantizer, UniformQuantizer


@register_baseline
@dataclass(frozen=True)
class ToyMinMax(Baseline):
    """Per-tensor weights (one grid for the whole matrix) and the default per-tensor activations; ``coarse``
    drops one weight bit."""

    name = "test_toy_minmax"
    coarse: bool = False

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
    record = _record(out)
    assert all(row["model"] == f"{model}-test_toy_minmax-coarse=true-smoke" for row in record["rows"])
    details = json.loads((out / "details" / f"{model}_W4A4_test_toy_minmax_coarse=true_smoke.json").read_text())
    assert details["ptq"]["baseline"] == "test_toy_minmax" and details["ptq"]["baseline_options"] == {"coarse": True}


def test_detection_runs_a_baseline_defined_outside_the_library(tmp_path):
    from qwt.tasks.detection.pipeline import main

    out = tmp_path / "out"
    assert main("", ["--model", "mask_rcnn_swin_t", "--smoke", "--no-progress", "--workers", "0", "--skip-fp",
                     "--out", str(out), *TOY]) == 0
    record = _record(out)
    assert [row["method"] for row in record["rows"]] == ["ptq", "ptq+qwt"]
    assert record["rows"][0]["model"] == "mask_rcnn_swin_t-test_toy_minmax-coarse=true-smoke"
    details = json.loads(next((out / "details").glob("*.json")).read_text())
    assert details["ptq"]["baseline_options"] == {"coarse": True}


def test_the_language_model_task_runs_a_baseline_defined_outside_the_library(tmp_path):
    from qwt.tasks import llm

    out, save = tmp_path / "out", tmp_path / "save"
    assert llm.main("", ["--tiny-random", "--window", "32", "--calib-windows", "8", "--eval-windows", "4",
                         "--ptq-windows", "2", "--bits", "W4A8", "--forms", "dense", "--guard-fraction", "0",
                         "--continuation-tokens", "1", "--no-progress", "--out", str(out), "--save", str(save),
                         *TOY]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "test_toy_minmax", "test_toy_minmax+qwt"]
    assert all(r["baseline_options"] == {"coarse": True} for r in rows[1:])
    assert "Baseline test_toy_minmax with coarse=true." in (out / "table.md").read_text()
    # named for the baseline and its options: a save of another baseline's run never replaces this one
    assert [p.name for p in save.iterdir()] == ["W4A8-test_toy_minmax-coarse=true"]
    assert all(torch.isfinite(torch.tensor(r["perplexity"])) for r in rows)
