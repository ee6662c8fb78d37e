"""Time each phase of RepQ-ViT + QwT calibration on random weights and synthetic images (no data loading).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/calibration_phases.py --model deit_small [--comp-images 512]

Phases: the first RepQ-ViT calibration pass, reparameterisation + re-calibration, QwT (all blocks), and for
scale one FP32 forward of the compensation images. The authors' code needs 138.9 s for DeiT-S W4/A4 with 32 + 512
images on one H200 with torch 2.11 (85 s + 49 s + 4.3 s, measured by the project, not by this script).
"""
from __future__ import annotations

import argparse
import json

import torch

from qwt import PTQConfig, QwTConfig, apply_qwt, create_model, get_model_entry, quantize
from qwt.utils import PhaseTimer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--comp-images", type=int, default=None, help="default: 512 on GPU, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--solver", choices=["streaming", "reference"], default="streaming")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    args = p.parse_args()
    comp_n = args.comp_images or (512 if args.device.startswith("cuda") else 64)
    entry = get_model_entry(args.model)
    torch.manual_seed(0)
    model = create_model(args.model, pretrained=False).to(args.device).eval()
    gen = torch.Generator(device=args.device).manual_seed(0)
    calib = torch.randn(args.calib_images, 3, 224, 224, device=args.device, generator=gen)
    comp = torch.randn(comp_n, 3, 224, 224, device=args.device, generator=gen)

    with torch.no_grad():
        model(comp[:args.batch_size])  # warm-up
        timer = PhaseTimer()
        for chunk in comp.split(args.batch_size):
            model(chunk)
        fp_forward = timer("fp forward")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timer = PhaseTimer()
    quantize(model, calib, PTQConfig(method=entry.family.methods[0], w_bits=args.w_bits, a_bits=args.a_bits),
             on_phase=timer)
    apply_qwt(model, comp, QwTConfig(solver=args.solver), batch_size=args.batch_size, progress=False)
    timer("qwt")
    figures = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"cpu ({torch.get_num_threads()} threads)", "calib_images": args.calib_images,
               "comp_images": comp_n, **{k: round(v, 3) for k, v in timer.phases.items()},
               "total_calibration": round(timer.total, 3), "fp_forward_comp_images": round(fp_forward, 3)}
    if args.device.startswith("cuda"):
        figures["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(f"{args.model} W{args.w_bits}A{args.a_bits} on {figures['device']}, "
          f"{args.calib_images} calibration + {comp_n} compensation images")
    for key in ("calibrate", "reparameterize+recalibrate", "qwt", "total_calibration", "fp_forward_comp_images"):
        print(f"  {key:28s} {figures[key]:8.3f} s")
    if "peak_gib" in figures:
        print(f"  {'peak GPU memory':28s} {figures['peak_gib']:8.3f} GiB")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
