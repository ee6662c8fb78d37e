"""Lazy imports of the optional export dependencies, so ``import qwt`` works without them."""
from __future__ import annotations

import importlib
from types import ModuleType

_PIP_NAMES = {"onnx": "onnx", "onnxruntime": "onnxruntime"}


def require(module: str) -> ModuleType:
    """Import ``module`` or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"qwt.export needs the '{_PIP_NAMES[module]}' package: "
                          f"pip install {_PIP_NAMES[module]} (pinned in requirements.txt)") from err
