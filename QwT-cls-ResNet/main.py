"""QwT on ImageNet ResNets: percentile PTQ (stem and fc W8A8, BatchNorm not folded), then grouped-conv QwT.

    python QwT-cls-ResNet/main.py --model resnet50 --data-dir /data/imagenet \
        --checkpoint resnet50_imagenet.pth.tar --w-bits 4 --a-bits 4

--conv-act-bits 8 reproduces the authors' first release, whose "W4/A4" table was really W4/A8.
"""
import sys

from qwt.tasks.classification import main

if __name__ == "__main__":
    sys.exit(main("resnet", __doc__))
