"""User-facing model classes behind the `tl` functions: train, embed or predict, save and load."""

from ._mclstexp import MclSTExp
from ._stereomm import StereoMM

__all__ = ["MclSTExp", "StereoMM"]
