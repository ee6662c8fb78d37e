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
