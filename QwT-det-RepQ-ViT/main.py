"""QwT on COCO detection: RepQ-ViT over a whole Swin Mask R-CNN / Cascade Mask R-CNN, then QwT on its backbone.

    python QwT-det-RepQ-ViT/main.py --model mask_rcnn_swin_t --coco-root /data/coco \
        --checkpoint mask_rcnn_swin_tiny_patch4_window7.pth --w-bits 4 --a-bits 4

Reports COCO val2017 box and mask AP of the FP, RepQ-ViT and RepQ-ViT+QwT detectors (see README.md).
"""
import sys

from qwt.tasks.detection.pipeline import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
