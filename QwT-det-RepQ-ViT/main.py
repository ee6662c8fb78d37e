"""QwT on COCO detection: RepQ-ViT over a whole Swin Mask R-CNN / Cascade Mask R-CNN, then QwT on its backbone.
Reports COCO val2017 box and mask AP of the FP, RepQ-ViT and RepQ-ViT+QwT detectors (QwT-det-RepQ-ViT/README.md).

examples:
  python QwT-det-RepQ-ViT/main.py --model mask_rcnn_swin_t --coco-root /data/coco \\
      --checkpoint mask_rcnn_swin_tiny_patch4_window7.pth --w-bits 4 --a-bits 4
  # the authors' arithmetic and compensation images (as scripts/det_swin.sh runs the paper's table):
  python QwT-det-RepQ-ViT/main.py ... --solver reference --comp-draw authors --comp-batch-size 1
  # a reduced random-init detector on a synthetic COCO set (CPU, about a minute):
  python QwT-det-RepQ-ViT/main.py --model mask_rcnn_swin_t --smoke
"""
import sys

from qwt.tasks.detection.pipeline import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
