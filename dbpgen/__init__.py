"""dbpgen: YAML network -> derived double-backpropagation equations -> Numba module."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import Derivation, compile, derive  # noqa: E402,A004
from .from_torch import from_torch  # noqa: E402

__all__ = ["Derivation", "compile", "derive", "from_torch", "__version__"]
