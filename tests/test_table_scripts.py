"""The paper-table scripts in --smoke mode (what CI runs): every run, then the assembled table next to the paper."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from qwt.cli import LOCK_FILE
from qwt.tasks.tables import Table, assemble

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
    got = {(r["model"], r["bits"], r["stage"]) for r in rows}
    for model in models:
        assert (f"{model}-smoke", "FP", "fp") in got
        for b in bits:
            assert {(f"{model}-smoke", b, "ptq"), (f"{model}-smoke", b, "qwt")} <= got
    assert all("size_mb" in r and r["baseline"] for r in rows if r["stage"] != "fp")
    for name in ("table.md", "chart.png"):
        assert (out / name).stat().st_size > 0
    assert "Paper numbers:" in (out / "table.md").read_text()


def _files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` but the lock (it names the last run that held the folder)."""
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*"))
            if f.is_file() and f.name != LOCK_FILE}


def test_llm_smoke_table(tmp_path):
    """QwT-llm's table is three runs of its main.py (per-token inputs; static per-tensor inputs, an RTN option; GPTQ):
    --smoke takes the description's smoke flags (a tiny random Llama with the installed SmolLM2 tokenizer, on the
    fetched Austen corpus, as CI runs scripts/llm.sh --smoke) and the user's flags after them (here one setting and
    one form, to stay fast). A second identical call finds every record complete and runs nothing; the models ×
    bits assembler has nothing to assemble for a list of runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "common")}
    out = tmp_path / "results"

    def table(*args):
        return subprocess.run(["python3", str(ROOT / "scripts" / "reproduce_table.py"), str(ROOT / "QwT-llm"), *args],
                              env=env, capture_output=True, text=True)

    flags = ["--smoke", "--out", str(out), "--bits", "W4A8", "--forms", "dense"]
    done = table(*flags)
    assert done.returncode == 0, done.stderr[-2000:]
    stems = ["tiny-random-llama", "tiny-random-llama-rtn-activations=tensor", "tiny-random-llama-gptq"]
    for stem in stems:
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["complete"] and record["rows"][0]["model"] == "tiny random Llama (smoke)"
        assert record["data"]["source"] == "janeaustenr" and record["data"]["window"] == 64
        assert record["data"]["evaluation_windows"] == 8
        assert record["data"]["calibration_windows"] == 16 and (out / f"{stem}.md").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    static, gptq = {"activations": "tensor"}, {"activations": "rtn"}
    assert [(r["bits"], r["baseline"], r.get("baseline_options"), r["stage"], r["form"]) for r in summary["rows"]] == [
        ("FP", None, None, "fp", None), ("W4A8", "rtn", None, "ptq", None), ("W4A8", "rtn", None, "qwt", "dense"),
        ("W4A8", "rtn", static, "ptq", None), ("W4A8", "rtn", static, "qwt", "dense"),
        ("W4A8", "gptq", gptq, "ptq", None), ("W4A8", "gptq", gptq, "qwt", "dense")]
    assert summary["missing"] == [] and (out / "chart.png").stat().st_size > 0
    assert "| W4A8 | rtn (activations=tensor) | PTQ + QwT |" in (out / "table.md").read_text()
    before = _files(out)
    again = table(*flags)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [line for line in again.stdout.splitlines() if line.startswith("= ")] == \
        [f"= {stem}: complete record with this configuration, skipped" for stem in stems]
    assert not any(line.startswith("+ ") for line in again.stdout.splitlines())  # no run started
    assert _files(out) == before
    refused = table("--checkpoints", str(tmp_path))
    assert refused.returncode == 2 and "--checkpoints" in refused.stderr
    assembled = subprocess.run(["python3", str(ROOT / "scripts" / "assemble_table.py"), str(ROOT / "QwT-llm"),
                                str(out)], env=env, capture_output=True, text=True)
    assert assembled.returncode == 2 and "nothing to assemble" in assembled.stderr
    assert len(assembled.stderr.strip().splitlines()) == 1, assembled.stderr


def _row(baseline_options: dict | None, stage: str, form: str | None, perplexity: float) -> dict:
    row = {"model": "m", "bits": "W4A8" if stage != "fp" else "FP", "baseline": None if stage == "fp" else "rtn",
           "stage": stage, "form": form, "perplexity": perplexity, "agreement": 90.0}
    return row if baseline_options is None else {**row, "baseline_options": baseline_options}


def test_assembly_keeps_rows_that_differ_only_in_the_baselines_options(tmp_path, capsys):
    """The LM table's second run is W4A8 RTN again, with static per-tensor inputs: its rows used to be taken for
    repeats of the first run's (the FP row is evaluated once per model) and dropped from summary.json and
    table.md. An FP row given by both runs is still kept once."""
    static = {"activations": "tensor"}
    records = {"a": [_row(None, "fp", None, 10.0), _row(None, "ptq", None, 12.0), _row(None, "qwt", "dense", 11.0)],
               "b": [_row(None, "fp", None, 10.0), _row(static, "ptq", None, 14.0), _row(static, "qwt", "dense", 13.0)]}
    for stem, rows in records.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps({"complete": True, "config_hash": stem,
                                                           "environment": {"threads": 1}, "rows": rows}))
    assert assemble(tmp_path, [("a", "a"), ("b", "b")], Table.load(ROOT / "QwT-llm")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["perplexity"] for r in summary["rows"]] == [10.0, 12.0, 11.0, 14.0, 13.0]
    assert "| W4A8 | rtn (activations=tensor) | PTQ + QwT | 13.00 |" in (tmp_path / "table.md").read_text()
