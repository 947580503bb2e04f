"""Loaders for real public datasets: a local copy first, the public source on a connected machine."""

from ._dlpfc import dlpfc
from ._her2st import her2st

__all__ = ["dlpfc", "her2st"]
