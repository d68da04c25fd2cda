"""dbpgen: YAML network -> derived double-backpropagation equations -> Numba module."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import Derivation, derive  # noqa: E402

__all__ = ["Derivation", "derive", "__version__"]
