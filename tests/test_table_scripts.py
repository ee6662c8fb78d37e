"""The paper-table scripts in --smoke mode (what CI runs): every run, then the assembled table next to the paper."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script,models,bits", [
    ("cls_vit.sh", ["vit_small", "deit_small_distilled", "swin_tiny"], ["W4A4", "W6A6"]),
    ("cls_resnet.sh", ["resnet18", "resnet50"], ["W4A4", "W6A6", "W4A8"]),
])
def test_smoke_table(script, models, bits, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "common")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / script), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert summary["missing"] == [] and summary["environment"][0]["threads"] >= 1
    got = {(r["model"], r["bits"], r["method"]) for r in rows}
    for model in models:
        assert (f"{model}-smoke", "FP", "fp") in got
        for b in bits:
            assert {(f"{model}-smoke", b, "ptq"), (f"{model}-smoke", b, "ptq+qwt")} <= got
    assert all("size_mb" in r for r in rows if r["method"] != "fp")
    for name in ("table.md", "chart.png"):
        assert (out / name).stat().st_size > 0
    assert "Paper numbers:" in (out / "table.md").read_text()


def test_llm_smoke_table(tmp_path):
    """QwT-llm's table is one run of its main.py: --smoke takes the description's smoke flags (a tiny random Llama)
    and the user's flags after them (here two short text files and one setting, to stay fast)."""
    text = "It was a truth universally acknowledged, that a single man in possession of a good fortune. " * 200
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text[::-1])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "common")}
    out = tmp_path / "results"

    def table(*args):
        return subprocess.run(["python3", str(ROOT / "scripts" / "reproduce_table.py"), str(ROOT / "QwT-llm"), *args],
                              env=env, capture_output=True, text=True)

    flags = ["--smoke", "--out", str(out), "--bits", "W4A8", "--forms", "dense", "--calib-text",
             str(tmp_path / "calib.txt"), "--eval-text", str(tmp_path / "eval.txt")]
    done = table(*flags)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny random Llama (smoke)" and summary["data"]["source"] == "files"
    assert summary["data"]["window"] == 64 and summary["data"]["calibration_windows"] == 16
    assert [(r["bits"], r["method"]) for r in summary["rows"]] == [("FP", "fp"), ("W4A8", "rtn"), ("W4A8", "rtn+qwt")]
    assert (out / "table.md").stat().st_size > 0 and (out / "chart.png").stat().st_size > 0
    again = table(*flags)
    assert again.returncode == 2 and "already holds the results of another run" in again.stderr
    refused = table("--checkpoints", str(tmp_path))
    assert refused.returncode == 2 and "--checkpoints" in refused.stderr
    assembled = subprocess.run(["python3", str(ROOT / "scripts" / "assemble_table.py"), str(ROOT / "QwT-llm"),
                                str(out)], env=env, capture_output=True, text=True)
    assert assembled.returncode == 2 and "nothing to assemble" in assembled.stderr
