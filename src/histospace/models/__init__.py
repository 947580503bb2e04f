"""User-facing model classes behind the `tl` functions: train, embed or predict, save and load."""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._mclstexp import MclSTExp
    from ._stereomm import StereoMM

__all__ = ["MclSTExp", "StereoMM"]
__getattr__, __dir__ = lazy_exports(__name__, {"MclSTExp": "._mclstexp", "StereoMM": "._stereomm"})
