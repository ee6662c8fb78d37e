"""ONNX export of quantised (and compensated) models; onnx and onnxruntime are imported only when used.

    model = qwt.export.calibrate_w8a8(fp_model, calib_images)                    # integer-kernel W8A8
    qwt.export.export_onnx(model, example, "model.onnx", mode="w8a8")
    qwt.export.export_onnx(any_fake_quant_model, example, "sim.onnx")              # any bits, simulated
    qwt.export.export_decoder_lm(w4_language_model, "lm.onnx")                    # MatMulNBits, KV cache
    qwt.export.OnnxLM("lm.onnx").generate(prompt_ids, 32)
"""
from .lm import export_decoder_lm
from .lm_runtime import OnnxLM
from .w8a8 import OutputQuantized, calibrate_w8a8, fold_batchnorm, qdq_view, resolve_weight_dtype
from .writer import INTEGER_OPS, export_onnx, exported_view, integer_nodes, run, session, weight_dtype_of

__all__ = ["OutputQuantized", "calibrate_w8a8", "fold_batchnorm", "qdq_view", "resolve_weight_dtype", "INTEGER_OPS",
           "export_onnx", "exported_view", "integer_nodes", "run", "session", "weight_dtype_of", "export_decoder_lm",
           "OnnxLM"]
