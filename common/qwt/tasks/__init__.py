"""Task glue over the library: ImageNet classification and COCO detection, with one set of command-line flags.

Each task folder at the top of the repository (``QwT-cls-RepQ-ViT``, ``QwT-cls-ResNet``, ``QwT-det-RepQ-ViT``)
keeps only its entry script, README and configs; the code lives here. ``qwt.tasks.detection`` needs the
detection extra (mmdet 3, mmengine, mmcv-lite or mmcv) and is imported only by detection entry points.
"""
