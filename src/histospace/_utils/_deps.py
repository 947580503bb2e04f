"""Import dependencies without the warnings they print about themselves at import time.

torch-geometric warns that `torch.jit.script` is deprecated, and squidpy's docstring tooling (docrep) emits
`SyntaxWarning`s, on every import: noise about their own code that a histospace user can do nothing about. Our own
warnings (`UserWarning`) are untouched.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def quiet_import(name: str) -> ModuleType:
    """`importlib.import_module(name)` with the dependencies' import-time Future/Deprecation/Syntax warnings hidden."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, SyntaxWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        return importlib.import_module(name)
