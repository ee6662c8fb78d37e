"""CLI: export a model saved by ``qwt.save_quantized`` to ONNX.

    python -m qwt.export results/vit_w4a4 vit_w4a4.onnx --input-shape 1 28 28
    python -m qwt.export results/vit_w8a8 vit_w8a8.onnx --input-shape 1 28 28 --mode w8a8
    python -m qwt.export results/llm_saved/W4A8-... lm.onnx        # a decoder LM: MatMulNBits, KV cache

A decoder language model (Llama, Qwen2) saved with rtn weight groups goes to :func:`qwt.export.export_decoder_lm`
(token ids in, logits and the KV cache out; no --input-shape).

``simulate`` works for any saved model. ``w8a8`` needs a model calibrated for integer kernels
(``qwt.export.calibrate_w8a8``); a CNN calibrated that way has BatchNorm folded, which ``load_quantized`` does
not rebuild, so CNN deployment exports go through the Python API (see scripts/deploy.py).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..cli import check_writable_dir, positive_int, run_cli
from ..errors import InputError
from ..inputs import check_images
from ..models import get_model_entry, list_models
from ..models.decoder_lm import DECODER_LM
from ..serialization import DESCRIPTION, TENSORS, load_quantized
from ..serialization.store import read_description, require_save_files
from .lm import export_decoder_lm, exported_bytes
from .w8a8 import WEIGHT_DTYPES, resolve_weight_dtype
from .writer import export_onnx

#: Most values one example image may hold (3 × 2048 × 2048 is 12.6 M): a larger --input-shape is refused before
#: anything is allocated.
MAX_INPUT_ELEMENTS = 1 << 24


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qwt.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("saved", type=Path, help="folder written by qwt.save_quantized")
    p.add_argument("out", type=Path, help="ONNX file to write")
    p.add_argument("--input-shape", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                   help="image models: one image's shape (the batch axis is dynamic)")
    p.add_argument("--mode", choices=["simulate", "w8a8"], default="simulate")
    p.add_argument("--fp16-compensation", action="store_true",
                   help="keep the QwT product in FP16 (default FP32: the simulation then computes the same ops as "
                        "the torch model with FP32 compensation, in onnxruntime's summation order, and w8a8 runs "
                        "faster on CPUs)")
    p.add_argument("--weight-dtype", choices=["auto", *WEIGHT_DTYPES], default="auto",
                   help="w8a8 only: store weights as INT8 (fast, exact with VNNI/AMX, saturating on x86 CPUs "
                        "without) or UINT8 (exact on any CPU, slower); auto (default): INT8 if this CPU has VNNI "
                        "or AMX, else UINT8. Name it when the file is for another machine")
    args = p.parse_args(argv)
    weight_dtype = resolve_weight_dtype(args.weight_dtype)
    elements = math.prod(args.input_shape or ())
    if elements > MAX_INPUT_ELEMENTS:
        raise InputError(f"--input-shape {' '.join(map(str, args.input_shape))}: {elements} values per image, more "
                         f"than the {MAX_INPUT_ELEMENTS} an export example may hold; pass the model's input shape")
    if args.out.is_dir():
        raise InputError(f"{args.out} is a folder: pass the ONNX file to write")
    check_writable_dir(args.out.parent, "output folder")
    if _check_saved(args.saved, args.out):
        if args.input_shape is not None:
            raise InputError(f"--input-shape is for image models; {args.saved} holds a language model (token ids): "
                             "drop the flag")
        path = export_decoder_lm(load_quantized(args.saved), args.out)
        print(f"wrote {path} ({exported_bytes(path) / 1e6:.3f} MB, language model, MatMulNBits 4-bit weights)")
        return
    if args.input_shape is None:
        raise InputError("--input-shape C H W is needed to export an image model (e.g. --input-shape 3 224 224)")
    model = load_quantized(args.saved)
    example = torch.zeros(1, *args.input_shape)
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise InputError(f"--input-shape {' '.join(map(str, args.input_shape))} does not fit the saved model "
                         f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    path = export_onnx(model, example, args.out, args.mode, args.fp16_compensation, weight_dtype)
    storage = f", {weight_dtype} weights" if args.mode == "w8a8" else ""
    print(f"wrote {path} ({path.stat().st_size / 1e6:.3f} MB, {args.mode}{storage})")


def _check_saved(saved: Path, out: Path) -> bool:
    """Refuse, before anything is loaded, an ``out`` that is one of the save's own files (the export would
    replace the saved model) and a saved model whose inputs are neither images nor token ids of a decoder
    language model; True for a decoder language model."""
    if out.resolve() in {(saved / name).resolve() for name in (DESCRIPTION, TENSORS)}:
        raise InputError(f"{out} is a file of the saved model {saved}: pass another ONNX file to write")
    require_save_files(saved)
    name = read_description(saved / DESCRIPTION)[0].get("model")
    if name not in list_models():
        return False
    family = get_model_entry(name).family
    if family is DECODER_LM:
        return True
    if family.check_inputs is not check_images:
        raise InputError(f"{saved} holds a {family.name} model, whose inputs are not images: only image models and "
                         "decoder language models are exported")
    return False


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
