"""ONNX export of quantised (and compensated) models; onnx and onnxruntime are imported only when used.

    model = qwt.export.calibrate_w8a8(fp_model, calib_images)                    # integer-kernel W8A8
    qwt.export.export_onnx(model, example, "model.onnx", mode="w8a8")
    qwt.export.export_onnx(any_fake_quant_model, example, "sim.onnx")              # any bits, simulated
"""
from .w8a8 import OutputQuantized, calibrate_w8a8, fold_batchnorm, qdq_view, resolve_weight_dtype
from .writer import INTEGER_OPS, export_onnx, exported_view, integer_nodes, run, session, weight_dtype_of

__all__ = ["OutputQuantized", "calibrate_w8a8", "fold_batchnorm", "qdq_view", "resolve_weight_dtype", "INTEGER_OPS",
           "export_onnx", "exported_view", "integer_nodes", "run", "session", "weight_dtype_of"]
