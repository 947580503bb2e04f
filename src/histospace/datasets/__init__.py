"""Loaders for real public datasets: a local copy first, the public source on a connected machine."""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._dlpfc import dlpfc
    from ._her2st import her2st

__all__ = ["dlpfc", "her2st"]
__getattr__, __dir__ = lazy_exports(__name__, {"dlpfc": "._dlpfc", "her2st": "._her2st"})
