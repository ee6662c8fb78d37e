"""Lazy imports of the optional export dependencies, so ``import qwt`` works without them."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str) -> ModuleType:
    """Import ``module`` or fail with the pip command that installs it (the pip name is the module name)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"qwt.export needs the '{module}' package: "
                          f"pip install {module} (pinned in requirements.txt)") from err
