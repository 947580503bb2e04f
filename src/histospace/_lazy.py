"""Lazy exports of a package (PEP 562): `import histospace` does not import torch, squidpy or spatialdata.

A name is imported from its module on first access (`hs.tl.stereomm` imports `histospace.tl._stereomm` then), so
the heavy dependencies load only when a function that needs them is first used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package` whose public `name` lives in the submodule `exports[name]`."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # cache: later lookups bypass __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
