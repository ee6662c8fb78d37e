"""Records name the instruction set: the last digits of a result depend on which kernels ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qwt.environment
from qwt.environment import KERNEL_FLAGS, cpu_flags, environment, kernel_libraries, kernels_note


def test_environment_names_the_kernels_torch_dispatches_to():
    env = environment()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_flags"] is None or set(env["cpu_flags"]) <= set(KERNEL_FLAGS)
    assert env["mkl"] is None or env["mkl"][0].isdigit()
    assert env["onednn"] is None or env["onednn"][0].isdigit()
    assert {"cpu", "threads", "torch"} <= set(env)  # alongside the existing fields
    if torch.backends.mkl.is_available():
        assert env["mkl"] is not None
    if torch.backends.mkldnn.is_available():
        assert env["onednn"] is not None


def test_an_overridden_capability_is_recorded_with_the_variable_that_set_it():
    """Run in a fresh process: torch reads ATEN_CPU_CAPABILITY once, at import."""
    code = "import json; from qwt.environment import environment; print(json.dumps(environment()))"
    run_env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, check=True)
    env = json.loads(done.stdout.strip().splitlines()[-1])
    assert env["cpu_capability"] == "DEFAULT"
    assert env["kernel_env"].items() >= {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}.items()
    assert "DEFAULT" in kernels_note(env) and "ATEN_CPU_CAPABILITY=default" in kernels_note(env)


def test_cpu_flags_are_the_kernel_relevant_subset(monkeypatch):
    line = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8 avx512_fp16"
    monkeypatch.setattr(qwt.environment, "cpuinfo_field", lambda name: line if name == "flags" else None)
    assert cpu_flags() == ["avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"]
    monkeypatch.setattr(qwt.environment, "cpuinfo_field", lambda name: None)  # no /proc/cpuinfo (not Linux)
    assert cpu_flags() is None
    assert "CPU flags" not in kernels_note(environment())


def test_missing_torch_introspection_gives_none_not_a_crash(monkeypatch):
    """Older or differently built torch: no get_cpu_capability, no MKL, a build summary without versions."""
    monkeypatch.delattr(torch.backends.cpu, "get_cpu_capability")
    monkeypatch.setattr(torch.__config__, "show", lambda: "PyTorch built with:\n  - GCC 9\n")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    libs = kernel_libraries()
    assert libs["cpu_capability"] is None and libs["mkl"] is None and libs["onednn"] is None
    assert "unknown" in kernels_note(libs)


@pytest.mark.parametrize("summary, mkl, onednn", [
    ("  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605\n"
     "  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71)\n", "2024.2", "3.12.0"),
    ("  - Intel(R) Math Kernel Library Version 2020.0.0 Product Build 20191122\n"
     "  - Intel(R) MKL-DNN v2.7.3 (Git Hash 6dbeffbae1f23cbbeae17adb7b5b13f1f37c080e)\n", "2020.0.0", "2.7.3"),
])
def test_library_versions_are_read_from_old_and_new_build_summaries(monkeypatch, summary, mkl, onednn):
    monkeypatch.setattr(torch.__config__, "show", lambda: "PyTorch built with:\n" + summary)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    libs = kernel_libraries()
    assert (libs["mkl"], libs["onednn"]) == (mkl, onednn)
