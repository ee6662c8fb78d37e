"""QwT on ImageNet ViT / DeiT / Swin: RepQ-ViT (or percentile) PTQ, then QwT, optionally QwT*.

    python QwT-cls-RepQ-ViT/main.py --model deit_small --data-dir /data/imagenet \
        --checkpoint deit_small_patch16_224-cd65a155.pth --w-bits 4 --a-bits 4

Multi-GPU: torchrun --nproc_per_node N QwT-cls-RepQ-ViT/main.py ... (same arguments).
"""
import sys

from qwt.tasks.classification import main

if __name__ == "__main__":
    sys.exit(main("vit", __doc__))
