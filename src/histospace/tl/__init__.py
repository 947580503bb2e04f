"""Tools: StereoMM latent and spatial domains, mclSTExp training, prediction and evaluation."""

from ._domains import domains
from ._evaluate import mclstexp_cross_validate
from ._mclstexp import mclstexp_predict, mclstexp_train
from ._stereomm import stereomm

__all__ = ["domains", "mclstexp_cross_validate", "mclstexp_predict", "mclstexp_train", "stereomm"]
