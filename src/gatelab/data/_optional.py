"""Optional imports for the data modules: a message that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_PIP_NAMES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "statsmodels": "statsmodels"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        package = _PIP_NAMES.get(top, top)
        raise ImportError(
            f"{purpose} needs {package}, which is not installed; "
            f"install the data extras with: pip install 'gatelab[data]'"
        ) from err
