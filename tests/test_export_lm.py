"""The 4-bit language-model ONNX export (qwt.export.lm): MatMulNBits initialisers are the library's own codes,
the kernel's 8-bit input blocks are what rtn ``activations=block`` simulates, the graph computes the PyTorch
model (every QwT form), the KV cache continues a sequence as one pass does, and what cannot be written is refused."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qwt
from qwt.errors import InputError
from qwt.models.decoder_lm import DECODER_LM, build_from_config, tiny_config
from qwt.ptq import PTQConfig
from qwt.ptq.baselines import make_baseline

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from qwt.export.lm import export_decoder_lm  # noqa: E402
from qwt.export.lm_runtime import OnnxLM  # noqa: E402
from qwt.export.nbits import nbits_weight  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_from_config(config=tiny_config(model_type, vocab_size=128)).eval()


def _quantized(model: torch.nn.Module, a_bits: int = 16, group: int | None = 32, activations: str = "token"):
    options = {"group_size": group} if a_bits == 16 else {"group_size": group, "activations": activations}
    config = PTQConfig(baseline=make_baseline("rtn", options), w_bits=4, a_bits=a_bits).for_family(DECODER_LM)
    q = copy.deepcopy(model)
    qwt.quantize(q, torch.randint(0, 128, (2, 16)), config, forward=lambda m, x: m(input_ids=x))
    return q


def _single_node(w, accuracy_level: int) -> bytes:
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w.packed, "B"), (w.scales, "S"), (w.zero_points, "Z"))]
    node = onnx.helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=w.k, N=w.n,
                                 bits=4, block_size=w.block_size, accuracy_level=accuracy_level)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, ["m", w.k])],
                                   [onnx.helper.make_tensor_value_info("y", 1, ["m", w.n])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                        onnx.helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def _run(proto: bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_matmulnbits_weight_is_the_simulated_weight_bit_for_bit():
    layer = _quantized(_model()).model.layers[0].mlp.down_proj
    w = nbits_weight(layer, "down_proj")
    simulated = layer.quantized_weight().detach()
    assert torch.equal(torch.from_numpy(w.dequantized()), simulated)
    # onnxruntime reads the codes, scales and zero points the same way: with FP32 activations (accuracy level 0)
    # the identity matrix returns each weight exactly (one product by 1.0, no sum of rounded terms)
    rows = _run(_single_node(w, 0), np.eye(w.k, dtype=np.float32))
    assert np.array_equal(rows.T, simulated.numpy())


def test_block_quantizer_is_the_kernels_input_quantisation():
    """At accuracy level 4 the kernel quantises x in blocks as rtn ``activations=block`` does, then sums exact
    int32 block products scaled in FP32. A code one step off moves an output by about amax/127·|w|, over 1e-3 of
    its size here; the same codes leave only FP32 rounding of the scale products and the block sum (≈ 1e-6)."""
    layer = _quantized(_model(), a_bits=8, activations="block").model.layers[0].mlp.down_proj
    w = nbits_weight(layer, "down_proj")
    x = torch.randn(64, w.k, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        simulated = F.linear(layer.input_quantizer(x), layer.quantized_weight()).numpy()
        unquantised = F.linear(x, layer.quantized_weight()).numpy()
    kernel = _run(_single_node(w, 4), x.numpy())
    scale = np.abs(simulated).max()
    assert np.abs(kernel - simulated).max() < 1e-5 * scale
    assert np.abs(unquantised - simulated).max() > 1e-3 * scale  # the quantiser does change the products


def _compensated(form: str) -> torch.nn.Module:
    model = _quantized(_model(), a_bits=16)
    if form != "none":
        rank = int(form[4:]) if form.startswith("rank") else None
        config = qwt.QwTConfig(compensation="channelwise" if form == "channelwise" else "dense", rank=rank,
                               fp16_eval=False, skip_degenerate=False, r2_threshold=-1e9, ridge=1.0)
        qwt.apply_qwt(model, torch.randint(0, 128, (8, 24)), config, batch_size=4, progress=False)
    return model


@pytest.mark.parametrize("form", ["none", "dense", "channelwise", "rank4"])
def test_exported_model_computes_the_pytorch_model(tmp_path, form):
    """Weights-only: the graph computes the module's ops in another order (MLAS sums, fused RMSNorm, the
    attention kernel), so logits agree to FP32 rounding, ~1e-6 of their size; every form must be in the graph."""
    model = _compensated(form)
    extra = {"none": None, "dense": "comp_weight", "channelwise": "gain", "rank4": "comp_down"}[form]
    if extra is not None:
        assert any(extra in name and t.abs().sum() > 0 for name, t in model.state_dict().items())
    lm = OnnxLM(export_decoder_lm(model, tmp_path / "m.onnx"), threads=1)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = lm(ids).logits
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    if form != "none":  # the map matters: without it the logits are measurably elsewhere
        bare = _quantized(_model(), a_bits=16)
        with torch.no_grad():
            assert (bare(input_ids=ids).logits - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_kv_cache_continues_as_one_pass(tmp_path, model_type):
    model = _model(model_type)
    lm = OnnxLM(export_decoder_lm(model, tmp_path / "m.onnx"), threads=1)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3)).numpy()
    full, _ = lm.step(ids, lm.empty_past(1))
    parts, past = [], lm.empty_past(1)
    for start, stop in ((0, 17), (17, 26), (26, 27), (27, 28), (28, 30)):
        logits, past = lm.step(ids[:, start:stop], past)
        parts.append(logits)
    assert past["past.0.key"].shape[2] == 30
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=1e-5 * np.abs(full).max())
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(full, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # greedy generation with the cache picks what re-running the whole sequence picks
    prompt = ids[0, :10].tolist()
    sequence = list(prompt)
    for _ in range(6):
        logits, _ = lm.step(np.asarray([sequence]), lm.empty_past(1))
        sequence.append(int(logits[0, -1].argmax()))
    assert lm.generate(prompt, 6) == sequence[10:]


@pytest.mark.parametrize("case, words", [
    ("per_channel", "group size None"), ("token_inputs", "no MatMulNBits counterpart"), ("w3", "W3 weights"),
    ("gemma", "model type 'gemma3_text'")])
def test_refusals_name_the_fix_and_write_nothing(tmp_path, case, words):
    if case == "per_channel":
        model = _quantized(_model(), group=None)
    elif case == "token_inputs":
        model = _quantized(_model(), a_bits=8)
    elif case == "w3":
        config = PTQConfig(baseline=make_baseline("rtn", {"group_size": 32}), w_bits=3, a_bits=16)
        model = _model()
        qwt.quantize(model, torch.randint(0, 128, (2, 16)), config.for_family(DECODER_LM),
                     forward=lambda m, x: m(input_ids=x))
    else:
        model = _model("gemma3_text")
    with pytest.raises(InputError, match=words):
        export_decoder_lm(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_graph_over_the_protobuf_limit_keeps_its_tensors_beside_it(tmp_path, monkeypatch):
    """Over 2 GiB (here: a limit lowered to 1 kB) the tensors go to lm.onnx.data beside the file, which
    onnxruntime reads from there: the same logits as the single-file export, and no staging folder left."""
    import qwt.export.lm as lm_module

    model = _compensated("dense")
    single = OnnxLM(export_decoder_lm(model, tmp_path / "one" / "lm.onnx"), threads=1)
    monkeypatch.setattr(lm_module, "MAX_FILE_BYTES", 1024)
    path = export_decoder_lm(model, tmp_path / "two" / "lm.onnx")
    assert sorted(p.name for p in path.parent.iterdir()) == ["lm.onnx", "lm.onnx.data"]
    data = (tmp_path / "two" / "lm.onnx.data").stat().st_size
    assert path.stat().st_size < data / 4 and data > (tmp_path / "one" / "lm.onnx").stat().st_size / 2
    assert lm_module.exported_bytes(path) == path.stat().st_size + data
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    assert torch.equal(OnnxLM(path, threads=1)(ids).logits, single(ids).logits)


def test_block_activations_need_groups_and_eight_bits():
    with pytest.raises(ValueError, match="set group_size"):
        make_baseline("rtn", {"activations": "block"})
    with pytest.raises(ValueError, match="A8"):
        make_baseline("rtn", {"activations": "block", "group_size": 32}).activation_quantizer(6)


def test_deploy_llm_smoke(tmp_path):
    """scripts/deploy_llm.py --smoke end to end: the task's saved models exported, each ONNX file's perplexity
    within 1 % of its PyTorch model's (and the reloaded model scoring as the task row did), and every row timed."""
    out = tmp_path / "deploy"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_llm.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    assert {"FP32", "W4", "W4 + QwT dense", "W4 + QwT channel-wise", "PyTorch FP32"} <= set(rows)
    assert any(name.startswith("W4 + QwT rank") for name in rows)
    for name, row in rows.items():
        assert row["ms_per_token"] > 0 and row["prefill_ms"] > 0
        if name != "PyTorch FP32":
            assert abs(row["perplexity_ratio"] - 1) < 0.01, name
            assert row["torch_equals_task_row"], name
            assert (out / "onnx").is_dir() and row["file_mb"] > 0
    assert rows["W4"]["file_mb"] < rows["FP32"]["file_mb"]
    assert "| W4 + QwT dense |" in (out / "table.md").read_text()
    assert summary["environment"]["onnxruntime"] and "cpu_extensions" in summary["environment"]
