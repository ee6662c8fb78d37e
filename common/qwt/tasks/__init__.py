"""The tasks, each a thin layer over one run protocol (:mod:`qwt.tasks.protocol`): ImageNet classification,
COCO detection, decoder-only language models and the main job's Fashion-MNIST runs, plus the shared flags
(:mod:`qwt.tasks.cli`) and the table runner (:mod:`qwt.tasks.tables`).

Each task folder at the top of the repository (``QwT-cls-RepQ-ViT``, ``QwT-cls-ResNet``, ``QwT-det-RepQ-ViT``,
``QwT-llm``) keeps only its entry script, README and configs. ``qwt.tasks.detection`` needs the detection extra
(mmdet 3, mmengine, mmcv-lite or mmcv) and is imported only by detection entry points.
"""
